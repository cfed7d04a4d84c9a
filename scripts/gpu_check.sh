#!/usr/bin/env bash
# CUDA-path checks for a machine with a GPU (torch with CUDA already installed; effigen from src/).
# Usage: bash scripts/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONPATH=src
py=python3
run() { echo "+ $*"; "$@" 2>&1 | grep -v -E "it/s\]|step/s\]|img/s\]" | tail -25; echo "exit ${PIPESTATUS[0]}"; }
nvidia-smi --query-gpu=name,memory.total --format=csv
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
common="--preset smoke --data.name=shapes --data.resolution=32 --network_preset=DiT-Ti/4 --trainer.device=cuda --trainer.batch_size=64 --trainer.progress=false --trainer.log_every=50"
run $py -m effigen train $common --trainer.precision=fp16 --trainer.max_steps=150 --trainer.output_dir=$out/fp16
run $py -m effigen train $common --trainer.precision=bf16 --trainer.max_steps=150 --trainer.output_dir=$out/bf16
run $py -m effigen train $common --trainer.precision=bf16 --trainer.compile=true --trainer.max_steps=30 --trainer.output_dir=$out/compiled
# exact resume on GPU (same step count, fresh process) and fp16 scaler state round trip
run $py -m effigen train $common --trainer.precision=fp16 --trainer.max_steps=200 --trainer.output_dir=$out/fp16
run $py -m effigen sample --from $out/bf16/final --device cuda --precision bf16 --num 32 --out $out/grid_bf16.png
run $py -m effigen bench --from $out/bf16/final --device cuda --precision both --batch-size 64 --peak-size 8192 --json $out/bench.json
run $py -m effigen eval --from $out/bf16/final --device cuda --num 1000 --ref-split test --json $out/eval.json
tail -2 $out/fp16/metrics.jsonl $out/bf16/metrics.jsonl
