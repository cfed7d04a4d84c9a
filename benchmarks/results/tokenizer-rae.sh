#!/usr/bin/env bash
# Prerequisite tokenizer: RAE (2510.11690) on MNIST 32 px, used by dit-dh: the frozen built-in mnist-vit teacher
# (8x8x128 patch tokens, LayerNorm without affine, per-element statistics calibrated at the end) + a 4-block ViT decoder
# trained with L1 + perceptual (mnist-net's early stages) on latents noised with sigma ~ 0.8 U(0, 1). Preset `mnist-rae`;
# trained for the tokenizer budget of `effigen.report` (0.5 min smoke, 6 min full), reported apart from the generators'.
#   BUDGET_MINUTES, STEPS_PER_MINUTE (one core, the preset's batch), OUT (pipeline in $OUT/final), SEED
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-6}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-70}
OUT=${OUT:-runs/results/tokenizer-rae}
SEED=${SEED:-0}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 50 ? MAX_STEPS / 10 : 50 ))

$EFFIGEN train --preset mnist-rae \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * MAX_STEPS ))" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false
