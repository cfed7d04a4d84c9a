#!/usr/bin/env bash
# Prerequisite tokenizer: the KL-VAE (SD-VAE architecture, L1 + KL) on MNIST 32 px, used by lightningdit-latent.
# Preset `mnist-klvae`; trained for its own budget, smaller than the generators' (the driver passes BUDGET_MINUTES = the
# tokenizer budget of `effigen.report`: 0.5 min for --budget smoke, 6 min for --budget full). Its training time is
# reported separately, not added to the generators' budget.
#   BUDGET_MINUTES, STEPS_PER_MINUTE (one core, the preset's batch), OUT (pipeline in $OUT/final), SEED
set -euo pipefail
BUDGET_MINUTES=${BUDGET_MINUTES:-6}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-80}
OUT=${OUT:-runs/results/tokenizer-klvae}
SEED=${SEED:-0}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 50 ? MAX_STEPS / 10 : 50 ))

$EFFIGEN train --preset mnist-klvae \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.max_steps="$MAX_STEPS" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false
