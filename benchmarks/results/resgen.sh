#!/usr/bin/env bash
# resgen: ResGen (2412.10208), ResGen-d4 (4.93M parameters: VAR-d4's blocks plus a 16-component low-rank mixture-of-Gaussians
# head) on the residual-VQ tokenizer: masked prediction over the position x depth grid of the summed embeddings of the
# masked depths; 16 sampling steps whatever the depth. Needs the tokenizer first: benchmarks/results/tokenizer-rvq.sh
# (TOKENIZER = its $OUT/final; DEPTH=8 there for the resgen-rvq8 row).
#   BUDGET_MINUTES, STEPS_PER_MINUTE (one core, batch 32), OUT, SEED, TOKENIZER
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-10}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-60}
OUT=${OUT:-runs/results/resgen}
SEED=${SEED:-0}
TOKENIZER=${TOKENIZER:-runs/results/tokenizer-rvq/final}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 100 ? MAX_STEPS / 10 : 100 ))

$EFFIGEN train --preset mnist-resgen --tokenizer="$TOKENIZER" \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * MAX_STEPS ))" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false
