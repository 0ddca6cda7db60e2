#!/usr/bin/env bash
# Distil on your own videos, with the tiny settings of configs/tiny (8 frames, stride 4, 32x32):
#     bash scripts/own_data.sh MANIFEST RUN_DIR
# MANIFEST: JSONL, one {"path": "clip.mp4", "caption": "..."} per line, paths relative to the
# manifest's folder; every video needs at least 115 frames (checked before anything loads).
# Stages, each in its own folder under RUN_DIR:
#   teacher/   a tiny teacher trained from scratch on the videos    (configs/tiny/teacher.yaml)
#   kd_pairs/  its N-step CFG samples for fresh noise                (configs/tiny/kd_pairs.yaml)
#   kd/        a one-step student regressed on the pairs             (configs/tiny/kd.yaml)
#   dmd2/      DMD2 from the KD student                              (configs/tiny/dmd2.yaml)
#   eval/      the evaluation report on the held-out part of the videos (configs/tiny/eval.yaml)
#   cache/     prompt embeddings of the captions
# Running it again resumes: finished stages (an export, a report) are skipped, an interrupted
# training continues from its last.ckpt, pair generation skips finished shards.
# Environment: TEACHER_STEPS (3000), PAIRS (320 train pairs), KD_STEPS (300), DMD2_STEPS (300),
# SAMPLE_STEPS (36: teacher steps of the pairs and of the evaluation's reference), PYTHON (a
# Python with distill_pl installed; default: .venv/bin/python, set up by scripts/setup.sh).
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 MANIFEST RUN_DIR" >&2
    exit 2
fi
MANIFEST=$(realpath "$1")
RUN=$(realpath -m "$2")
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    bash scripts/setup.sh
    PYTHON=.venv/bin/python
fi
DPL=("$PYTHON" -m distill_pl.cli.main)
DATA=(--data.manifest "$MANIFEST" --data.cache_dir "$RUN/cache")
TEACHER="$RUN/teacher/export"
SAMPLE_STEPS="${SAMPLE_STEPS:-36}"

source scripts/fit_stage.sh

echo "== 1/5 teacher on $MANIFEST"
fit_stage teacher configs/tiny/teacher.yaml --trainer.max_steps "${TEACHER_STEPS:-3000}" "${DATA[@]}"
echo "== 2/5 KD pairs"
"${DPL[@]}" predict --config configs/tiny/kd_pairs.yaml --trainer.default_root_dir "$RUN/kd_pairs" \
    --model.init_args.teacher "$TEACHER" --model.init_args.num_steps "$SAMPLE_STEPS" \
    --data.num_examples "${PAIRS:-320}" "${DATA[@]}"
echo "== 3/5 KD"
fit_stage kd configs/tiny/kd.yaml --trainer.max_steps "${KD_STEPS:-300}" --model.init_args.teacher "$TEACHER" \
    --data.pairs_dir "$RUN/kd_pairs" --data.cache_dir "$RUN/cache"
echo "== 4/5 DMD2 from the KD student"
fit_stage dmd2 configs/tiny/dmd2.yaml --trainer.max_steps "${DMD2_STEPS:-300}" --model.init_args.teacher "$TEACHER" \
    --model.init_args.init_from "$RUN/kd/export" "${DATA[@]}"
echo "== 5/5 evaluation"
"${DPL[@]}" evaluate --config configs/tiny/eval.yaml --teacher "$TEACHER" --teacher_steps "$SAMPLE_STEPS" \
    --students "{\"KD\": \"$RUN/kd/export\", \"DMD2\": \"$RUN/dmd2/export\"}" --out "$RUN/eval" "${DATA[@]}"
echo "report: $RUN/eval/report.md (TensorBoard: tensorboard --logdir $RUN)"
