# Sourced by scripts/demo.sh, demo_fewstep.sh and own_data.sh (needs RUN, the run root, and
# DPL, the distill-pl command as an array).
# fit_stage NAME CONFIG [args...]: fit CONFIG into $RUN/NAME unless its student or teacher
# is already exported there, resuming from its last checkpoint if it has one.
fit_stage() {
    local name=$1 config=$2
    shift 2
    if [ -f "$RUN/$name/export/transformer/diffusion_pytorch_model.safetensors" ]; then
        echo "$name: already done ($RUN/$name/export)"
        return
    fi
    local resume=()
    if [ -f "$RUN/$name/checkpoints/last.ckpt" ]; then resume=(--ckpt_path last); fi
    "${DPL[@]}" fit --config "$config" --trainer.default_root_dir "$RUN/$name" "$@" "${resume[@]}"
}
