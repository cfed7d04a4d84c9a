#!/usr/bin/env bash
# raster-ar: LlamaGen-style raster-scan next-token AR (2406.06525), GPT-S (5.09M parameters) on the single-scale VQ
# tokenizer (64 tokens), constant guidance.
# Needs the tokenizer first: benchmarks/results/tokenizer-vq.sh (TOKENIZER = its $OUT/final).
#   BUDGET_MINUTES, STEPS_PER_MINUTE (one core, batch 32), OUT (pipeline in $OUT/final), SEED, TOKENIZER
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-10}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-93}
OUT=${OUT:-runs/results/raster-ar}
SEED=${SEED:-0}
TOKENIZER=${TOKENIZER:-runs/results/tokenizer-vq/final}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 100 ? MAX_STEPS / 10 : 100 ))

$EFFIGEN train --preset mnist-raster-ar --tokenizer="$TOKENIZER" \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * MAX_STEPS ))" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false
