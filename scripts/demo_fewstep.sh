#!/usr/bin/env bash
# A second job after scripts/demo.sh (kept out of it, whose ~22 minutes it would lengthen):
# DMD2 into a 4-step student from the same KD student (configs/tiny/dmd2_4step.yaml), then the
# evaluation again with its row added ("DMD2 4-step student 4-step", 4 network calls) next to
# the teacher at 1, 2, 4 and 36 steps and the one-step KD and DMD2 students. The evaluation
# reuses the videos demo.sh generated and only generates the new student's. Resumable like
# demo.sh: the fit continues from its last.ckpt and is skipped once the student is exported.
set -euo pipefail
cd "$(dirname "$0")/.."
DPL=.venv/bin/distill-pl
RUN=runs/tiny
if [ ! -f "$RUN/kd/checkpoints/last.ckpt" ]; then
    echo "no $RUN/kd/checkpoints/last.ckpt: run scripts/demo.sh first" >&2
    exit 1
fi
echo "== 1/2 DMD2 4-step from the KD student"
if [ -f "$RUN/dmd2_4step/export/transformer/diffusion_pytorch_model.safetensors" ]; then
    echo "dmd2_4step: already done ($RUN/dmd2_4step/export)"
else
    resume=()
    if [ -f "$RUN/dmd2_4step/checkpoints/last.ckpt" ]; then resume=(--ckpt_path last); fi
    "$DPL" fit --config configs/tiny/dmd2_4step.yaml \
        --model.init_args.init_from "$RUN/kd/checkpoints/last.ckpt" "${resume[@]}"
fi
echo "== 2/2 evaluation with the 4-step student"
"$DPL" evaluate --config configs/tiny/eval.yaml --students \
    "{\"KD\": \"$RUN/kd/export\", \"DMD2\": \"$RUN/dmd2/export\", \"DMD2 4-step\": \"$RUN/dmd2_4step/export\"}"
echo "report: $RUN/eval/report.md"
