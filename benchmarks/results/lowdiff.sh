#!/usr/bin/env bash
# lowdiff: LowDiff (2509.15342), one network over an 8 -> 16 -> 32 px flow-matching cascade (mode concat: the noise-
# augmented upsample concatenated to the input), SiT's settings otherwise. Preset `mnist-lowdiff` with sit.sh's backbone: DiT blocks of
# width 256 x depth 4 x 4 heads, patch 4 (4, 16, 64 tokens), 2-D RoPE positions only; Euler, sampler steps [8, 4, 2].
#   BUDGET_MINUTES  training wall time (the trainer stops at max_minutes; max_steps = BUDGET_MINUTES x STEPS_PER_MINUTE)
#   STEPS_PER_MINUTE  this network's training steps per minute on one core (batch 128); every step trains all three
#                   stages, about 1.3x the tokens of sit.sh's step
#   OUT, SEED       the run folder (pipeline in $OUT/final) and the training seed
# Further arguments go to `effigen train`.
set -euo pipefail
# SCHEDULE_CLOCK=time (what `effigen report` uses): the cosine spans the time budget, so every method trains for
# all of it, and the step count from STEPS_PER_MINUTE is only a cap at 4x (it still sets warm-up and stage splits)
STEP_CAP=$([ "${SCHEDULE_CLOCK:-steps}" = time ] && echo 4 || echo 1)
BUDGET_MINUTES=${BUDGET_MINUTES:-10}
STEPS_PER_MINUTE=${STEPS_PER_MINUTE:-30}
OUT=${OUT:-runs/results/lowdiff}
SEED=${SEED:-0}
EFFIGEN=${EFFIGEN:-effigen}
MAX_STEPS=$(awk -v m="$BUDGET_MINUTES" -v r="$STEPS_PER_MINUTE" 'BEGIN { print int(m * r) + 1 }')
WARMUP=$(( MAX_STEPS / 10 < 50 ? MAX_STEPS / 10 : 50 ))

$EFFIGEN train --preset mnist-lowdiff \
  --network.backbone_config='{depth: 4, hidden_size: 256, num_heads: 4, patch_size: 4, rope: true, any_resolution: true}' \
  --trainer.output_dir="$OUT" --trainer.seed="$SEED" \
  --trainer.max_minutes="$BUDGET_MINUTES" --trainer.budget_clock="${BUDGET_CLOCK:-wall}" --trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * MAX_STEPS ))" --trainer.warmup_steps="$WARMUP" \
  --trainer.sample_every=0 --trainer.checkpoint_every=100 --trainer.progress=false "$@"
