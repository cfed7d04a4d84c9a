#!/usr/bin/env bash
# efficientdm: low-bit copies of a trained generator (`effigen quantize`, post/quantize.py): plain post-training
# quantization (MODE=ptq, the baseline) or EfficientDM (2310.03270; MODE=efficientdm: QALoRA + per-timestep activation
# steps, distilled from the full-precision model's own guided sampling trajectories, no data). First and last layers
# stay W8A8. Needs the base generator first (the report's `base`, e.g. benchmarks/results/dit-flow.sh).
#   BASE            the full-precision pipeline folder
#   BITS, MODE      e.g. w4a8 + efficientdm, w4a4 + efficientdm, w4a8 + ptq
#   EPOCHS          EfficientDM trajectories (one update per network call on each); not part of the training budget,
#                   its wall time is reported
#   OUT, SEED       the run folder (pipeline in $OUT/final) and the seed; BUDGET_MINUTES is ignored (no training)
set -euo pipefail
BASE=${BASE:-runs/results/dit-flow/final}
BITS=${BITS:-w4a8}
MODE=${MODE:-efficientdm}
EPOCHS=${EPOCHS:-16}
OUT=${OUT:-runs/results/dit-flow-$BITS}
SEED=${SEED:-0}
EFFIGEN=${EFFIGEN:-effigen}

$EFFIGEN quantize --from "$BASE" --bits "$BITS" --mode "$MODE" --epochs "$EPOCHS" --batch-size 8 --seed "$SEED" \
  --no-progress --out "$OUT/final"
