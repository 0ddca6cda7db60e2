#!/usr/bin/env bash
# A second job after scripts/demo.sh (kept out of it, whose time it would double): 4-step
# students from the same pairs and clips, then the evaluation again with their rows added:
#   1. KD into a 4-step student on the teacher's trajectory    (configs/tiny/kd_4step.yaml)
#   2. DMD2 into a 4-step student from the 4-step KD student   (configs/tiny/dmd2_4step.yaml)
#   3. evaluation: the teacher at 1, 2, 4 and 36 steps, the one-step KD and DMD2 students of
#      demo.sh and the two 4-step students (4 network calls each) (configs/tiny/eval.yaml)
# The pairs come from demo.sh, which stores the teacher's states at the 4-step levels. The
# evaluation reuses the videos demo.sh generated and only generates the new students'.
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

echo "== 1/3 KD 4-step"
fit_stage kd_4step configs/tiny/kd_4step.yaml
echo "== 2/3 DMD2 4-step from the 4-step KD student"
fit_stage dmd2_4step configs/tiny/dmd2_4step.yaml --model.init_args.init_from "$RUN/kd_4step/checkpoints/last.ckpt"
echo "== 3/3 evaluation with the 4-step students"
"${DPL[@]}" evaluate --config configs/tiny/eval.yaml --students \
    "{\"KD\": \"$RUN/kd/export\", \"DMD2\": \"$RUN/dmd2/export\", \"KD 4-step\": \"$RUN/kd_4step/export\", \"DMD2 4-step\": \"$RUN/dmd2_4step/export\"}"
echo "report: $RUN/eval/report.md"
