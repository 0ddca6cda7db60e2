#!/usr/bin/env bash
# Distil the committed tiny teacher (teachers/tiny) into one-step students:
# KD pair generation -> KD -> DMD2 from the KD checkpoint. Each stage skips what is done:
# pair generation skips finished shards, KD and DMD2 resume from their last checkpoint and
# are skipped once their student is exported.
set -euo pipefail
cd "$(dirname "$0")/.."
DPL=.venv/bin/distill-pl
RUN=runs/tiny

fit_stage() {  # fit_stage NAME CONFIG [extra args...]: fit unless exported, resuming if possible
    local name=$1 config=$2
    shift 2
    if [ -f "$RUN/$name/export/transformer/diffusion_pytorch_model.safetensors" ]; then
        echo "$name: already done ($RUN/$name/export)"
        return
    fi
    local resume=()
    if [ -f "$RUN/$name/checkpoints/last.ckpt" ]; then resume=(--ckpt_path last); fi
    "$DPL" fit --config "$config" "$@" "${resume[@]}"
}

"$DPL" predict --config configs/tiny/kd_pairs.yaml
fit_stage kd configs/tiny/kd.yaml
fit_stage dmd2 configs/tiny/dmd2.yaml --model.init_args.init_from "$RUN/kd/checkpoints/last.ckpt"
echo "students: $RUN/kd/export (KD), $RUN/dmd2/export (DMD2); TensorBoard: .venv/bin/tensorboard --logdir $RUN"
