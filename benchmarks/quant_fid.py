"""FID of quantized copies of trained pipelines: full precision, plain PTQ and EfficientDM at several bit widths, with
folder size, sampling images/s and peak memory, in ONE process.

    python benchmarks/quant_fid.py --from runs/mnist-dit/final runs/mnist-lightningdit/final --out runs/quant
    python benchmarks/quant_fid.py --from DIR --bits w8a8 w4a8 w4a4 --num-images 1000 --epochs 16 --json q.json

For every source folder and bit width it runs `effigen.post.quantize` twice (mode ptq, mode efficientdm) into
`--out/<source name>-<bits>-<mode>`, reusing folders that exist, then scores every folder with the built-in feature
net of the dataset (mnist-net on MNIST; `report.quality_metrics`: class-balanced labels, the same seed for all) and
times sampling of all folders interleaved in this process (`bench.throughput.benchmark_runs`, fp32 for the quantized
ones, fp32 and bf16 for the sources). The FID here uses `--num-images` samples: compare rows with each other, not
with pages that use another count.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from effigen.bench.throughput import benchmark_runs
from effigen.eval.evaluate import default_extractor_for, load_extractor
from effigen.pipeline import Pipeline
from effigen.post.quantize import QuantizeSettings, folder_bytes, quantize
from effigen.report import quality_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="sources", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--bits", nargs="+", default=["w8a8", "w4a8", "w4a4"])
    parser.add_argument("--modes", nargs="+", default=["ptq", "efficientdm"])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--bench-batch-size", type=int, default=16)
    parser.add_argument("--bench-repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for source in map(Path, args.sources):
        name = source.parent.name if source.name == "final" else source.name
        rows.append({"name": name, "bits": "fp32", "mode": "-", "folder": source, "quantize_seconds": 0.0})
        for bits in args.bits:
            for mode in args.modes:
                folder = out / f"{name}-{bits}-{mode}"
                started = time.perf_counter()
                if not (folder / "model_index.json").is_file():
                    quantize(source, folder, QuantizeSettings(bits=bits, mode=mode, epochs=args.epochs), progress=False)
                rows.append({"name": name, "bits": bits, "mode": mode, "folder": folder,
                             "quantize_seconds": round(time.perf_counter() - started, 1)})
    extractor = None
    for row in rows:
        pipeline = Pipeline.from_pretrained(row["folder"])
        extractor = extractor or load_extractor(default_extractor_for(pipeline.info.get("dataset")))
        quality = quality_metrics(pipeline, args.num_images, 0, "fp32", extractor)
        row.update(fid=quality["metrics"]["fid"], generation_seconds=round(quality["generation_seconds"], 1),
                   generator_bytes=folder_bytes(Path(row["folder"]) / "generator"))
        print(f"{row['name']:>14} {row['bits']:>5} {row['mode']:>11}: FID {row['fid']:.2f}", flush=True)
    pipelines = [Pipeline.from_pretrained(r["folder"]) for r in rows]
    runs = [(p, "fp32") for p in pipelines] + [(p, "bf16") for p, r in zip(pipelines, rows) if r["bits"] == "fp32"]
    speed = benchmark_runs(runs, batch_size=args.bench_batch_size, repeats=args.bench_repeats)
    for row, s in zip(rows, speed):
        row.update(images_per_second=s["images_per_second"], peak_memory_bytes=s["peak_memory_bytes"])
    bf16 = {r["name"]: s["images_per_second"] for r, s in zip([r for r in rows if r["bits"] == "fp32"], speed[len(rows):])}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\nCPU: {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads; FID over {args.num_images} samples "
          f"(mnist-net), sampler as saved in each folder; images/s at batch {args.bench_batch_size}")
    print("| model | bits | mode | FID | generator MB | img/s (fp32 run) | vs FP fp32 | vs FP bf16 | peak MB | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fp = {r["name"]: r for r in rows if r["bits"] == "fp32"}
    for r in rows:
        base = fp[r["name"]]
        print(f"| {r['name']} | {r['bits']} | {r['mode']} | {r['fid']:.2f} | {r['generator_bytes'] / 1e6:.3f} | "
              f"{r['images_per_second']:.1f} | {r['images_per_second'] / base['images_per_second']:.2f}x | "
              f"{r['images_per_second'] / bf16[r['name']]:.2f}x | {r['peak_memory_bytes'] / 2 ** 20:.1f} | "
              f"{r['quantize_seconds']:.0f} |")
    for name, value in bf16.items():
        print(f"| {name} | bf16 autocast | - | (as fp32) | | {value:.1f} | {value / fp[name]['images_per_second']:.2f}x | 1.00x | | |")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: str(v) if isinstance(v, Path) else v for k, v in r.items()}
                                               for r in rows], indent=2))


if __name__ == "__main__":
    main()
