#!/usr/bin/env bash
# dico: DiCo (2505.11196), the conv U-Net (no patchify, compact channel attention) in place of the DiT, with DiCo's own
# objective (DDPM, learned variance, as DiT) and the DDIM 50 sampler of dit-ddpm.sh.
# Preset `mnist-dico` at 32 px: DiCo-Ti (width 64, levels 64/128/256 channels, two blocks per level): about 4.98M
# parameters (VAR-d4: 5.05M; the DiT recipes: 5.03M).
#   BUDGET_MINUTES  training wall time (the trainer stops at max_minutes; max_steps = BUDGET_MINUTES x STEPS_PER_MINUTE
#                   so that the cosine schedule ends near the budget)
#   STEPS_PER_MINUTE  this network's training steps per minute on one core of the reference machine (batch 128);
#                   the default is the DiT recipes' 40 (docs/dico.md has the measured DiT : DiCo step-cost ratio)
#   OUT, SEED       the run folder (pipeline in $OUT/final) and the training seed
#   PREDICTION      noise (DiCo's eps, the default), velocity or data (see dit-ddpm.sh)
# Further arguments go to `effigen train`.
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-10}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-40}
OUT=${OUT:-runs/results/dico}
SEED=${SEED:-0}
PREDICTION=${PREDICTION:-noise}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 50 ? MAX_STEPS / 10 : 50 ))

$EFFIGEN train --preset mnist-dico \
  --objective.prediction="$PREDICTION" \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * MAX_STEPS ))" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false "$@"
