#!/usr/bin/env bash
# One GPU report of the full-size Wan2.1-T2V-1.3B architecture (random bf16 weights, no
# download): teacher 36-step CFG vs 1-step student seconds per video at 81x480x832, KD and
# DMD2 critic/student step time, peak memory beside `distill-pl estimate-memory`, MFU.
# Writes OUT_DIR/gpu_report.json and OUT_DIR/gpu_report.md (about 5 minutes on one H100/H200).
#   scripts/gpu_report.sh [OUT_DIR]                  # default runs/gpu_report
#   GPU_REPORT_TINY=1 scripts/gpu_report.sh OUT_DIR  # the tiny model on the CPU (seconds; the test)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_report}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
if [[ "${GPU_REPORT_TINY:-0}" == 1 ]]; then
  bench=(--device cpu --tiny --frames 5 --height 64 --width 64 --warmup 0 --steps 1 --peak_tflops 1 --sample_steps 2)
  configs=(--kd_config configs/tiny/kd.yaml --dmd2_config configs/tiny/dmd2.yaml)
else
  bench=(--device cuda --warmup 2 --steps 5 --sample_steps 36)
  configs=(--kd_config configs/wan2.1-t2v-1.3b/kd.yaml --dmd2_config configs/wan2.1-t2v-1.3b/dmd2.yaml)
fi
"$PYTHON" scripts/benchmark_wan.py "${bench[@]}" --sampling --json "$OUT/benchmark_wan.json"
"$PYTHON" scripts/gpu_report.py "$OUT/benchmark_wan.json" "$OUT" "${configs[@]}"
