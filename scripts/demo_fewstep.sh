#!/usr/bin/env bash
# A second job after scripts/demo.sh (kept out of it, whose time it would double): 4- and
# 2-step students from the same pairs and clips, then the evaluation again with their rows:
#   1. KD into a 4-step student on the teacher's trajectory    (configs/tiny/kd_4step.yaml)
#   2. DMD2 into a 4-step student from the 4-step KD student   (configs/tiny/dmd2_4step.yaml)
#   3. Phased DMD, the same otherwise: one phase per step, 15 student updates each
#   4. KD into a 2-step student, levels [1.0, 0.5]              (kd_4step.yaml, other levels)
#   5. DMD2 into a 2-step student from the 2-step KD student    (dmd2_4step.yaml, other levels)
#   6. evaluation: the teacher at 1, 2, 4 and 36 steps, the one-step KD and DMD2 students of
#      demo.sh and the few-step students (configs/tiny/eval.yaml)
# The pairs come from demo.sh, which stores the teacher's states at the levels 0.75, 0.5 and
# 0.25 (the 2-step student uses the one at 0.5). The evaluation reuses the videos demo.sh
# generated and only generates the new students'.
# Resumable like demo.sh: a fit continues from its last.ckpt and is skipped once its student
# is exported.
set -euo pipefail
cd "$(dirname "$0")/.."
DPL=(.venv/bin/distill-pl)
RUN=runs/tiny
if [ ! -f "$RUN/kd/checkpoints/last.ckpt" ]; then
    echo "no $RUN/kd/checkpoints/last.ckpt: run scripts/demo.sh first" >&2
    exit 1
fi

source scripts/fit_stage.sh

TWO_STEPS=(--model.init_args.student_sigmas "[1.0, 0.5]")
echo "== 1/6 KD 4-step"
fit_stage kd_4step configs/tiny/kd_4step.yaml
echo "== 2/6 DMD2 4-step from the 4-step KD student"
fit_stage dmd2_4step configs/tiny/dmd2_4step.yaml --model.init_args.init_from "$RUN/kd_4step/checkpoints/last.ckpt"
echo "== 3/6 Phased DMD 4-step from the 4-step KD student"
fit_stage phased_dmd_4step configs/tiny/dmd2_4step.yaml --model.init_args.init_from "$RUN/kd_4step/checkpoints/last.ckpt" \
    --model.init_args.phased_dmd true --model.init_args.phase_generator_steps 15
echo "== 4/6 KD 2-step"
fit_stage kd_2step configs/tiny/kd_4step.yaml "${TWO_STEPS[@]}"
echo "== 5/6 DMD2 2-step from the 2-step KD student"
fit_stage dmd2_2step configs/tiny/dmd2_4step.yaml --model.init_args.init_from "$RUN/kd_2step/checkpoints/last.ckpt" "${TWO_STEPS[@]}"
echo "== 6/6 evaluation with the few-step students"
students="{\"KD\": \"$RUN/kd/export\", \"DMD2\": \"$RUN/dmd2/export\""
students+=", \"KD 2-step\": \"$RUN/kd_2step/export\", \"DMD2 2-step\": \"$RUN/dmd2_2step/export\""
students+=", \"KD 4-step\": \"$RUN/kd_4step/export\", \"DMD2 4-step\": \"$RUN/dmd2_4step/export\""
students+=", \"Phased DMD 4-step\": \"$RUN/phased_dmd_4step/export\"}"
"${DPL[@]}" evaluate --config configs/tiny/eval.yaml --students "$students"
echo "report: $RUN/eval/report.md"
