#!/usr/bin/env bash
# sit-haste: SiT + HASTE (2505.16792), preset mnist-sit-haste: REPA as sit-repa.sh plus attention alignment of student
# blocks 0-1 to the teacher's last two blocks (cross-entropy of the attention distributions, weight 0.5), both terms
# stopped after the first third of the steps (HASTE's termination, at 250K steps of its SiT-XL/2 run).
#   BUDGET_MINUTES, OUT, SEED, STEPS_PER_MINUTE as sit.sh (further arguments go to `effigen train`)
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-10}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-40}
OUT=${OUT:-runs/results/sit-haste}
SEED=${SEED:-0}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 50 ? MAX_STEPS / 10 : 50 ))

$EFFIGEN train --preset mnist-sit-haste \
  --network.hidden_size=256 --network.depth=4 --network.num_heads=4 --network.patch_size=4 \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * MAX_STEPS ))" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false \
  --align.stop_step="$(( MAX_STEPS / 3 ))" "$@"
