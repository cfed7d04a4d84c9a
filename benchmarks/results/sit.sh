#!/usr/bin/env bash
# sit: SiT (2401.08740) = the rectified-flow DiT with SiT's settings (linear path, velocity prediction), Euler-Maruyama SDE sampler.
# Preset `mnist-sit` at 32 px, patch 4 (64 tokens), width 256 x depth 4 x 4 heads: about 5.03M parameters (VAR-d4: 5.05M).
#   BUDGET_MINUTES  training wall time (the trainer stops at max_minutes; max_steps = BUDGET_MINUTES x STEPS_PER_MINUTE
#                   so that the cosine schedule ends near the budget)
#   STEPS_PER_MINUTE  this network's training steps per minute on one core of the reference machine (batch 128)
#   OUT, SEED       the run folder (pipeline in $OUT/final) and the training seed
# Further arguments go to `effigen train` (e.g. --trainer.keep_checkpoints=100 to keep every checkpoint for a curve).
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-10}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-40}
OUT=${OUT:-runs/results/sit}
SEED=${SEED:-0}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 50 ? MAX_STEPS / 10 : 50 ))

$EFFIGEN train --preset mnist-sit \
  --network.hidden_size=256 --network.depth=4 --network.num_heads=4 --network.patch_size=4 \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * MAX_STEPS ))" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false "$@"
