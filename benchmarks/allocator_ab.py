"""Sampling speed with glibc's default malloc thresholds against `effigen.runtime.tune_cpu_allocator`, per model.

    python benchmarks/allocator_ab.py --model DiT-B/2 --batch-size 16 --steps 2 --rounds 3
    python benchmarks/allocator_ab.py --model all --rounds 2

The tuning is process-wide and cannot be undone in-process, so every measurement is a child process of this script
(`EFFIGEN_CPU_ALLOCATOR=default` or `tuned`), the two settings alternating round by round so that load changes on the
machine hit both alike. Each child builds the random-weight network of `benchmarks/profile_sampling.py` (the same
models: DiT-B/2, DiT-XL/2, LightningDiT-B/2 latents with guidance; VAR-d16 / HMAR-d16 latents, cfg, top-k/top-p),
runs one warm-up call and `--calls` timed ones in bf16 (or --precision), and reports its median; the parent prints
every child's median, the medians over rounds and the ratio default / tuned (> 1: the tuning is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(args: argparse.Namespace) -> None:
    from effigen.runtime import cpu_allocator_tuned, tune_cpu_allocator

    tune_cpu_allocator()  # follows EFFIGEN_CPU_ALLOCATOR, set by the parent
    import torch

    sys.path.insert(0, str(HERE))
    from profile_sampling import build

    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline, kwargs = build(args.model, args.steps)
    labels = torch.arange(args.batch_size) % 1000
    times = []
    for i in range(args.calls + 1):
        started = time.perf_counter()
        pipeline(labels, seed=0, batch_size=args.batch_size, precision=args.precision, **kwargs)
        if i:
            times.append(time.perf_counter() - started)
    print(json.dumps({"tuned": cpu_allocator_tuned(), "median_s": statistics.median(times), "times": times}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-B/2", help="a profile_sampling.py model, or all")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="DiT-family sampling steps")
    parser.add_argument("--calls", type=int, default=2, help="timed calls per child (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="children per setting, alternating")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(HERE))
    from profile_sampling import MODELS

    from effigen.bench.throughput import environment

    env = environment("cpu")
    print(f"{env['cpu_name']}, torch {env['torch_version']}, {args.threads or env['threads']} threads; "
          f"{args.precision}, batch {args.batch_size}; {args.rounds} rounds x {args.calls} calls per setting")
    models = MODELS if args.model == "all" else (args.model,)
    for model in models:
        medians: dict[str, list[float]] = {"default": [], "tuned": []}
        for _ in range(args.rounds):
            for setting in medians:
                command = [sys.executable, __file__, "--child", "--model", model, "--precision", args.precision,
                           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--calls",
                           str(args.calls)] + (["--threads", str(args.threads)] if args.threads else [])
                result = subprocess.run(command, env={**os.environ, "EFFIGEN_CPU_ALLOCATOR": setting},
                                        capture_output=True, text=True)
                if result.returncode:
                    raise SystemExit(f"{model} ({setting}) failed:\n{result.stderr[-2000:]}")
                report = json.loads(result.stdout.strip().splitlines()[-1])
                if report["tuned"] != (setting == "tuned"):
                    raise SystemExit(f"{model}: the child's allocator is not {setting} (not glibc?)")
                medians[setting].append(report["median_s"])
        default, tuned = (statistics.median(medians[s]) for s in ("default", "tuned"))
        print(f"{model:<18} default {default:7.2f} s/call {[round(t, 2) for t in medians['default']]}  "
              f"tuned {tuned:7.2f} s/call {[round(t, 2) for t in medians['tuned']]}  default / tuned {default / tuned:.2f}x")


if __name__ == "__main__":
    main()
