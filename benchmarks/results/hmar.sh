#!/usr/bin/env bash
# hmar: HMAR (2506.04421), HMAR-d4 (5.12M parameters) on the multi-scale VQ tokenizer, both training stages inside ONE
# budget: stage 1 (block-diagonal next-scale prediction) for STAGE1_FRACTION of it, then stage 2 (the masked-refinement
# fine-tune of the mask branch, started from stage 1's folder) for the rest. The pipeline is stage 2's ($OUT/final).
# Needs the tokenizer first: benchmarks/results/tokenizer-msvq.sh (TOKENIZER = its $OUT/final).
#   BUDGET_MINUTES, STEPS_PER_MINUTE (one core, batch 32), OUT, SEED, TOKENIZER, STAGE1_FRACTION
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-10}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-55}
OUT=${OUT:-runs/results/hmar}
SEED=${SEED:-0}
TOKENIZER=${TOKENIZER:-runs/results/tokenizer-msvq/final}
STAGE1_FRACTION=${STAGE1_FRACTION:-0.75}  # the presets' ratio: 22 + 8 minutes
EFFIGEN=${EFFIGEN:-effigen}
STAGE1_MINUTES=$(awk -v m="$BUDGET_MINUTES" -v f="$STAGE1_FRACTION" 'BEGIN { print m * f }')
STAGE2_MINUTES=$(awk -v m="$BUDGET_MINUTES" -v f="$STAGE1_FRACTION" 'BEGIN { print m * (1 - f) }')
STAGE1_STEPS=$(awk -v m="$STAGE1_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
STAGE2_STEPS=$(awk -v m="$STAGE2_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')

# stage 1: next-scale prediction (the mask branch is not trained)
$EFFIGEN train --preset mnist-hmar --tokenizer="$TOKENIZER" \
  --trainer.output_dir="$OUT/stage1" --trainer.seed="$SEED" \
  --trainer.max_minutes="$STAGE1_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * STAGE1_STEPS ))" \
  --trainer.warmup_steps=$(( STAGE1_STEPS / 10 < 100 ? STAGE1_STEPS / 10 : 100 )) \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false

# stage 2: masked refinement, initialised from stage 1
$EFFIGEN train --preset mnist-hmar-mask --tokenizer="$TOKENIZER" --init_from="$OUT/stage1/final" \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$STAGE2_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * STAGE2_STEPS ))" \
  --trainer.warmup_steps=$(( STAGE2_STEPS / 10 < 50 ? STAGE2_STEPS / 10 : 50 )) \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false
