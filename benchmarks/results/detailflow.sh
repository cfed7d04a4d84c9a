#!/usr/bin/env bash
# detailflow: DetailFlow (2505.21473), DetailFlow-GPT-S (5.09M parameters: LlamaGen blocks, width 256, depth 6) over the
# 1D coarse-to-fine tokens of the DetailFlow tokenizer: group-causal next-detail prediction (4 causal tokens, then groups
# of 4 in parallel: 11 forward passes for 32 tokens, 19 for 64), self-correction on 30% of the samples, constant CFG.
# Needs the tokenizer first: benchmarks/results/tokenizer-detailflow.sh (TOKENIZER = its $OUT/final; TOKENS=64 there for
# the detailflow-64 row; the generator reads the token count off the tokenizer).
#   BUDGET_MINUTES, STEPS_PER_MINUTE (one core, batch 32), OUT, SEED, TOKENIZER
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-10}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-110}
OUT=${OUT:-runs/results/detailflow}
SEED=${SEED:-0}
TOKENIZER=${TOKENIZER:-runs/results/tokenizer-detailflow/final}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 100 ? MAX_STEPS / 10 : 100 ))

$EFFIGEN train --preset mnist-detailflow --tokenizer="$TOKENIZER" \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * MAX_STEPS ))" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false
