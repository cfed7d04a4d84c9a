#!/usr/bin/env bash
# Prerequisite tokenizer of detailflow: DetailFlow's 1D coarse-to-fine tokenizer (2505.21473), DetailFlow-S (a 3-layer
# ViT encoder with TOKENS causal latent queries in groups of 4, 512 l2-normalised codes of dim 8, a 3-layer ViT prefix
# decoder; 32 px, 4 px patches), trained on degraded prefixes (probability 0.2, power 1.5) with self-correction.
# Preset `mnist-detailflow-tokenizer` with network preset DetailFlow-S (TOKENS=32) or DetailFlow-S-64; trained for the
# tokenizer budget of `effigen.report`, reported separately from the generators' budget.
#   BUDGET_MINUTES, STEPS_PER_MINUTE (one core, batch 64; measured ~30 with the other core busy), OUT (pipeline in
#   $OUT/final), SEED, TOKENS
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-6}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-30}
OUT=${OUT:-runs/results/tokenizer-detailflow}
SEED=${SEED:-0}
TOKENS=${TOKENS:-32}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 50 ? MAX_STEPS / 10 : 50 ))
CONTINUOUS=$(( MAX_STEPS / 4 < 150 ? MAX_STEPS / 4 : 150 ))  # the unquantised warm-up (ours; docs/detailflow.md)
case "$TOKENS" in  # network presets DetailFlow-S (32 tokens) and DetailFlow-S-64
  32) NETWORK=DetailFlow-S ;;
  64) NETWORK=DetailFlow-S-64 ;;
  *) echo "TOKENS must be 32 or 64, got $TOKENS" >&2; exit 2 ;;
esac

$EFFIGEN train --preset mnist-detailflow-tokenizer --network_preset="$NETWORK" --objective.continuous_steps="$CONTINUOUS" \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * MAX_STEPS ))" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false
