#!/usr/bin/env bash
# dit-dh: RAE's DiT^DH (2510.11690) in the RAE latent of the built-in mnist-vit teacher (preset `mnist-dit-dh`, method
# dit-dh): a LightningDiT encoder 192 wide x 4 deep on the 8x8x128 latent (patch 1: 64 tokens) with a 320-wide DDT head
# block (5.03M parameters, the report's size), logit-normal t with the dimension-dependent shift sqrt(8192 / 256) = 5.66 (base: the 8x8x4 KL latent),
# Euler 50 steps on the same shifted grid, CFG 2.0.
# Needs the tokenizer first: benchmarks/results/tokenizer-rae.sh (TOKENIZER = its $OUT/final).
#   BUDGET_MINUTES, STEPS_PER_MINUTE (one core, the preset's batch), OUT (pipeline in $OUT/final), SEED, TOKENIZER
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-10}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-40}
OUT=${OUT:-runs/results/dit-dh}
SEED=${SEED:-0}
TOKENIZER=${TOKENIZER:-runs/results/tokenizer-rae/final}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 50 ? MAX_STEPS / 10 : 50 ))

$EFFIGEN train --preset mnist-dit-dh --tokenizer="$TOKENIZER" \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * MAX_STEPS ))" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false
