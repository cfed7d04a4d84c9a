"""`effigen bench`: images/s, latency, peak memory, parameters, evaluations and FLOPs of a pipeline's full
sampling call, and the achieved fraction of this machine's matrix-multiply peak, all measured in this process.

    effigen bench --from runs/mnist-dit/final
    effigen bench --from runs/mnist-dit/final --precision both --json bench.json
    effigen bench --from runs/new/final --vs runs/old/final --steps 10 --cfg-scale 1.0

With --vs the two pipelines (and with --precision both, the two precisions) are timed interleaved,
A, B, A, B, ..., and the ratios A / B are printed (images/s > 1x: A is faster). What each figure
measures is described in effigen/bench/throughput.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..bench.throughput import RATIO_KEYS, benchmark_runs, compare, environment, measure_matmul_peak
from ..io import CheckpointError
from ..pipeline import MODEL_INDEX, Pipeline
from .main import check_output_file, finite_float, positive_int, select_device_flag, write_output
from .sample import checked_sampler_settings, given_as


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g} ms"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}x"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def results_table(results: list[dict]) -> str:
    header = [""] + [f"{r['name']} {r['precision']}" for r in results]
    rows = [
        ("images/s", lambda r: f"{r['images_per_second']:.4g}"),
        ("latency/batch median", lambda r: _ms(r["latency_median_s"])),
        ("latency min / max", lambda r: f"{_ms(r['latency_min_s'])} / {_ms(r['latency_max_s'])}"),
        ("peak memory (increase)", lambda r: f"{r['peak_memory_bytes'] / 2**20:.1f} MiB"),
        ("peak memory (total)", lambda r: f"{r['peak_memory_total_bytes'] / 2**20:.1f} MiB"),
        ("parameters", lambda r: f"{r['parameters'] / 1e6:.3f} M"),
        ("evaluations/image", lambda r: str(r["evaluations_per_image"])),
        ("FLOPs/image", lambda r: _si(r["flops_per_image"], "FLOP")),
        ("FLOPs/evaluation", lambda r: _si(r["flops_per_evaluation"], "FLOP")),
        ("achieved FLOP/s", lambda r: _si(r["achieved_flops_per_second"], "FLOP/s")),
        ("matmul peak", lambda r: _si(r["matmul_peak_flops_per_second"], "FLOP/s")),
        ("fraction of peak", lambda r: f"{100 * r['peak_fraction']:.3g} %"),
    ]
    return format_table(header, [[name] + [fn(r) for r in results] for name, fn in rows])


RATIO_LABELS = {"images_per_second": "images/s", "latency": "latency/batch", "peak_memory": "peak memory (increase)",
                "flops_per_image": "FLOPs/image", "parameters": "parameters", "peak_fraction": "fraction of peak"}


def ratios_table(title: str, columns: list[str], ratios: list[dict]) -> str:
    rows = [[RATIO_LABELS.get(name, name)] + [_ratio(r[name]) for r in ratios] for name in RATIO_KEYS]
    return f"{title}\n" + format_table([""] + columns, rows)


def load(path: str, device, flag: str) -> Pipeline:
    folder = Path(path)
    if not (folder / MODEL_INDEX).is_file():
        what = "does not exist" if not folder.exists() else f"has no {MODEL_INDEX}"
        raise CheckpointError(f"{flag} {folder}: the folder {what}; pass a pipeline folder such as runs/<name>/final")
    return Pipeline.from_pretrained(folder, device=device)


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="effigen bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="pipeline folder (model_index.json inside)")
    parser.add_argument("--vs", help="a second pipeline folder, benchmarked interleaved with the first")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per sampling call (default 16)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16", "both"], default="fp32",
                        help="autocast precision; `both` runs fp32 and bf16 and prints bf16 / fp32")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed calls per pipeline and precision")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--steps", type=positive_int, help="override the saved number of sampling steps")
    parser.add_argument("--cfg-scale", type=finite_float, help="override the saved guidance scale (1 = no guidance)")
    parser.add_argument("--solver", help="override the saved solver (e.g. euler, heun)")
    parser.add_argument("--time-shift", type=finite_float, help="override the saved time shift")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (default)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); on a busy machine "
                        "fewer threads than cores can be much faster")
    parser.add_argument("--peak-size", type=positive_int, default=4096,
                        help="matrix size of the matmul peak measurement (a square GEMM on all threads)")
    parser.add_argument("--peak-seconds", type=finite_float, default=1.0,
                        help="duration of each matmul peak measurement")
    parser.add_argument("--json", help="write every figure, the settings and the environment to this file")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.peak_seconds <= 0:
        parser.error(f"--peak-seconds must be > 0, got {args.peak_seconds:g}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    device = select_device_flag(args.device)
    if args.json:
        check_output_file(args.json, "--json")  # before the timing, not after it
    folders = {"A": args.source} if args.vs is None else {"A": args.source, "B": args.vs}
    pipelines = {name: load(path, device, "--from" if name == "A" else "--vs") for name, path in folders.items()}
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    overrides = {"num_steps": args.steps, "cfg_scale": args.cfg_scale, "solver": args.solver,
                 "time_shift": args.time_shift}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for pipeline in pipelines.values():  # a bad override fails here, naming its flag, before any timing
        checked_sampler_settings(pipeline, overrides, given_as(overrides, {}))

    env = environment(device)
    threads = f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}"
    print(f"effigen bench: {env['device']} ({env.get('device_name', env['cpu_name'])}), {threads}, "
          f"torch {env['torch_version']}; batch {args.batch_size}, {args.warmup} warm-up + {args.repeats} timed "
          f"calls each{', interleaved' if len(pipelines) * len(precisions) > 1 else ''}")
    for name, path in folders.items():
        print(f"  {name} = {path}")
    peaks = {p: measure_matmul_peak(p, device, args.peak_size, args.peak_seconds) for p in precisions}
    print(f"matmul peak ({args.peak_size}x{args.peak_size}): "
          + ", ".join(f"{p} {_si(v, 'FLOP/s')}" for p, v in peaks.items()))

    runs = [(name, precision) for name in pipelines for precision in precisions]
    results = benchmark_runs([(pipelines[name], precision) for name, precision in runs], args.batch_size,
                             args.repeats, args.warmup, peak_flops_per_second=peaks, **overrides)
    for (name, _), result in zip(runs, results):
        result.update(name=name, path=str(Path(folders[name]).resolve()))
    print()
    print(results_table(results))

    by_key = {(r["name"], r["precision"]): r for r in results}
    comparisons = []
    if "B" in pipelines:
        ratios = [compare(by_key["A", p], by_key["B", p]) for p in precisions]
        comparisons += [{"kind": "vs", "precision": p, "numerator": "A", "denominator": "B", "ratios": r}
                        for p, r in zip(precisions, ratios)]
        print()
        print(ratios_table("ratios A / B (--from / --vs; images/s > 1x: A is faster)", precisions, ratios))
    if len(precisions) == 2:
        ratios = [compare(by_key[name, "bf16"], by_key[name, "fp32"]) for name in pipelines]
        comparisons += [{"kind": "precision", "pipeline": name, "numerator": "bf16", "denominator": "fp32", "ratios": r}
                        for name, r in zip(pipelines, ratios)]
        print()
        print(ratios_table("ratios bf16 / fp32 (images/s > 1x: bf16 is faster)", list(pipelines), ratios))
    print(f"\nmemory: {results[0]['memory_method']}")

    if args.json:
        record = {
            "command": "effigen bench",
            "settings": {"from": args.source, "vs": args.vs, "batch_size": args.batch_size, "precision": args.precision,
                         "precisions": precisions, "repeats": args.repeats, "warmup": args.warmup,
                         "device": str(device), "threads": args.threads, "sampler_overrides": overrides,
                         "peak_matrix_size": args.peak_size, "peak_seconds": args.peak_seconds},
            "environment": env,
            "pipelines": {name: str(Path(path).resolve()) for name, path in folders.items()},
            "matmul_peak_flops_per_second": peaks,
            "results": results,
            "comparisons": comparisons,
        }
        out = Path(args.json)
        write_output("--json", out, lambda: out.write_text(json.dumps(record, indent=2) + "\n"))
        print(f"wrote {out}")
    return 0
