"""The fused C kernels of `effigen.nn.cpu_kernels` on and off, and LightningDiT against DiT, in one process.

    python benchmarks/kernels_ab.py --models DiT-B/2 LightningDiT-B/2 --batch-size 16 --steps 2 --rounds 5
    python benchmarks/kernels_ab.py --models DiT-B/2 LightningDiT-B/2 VAR-d16 HMAR-d16 --rounds 3

Each model is `benchmarks/profile_sampling.py`'s random-weight sampling call (bf16, latents only, guidance on). The
rows (model x kernels on/off) run interleaved, round after round, after one warm-up call each, so a slow minute of
the shared machine hits every row alike; the medians give each model's speed-up from the kernels (the eager or
oneDNN-epilogue ops they replace: RoPE, tanh-GELU, GroupNorm+SiLU) and, where both DiT-B/2 and LightningDiT-B/2 run,
LightningDiT's images/s relative to DiT's (equal FLOPs by construction: issue #23 asks for >= 1.0x).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_sampling import MODELS, build  # noqa: E402

from effigen.bench.throughput import count_flops, environment, measure_matmul_peak  # noqa: E402
from effigen.nn import cpu_kernels  # noqa: E402
from effigen.runtime import tune_cpu_allocator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["DiT-B/2", "LightningDiT-B/2"], choices=MODELS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="DiT-family sampling steps")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        raise SystemExit(f"the C kernels are unavailable here: {cpu_kernels.unavailable_reason()}")
    env = environment("cpu")
    print(f"# {env.get('cpu_name')} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
          f"allocator: {env.get('cpu_allocator')} | {env.get('cpu_kernels')} | batch {args.batch_size}, bf16")
    labels = torch.arange(args.batch_size) % 1000
    pipes = {name: build(name, args.steps) for name in args.models}

    def call(name: str) -> None:
        pipeline, extra = pipes[name]
        pipeline(labels, seed=0, batch_size=args.batch_size, precision="bf16", **extra)

    flops = {}
    for name in args.models:
        flops[name], _ = count_flops(lambda: call(name))
    rows = [(name, on) for name in args.models for on in (True, False)]
    times: dict = {row: [] for row in rows}
    for round_ in range(args.rounds + 1):
        for name, on in rows:
            cpu_kernels.set_enabled(on)
            start = time.perf_counter()
            call(name)
            if round_:  # round 0 warms up
                times[(name, on)].append(time.perf_counter() - start)
    cpu_kernels.set_enabled(True)
    peak = measure_matmul_peak("bf16", "cpu", 4096, 2.0)
    print(f"# bf16 matmul peak after the runs: {peak / 1e12:.2f} TFLOP/s (4096^3, best 0.1 s chunk of 2 s)")
    print("| model | kernels | s / call (median) | range | images/s | TFLOP/s | % of peak | on / off |")
    print("|---|---|---|---|---|---|---|---|")
    median = {row: statistics.median(v) for row, v in times.items()}
    for name, on in rows:
        t = median[(name, on)]
        ratio = f"{median[(name, False)] / t:.2f}x" if on else ""
        print(f"| {name} | {'on' if on else 'off'} | {t:.3f} | {min(times[(name, on)]):.3f}-{max(times[(name, on)]):.3f} "
              f"| {args.batch_size / t:.2f} | {flops[name] / t / 1e12:.2f} | {100 * flops[name] / t / peak:.1f}% "
              f"| {ratio} |")
    if "DiT-B/2" in pipes and "LightningDiT-B/2" in pipes:
        for on in (True, False):
            ratio = median[("DiT-B/2", on)] / median[("LightningDiT-B/2", on)]
            print(f"LightningDiT-B/2 / DiT-B/2 images/s, kernels {'on' if on else 'off'}: {ratio:.2f}x "
                  f"(FLOPs {flops['LightningDiT-B/2'] / flops['DiT-B/2']:.3f}x)")


if __name__ == "__main__":
    main()
