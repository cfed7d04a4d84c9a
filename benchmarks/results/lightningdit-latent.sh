#!/usr/bin/env bash
# lightningdit-latent: LightningDiT (2501.01423) in the latent space of a KL-VAE (preset `mnist-lightningdit-latent`,
# method dit-flow, experiment key `tokenizer`), width 256 x depth 4 x 4 heads as the pixel-space DiTs; the patch size is
# the preset's (it depends on the latent grid), so the parameter count is reported by the driver, not assumed.
# Needs the tokenizer first: benchmarks/results/tokenizer-klvae.sh (TOKENIZER = its $OUT/final).
#   BUDGET_MINUTES, STEPS_PER_MINUTE (one core, the preset's batch), OUT (pipeline in $OUT/final), SEED, TOKENIZER
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-10}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-40}
OUT=${OUT:-runs/results/lightningdit-latent}
SEED=${SEED:-0}
TOKENIZER=${TOKENIZER:-runs/results/tokenizer-klvae/final}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 50 ? MAX_STEPS / 10 : 50 ))

$EFFIGEN train --preset mnist-lightningdit-latent --tokenizer="$TOKENIZER" \
  --network.hidden_size=256 --network.depth=4 --network.num_heads=4 \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * MAX_STEPS ))" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false
