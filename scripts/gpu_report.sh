#!/usr/bin/env bash
# One GPU report of two full-size architectures (random weights built through the family
# registry, no download), each beside `distill-pl estimate-memory` of its KD and DMD2 configs:
#   wan:    Wan2.1-T2V-1.3B, 81x480x832 (latents 16x21x60x104, 32,760 tokens), bf16-mixed;
#   cosmos: Cosmos-Transfer2.5-2B base + ControlNet, 93x704x1280 (latents 16x24x88x160,
#           84,480 tokens, control latents of the same shape), bf16-true: its DMD2 step in
#           bf16-mixed needs ~115 GiB on one device (estimate-memory), more than one 80 GB GPU.
# Per family: KD, DMD2 critic and DMD2 generator step time, peak memory, MFU; teacher 36-step
# CFG (w 8, the kd_pairs configs') vs 1-step student seconds per video. Writes
# OUT_DIR/gpu_report.json and OUT_DIR/gpu_report.md (one section per family).
#
# Time budget, under 8 minutes on one H100: estimated from FLOPs counted on the meta device at
# ~40% MFU of 989 TFLOP/s (~396 TFLOP/s), executed FLOPs (model + checkpointing's recompute):
#   wan:    KD 1.13, critic 2.55, generator 2.39 PFLOP (~2.9, 6.4, 6.0 s/step), 1 warm-up + 3
#           timed steps each (~61 s); teacher step 2 x 0.283 PFLOP (~1.4 s): 1 warm-up + 3 timed
#           steps, s/video = 36 x median (~6 s; the whole video would take ~52 s); ~70 s on the GPU
#   cosmos: KD 9.1, critic 20.4, generator 19.4 PFLOP (~23, 52, 49 s/step), 1 warm-up step at
#           1 frame (kernels, AdamW state) + 1 timed step each (~130 s); teacher step 2 x 2.27
#           PFLOP (~11.4 s): 1 warm-up + 2 timed, s/video = 36 x median (~34 s; the whole video
#           would take ~410 s); student 2 x 5.7 s; ~180 s on the GPU
#   wan also times each phase compiled (--compile: every block compiled in 1 warm-up step,
#   3 timed steps; an unmeasured guess of 1-2 min for the compiles plus ~30 s of steps)
#   plus FLOP counting on meta, four estimate-memory runs, imports and model building (~2 min
#   on a 2-core CPU): about 8 minutes in all at 40% MFU, 9 at 30%. Extrapolated teacher
#   figures are labelled as such in the JSON (teacher_s_per_video_from) and the table.
#   context parallel (below): 3 runs of 2 processes, each 3 phases of a 2-block model at 8,190
#   tokens, once unsplit and once split: an unmeasured guess of ~40 s per run, mostly start-up,
#   ~2 min in all. Under a 10-minute limit per command, run the families in two calls
#   (GPU_REPORT_FAMILIES=wan, then GPU_REPORT_FAMILIES=cosmos GPU_REPORT_CONTEXT_PARALLEL=0
#   into another OUT_DIR).
#
#   scripts/gpu_report.sh [OUT_DIR]                    # default runs/gpu_report
#   GPU_REPORT_FAMILIES=cosmos scripts/gpu_report.sh   # one family (default "wan cosmos")
#   GPU_REPORT_TINY=1 scripts/gpu_report.sh OUT_DIR    # tiny models of both on the CPU (the test)
#   GPU_REPORT_CONTEXT_PARALLEL=0 scripts/gpu_report.sh # without the context-parallel rows
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_report}
PYTHON=${PYTHON:-.venv/bin/python}
TINY=${GPU_REPORT_TINY:-0}
mkdir -p "$OUT"
report=()
for family in ${GPU_REPORT_FAMILIES:-wan cosmos}; do
  case "$family" in
    wan)
      configs=(configs/wan2.1-t2v-1.3b/kd.yaml configs/wan2.1-t2v-1.3b/dmd2.yaml)
      tiny_configs=(configs/tiny/kd.yaml configs/tiny/dmd2.yaml)
      full=(--precision bf16-mixed --warmup 1 --steps 3 --teacher_timed_steps 3 --compile) ;;
    cosmos)
      configs=(configs/cosmos-transfer2.5-2b/kd.yaml configs/cosmos-transfer2.5-2b/dmd2.yaml)
      tiny_configs=(configs/tiny-cosmos-transfer2.5/kd.yaml configs/tiny-cosmos-transfer2.5/dmd2.yaml)
      full=(--precision bf16-true --warmup 1 --warmup_frames 1 --steps 1 --teacher_timed_steps 2) ;;
    *)
      echo "GPU_REPORT_FAMILIES: unknown family '$family' (wan, cosmos)" >&2
      exit 2 ;;
  esac
  if [[ "$TINY" == 1 ]]; then
    bench=(--device cpu --tiny --frames 5 --height 64 --width 64 --warmup 0 --steps 1 --peak_tflops 1
           --sample_steps 4 --teacher_timed_steps 2)
    configs=("${tiny_configs[@]}")
    if [[ "$family" == cosmos ]]; then  # the tiny configs name a teacher folder this script writes
      "$PYTHON" scripts/make_tiny_cosmos_transfer.py --out "$OUT/tiny-cosmos-teacher"
      report+=(--teacher cosmos "$OUT/tiny-cosmos-teacher")
    fi
  else
    bench=(--device cuda "${full[@]}")
  fi
  "$PYTHON" scripts/benchmark_family.py --family "$family" "${bench[@]}" --sampling --json "$OUT/benchmark_$family.json"
  report+=(--family "$family" "$OUT/benchmark_$family.json" "${configs[@]}")
done
# Context parallel vs one process (scripts/check_context_parallel.py; gloo processes sharing
# the one device): on a GPU Ulysses 2 in float32 sharded with FSDP2, Ulysses 2 and ring 2 in
# bfloat16 with the hooks only (ring needs cuDNN attention; unsharded in case FSDP2's gloo
# collectives refuse CUDA tensors), the Wan2.1-1.3B architecture cut to 2 blocks at 81x240x416,
# latents 21x30x52 (8,190 tokens), then Ulysses 2 and ring 2 in bfloat16 (hooks only) for the
# Cosmos-Transfer2.5-2B architecture (base and ControlNet) cut to 2 blocks, latents 24x30x52
# (9,360 tokens); on the CPU (GPU_REPORT_TINY=1) the tiny Wan, Ulysses 2 only.
# A failed run is a row of the report, not its end.
cp_runs=()
if [[ "${GPU_REPORT_CONTEXT_PARALLEL:-1}" == 1 ]]; then
  if [[ "$TINY" == 1 ]]; then
    cp_common=(--device cpu --tiny); cp_cases=("--ulysses 2 --dtype float32")
  else
    cp_common=(--device cuda)
    cp_cases=("--ulysses 2 --dtype float32" "--ulysses 2 --dtype bfloat16 --sharding none"
              "--ring 2 --dtype bfloat16 --sharding none"
              "--family cosmos-transfer --ulysses 2 --dtype bfloat16 --sharding none"
              "--family cosmos-transfer --ring 2 --dtype bfloat16 --sharding none")
  fi
  for i in "${!cp_cases[@]}"; do
    # shellcheck disable=SC2086  # a case is several arguments
    "$PYTHON" scripts/check_context_parallel.py "${cp_common[@]}" ${cp_cases[$i]} --json "$OUT/context_parallel_$i.json" || true
    cp_runs+=("$OUT/context_parallel_$i.json")
  done
fi
"$PYTHON" scripts/gpu_report.py "$OUT" "${report[@]}" ${cp_runs[@]+--context_parallel "${cp_runs[@]}"}
