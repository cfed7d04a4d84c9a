#!/usr/bin/env bash
# lamamba: LaMamba-Diff (2408.02615), the U-Net of SS2D (2-D selective scan, snake paths) + Swin window attention
# blocks in place of the DiT, with LaMamba's own objective (DDPM, learned variance, as DiT) and the DDIM 50 sampler of
# dit-ddpm.sh. Preset `mnist-lamamba` at 32 px: LaMamba-Ti/4 (patch 4: an 8x8 grid as DiT-Ti/4; three levels, widths
# 64/128/128, window 4): about 5.16M parameters (VAR-d4: 5.05M; the DiT recipes: 5.03M; DiCo-Ti: 4.98M).
#   BUDGET_MINUTES  training wall time (the trainer stops at max_minutes; max_steps = BUDGET_MINUTES x STEPS_PER_MINUTE
#                   so that the cosine schedule ends near the budget)
#   STEPS_PER_MINUTE  this network's training steps per minute on one core of the reference machine; default 40
#                   at this recipe's batch 32 in fp32 (docs/lamamba.md, run 3: 401 steps in 10 minutes on a loaded
#                   core). Batch 32 and fp32 rather than the DiT recipes' 128 and bf16: a batch-128 step of LaMamba-Ti/4
#                   takes 12-29 s (about 40 steps in the budget, too few to leave noise), and bf16 autocast does not
#                   speed up its scan (it adds casts)
#   OUT, SEED       the run folder (pipeline in $OUT/final) and the training seed
#   PREDICTION      noise (LaMamba's eps, the default), velocity or data (see dit-ddpm.sh)
# Further arguments go to `effigen train`.
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-10}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-40}
OUT=${OUT:-runs/results/lamamba}
SEED=${SEED:-0}
PREDICTION=${PREDICTION:-noise}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 50 ? MAX_STEPS / 10 : 50 ))

$EFFIGEN train --preset mnist-lamamba \
  --objective.prediction="$PREDICTION" \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.batch_size=32 --trainer.precision=fp32 \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * MAX_STEPS ))" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false "$@"
