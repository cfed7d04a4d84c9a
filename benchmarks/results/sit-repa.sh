#!/usr/bin/env bash
# sit-repa: SiT (sit.sh: same network, data, budget and sampler) + REPA (2410.06940), preset mnist-sit-repa: the output
# tokens of block 2 of 4 (1-indexed, REPA's encoder_depth at a third of the depth, as its B/2 ablation's 4 of 12) through
# a 3-layer projector, negative-cosine aligned (weight 0.5) to the built-in mnist-vit teacher's patch tokens on the same
# 8x8 grid.
#   BUDGET_MINUTES, OUT, SEED, STEPS_PER_MINUTE as sit.sh: the teacher forward and the projector add little to a step
#   on one core (docs/alignment.md), and the 10-minute wall budget stops a slower run early (further arguments go to
#   `effigen train`)
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-10}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-40}
OUT=${OUT:-runs/results/sit-repa}
SEED=${SEED:-0}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 50 ? MAX_STEPS / 10 : 50 ))

$EFFIGEN train --preset mnist-sit-repa \
  --network.hidden_size=256 --network.depth=4 --network.num_heads=4 --network.patch_size=4 \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * MAX_STEPS ))" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false "$@"
