#!/usr/bin/env bash
# bfm: Blockwise Flow Matching (2510.21167), BFM-Ti/4 (4.93M parameters; the DiT recipes: 5.03M): 3 time segments x 2
# velocity blocks, a 3-block SemFeat trunk aligned to the built-in mnist-vit teacher (weight 0.05, the official one),
# a 1-block FRN. Both training stages inside ONE budget: stage 1 (`mnist-bfm`: segment velocity + alignment) for
# STAGE1_FRACTION of it, then the FRA stage (`mnist-bfm-fra`: only the FRN trains, on the frozen stage-1 model, started
# from stage 1's folder) for the rest. The pipeline is stage 2's ($OUT/final): Euler, 12 steps (4 per segment), cfg 2,
# the full trunk once per segment and the FRN at the other steps (`--sampler.fra=false` samples as stage 1).
#   BUDGET_MINUTES  training wall time of both stages together
#   STEPS_PER_MINUTE  stage 1's training steps per minute on one core (batch 128): sit.sh's 40 x 1/1.08, the measured
#                   step-cost ratio BFM-Ti/4 : SiT width 256 (benchmarks/lowdiff_pareto.py --step-time
#                   --step-time-models bfm; docs/bfm.md)
#   FRA_STEPS_PER_MINUTE  the FRA stage's (only the 1-block FRN gets gradients; the trunk runs twice without): 2.5x
#   OUT, SEED, STAGE1_FRACTION
# Further arguments go to both `effigen train` commands.
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-10}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-37}
FRA_STEPS_PER_MINUTE=${FRA_STEPS_PER_MINUTE:-100}
OUT=${OUT:-runs/results/bfm}
SEED=${SEED:-0}
STAGE1_FRACTION=${STAGE1_FRACTION:-0.85}
EFFIGEN=${EFFIGEN:-effigen}
STAGE1_MINUTES=$(awk -v m="$BUDGET_MINUTES" -v f="$STAGE1_FRACTION" 'BEGIN { print m * f }')
STAGE2_MINUTES=$(awk -v m="$BUDGET_MINUTES" -v f="$STAGE1_FRACTION" 'BEGIN { print m * (1 - f) }')
STAGE1_STEPS=$(awk -v m="$STAGE1_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
STAGE2_STEPS=$(awk -v m="$STAGE2_MINUTES" -v r="$FRA_STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')

# stage 1: per-segment velocity + SemFeat alignment (the FRN is not trained)
$EFFIGEN train --preset mnist-bfm \
  --trainer.output_dir="$OUT/stage1" --trainer.seed="$SEED" \
  --trainer.max_minutes="$STAGE1_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * STAGE1_STEPS ))" \
  --trainer.warmup_steps=$(( STAGE1_STEPS / 10 < 50 ? STAGE1_STEPS / 10 : 50 )) \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false "$@"

# stage 2: feature residual approximation on the frozen stage-1 model
$EFFIGEN train --preset mnist-bfm-fra --init_from="$OUT/stage1/final" \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$STAGE2_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * STAGE2_STEPS ))" \
  --trainer.warmup_steps=$(( STAGE2_STEPS / 10 < 40 ? STAGE2_STEPS / 10 : 40 )) \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false "$@"
