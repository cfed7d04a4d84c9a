#!/usr/bin/env bash
# Prerequisite tokenizer: VAR's multi-scale residual VQ-VAE (32 px -> 7 scales, 155 tokens, 512 codes), used by var and hmar.
# Preset `mnist-msvq`; trained for its own budget, smaller than the generators' (the driver passes BUDGET_MINUTES = the
# tokenizer budget of `effigen.report`: 0.5 min for --budget smoke, 6 min for --budget full). Its training time is
# reported separately, not added to the generators' budget.
#   BUDGET_MINUTES, STEPS_PER_MINUTE (one core, batch 64), OUT (pipeline in $OUT/final), SEED
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-6}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-85}
OUT=${OUT:-runs/results/tokenizer-msvq}
SEED=${SEED:-0}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 50 ? MAX_STEPS / 10 : 50 ))

$EFFIGEN train --preset mnist-msvq \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * MAX_STEPS ))" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false
