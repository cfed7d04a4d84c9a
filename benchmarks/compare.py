"""Compare trained pipelines side by side in one process: quality (FID, precision, recall, IS on the dataset's
built-in feature net, the same class-balanced labels and seeds for every folder) and sampling speed
(images/s, latency, peak memory, FLOPs and network evaluations per image, all folders timed interleaved).

    python benchmarks/compare.py --from runs/mnist-var/final --from runs/mnist-raster-ar/final \
        --num-images 1000 --precision bf16 --batch-size 64 --json compare.json

Parameters are counted for the generator and the tokenizer separately. The first folder is the baseline of the
ratio columns.
"""

from __future__ import annotations

import argparse
import json

import torch

from effigen.bench.throughput import environment
from effigen.eval.evaluate import default_extractor_for, load_extractor
from effigen.pipeline import Pipeline
from effigen.report import count_parameters as count
from effigen.report import quality_metrics, speed_rows  # the protocol of `effigen report` (docs/results.md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="sources", action="append", required=True, help="pipeline folder (repeat)")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cfg-scales", help="also sweep the guidance scale for quality only, e.g. 1.5,2,3 (speed is "
                        "measured at each folder's saved settings)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipelines = [Pipeline.from_pretrained(source) for source in args.sources]
    dataset = pipelines[0].info.get("dataset")
    extractor = load_extractor(default_extractor_for(dataset))
    rows = []
    for source, pipeline in zip(args.sources, pipelines):
        if pipeline.info.get("dataset") != dataset or pipeline.sample_shape != pipelines[0].sample_shape:
            raise SystemExit(f"{source} was trained on other data or another image size than {args.sources[0]}")
        quality = quality_metrics(pipeline, args.num_images, args.seed, args.precision, extractor)
        rows.append({"folder": source, "method": pipeline.method.name, "generator_parameters": count(pipeline.generator),
                     "tokenizer_parameters": count(pipeline.tokenizer), "metrics": quality["metrics"],
                     "generation_seconds": quality["generation_seconds"]})
    if args.cfg_scales:
        print(f"guidance sweep ({args.num_images} images, {extractor.name}): cfg_scale -> FID / precision / recall")
        for source, pipeline in zip(args.sources, pipelines):
            sweep = {}
            for cfg in (float(c) for c in args.cfg_scales.split(",")):
                m = quality_metrics(pipeline, args.num_images, args.seed, args.precision, extractor, cfg_scale=cfg)["metrics"]
                sweep[cfg] = m
                print(f"  {pipeline.method.name:<12} cfg {cfg:<5} FID {m['fid']:.3f}  precision {m['precision']:.3f}  "
                      f"recall {m['recall']:.3f}", flush=True)
            next(r for r in rows if r["folder"] == source)["cfg_sweep"] = sweep
    speed = speed_rows(pipelines, args.precision, batch_size=args.batch_size, repeats=args.repeats)
    for row, bench in zip(rows, speed):
        row.update({k: bench[k] for k in ("images_per_second", "latency_median_s", "evaluations_per_image",
                                          "flops_per_image", "peak_memory_bytes")})
    base = rows[0]
    print(f"feature net: {extractor.name}; {args.num_images} images per folder, seed {args.seed}, {args.precision}, "
          f"batch {args.batch_size}")
    header = (f"{'method':<12}{'gen params':>11}{'tok params':>11}{'FID':>8}{'prec':>7}{'recall':>7}{'IS':>7}"
              f"{'img/s':>9}{'x base':>8}{'NFE':>6}{'GFLOP/img':>10}{'peak MiB':>9}")
    print(header)
    for row in rows:
        m = row["metrics"]
        memory = row["peak_memory_bytes"]
        print(f"{row['method']:<12}{row['generator_parameters'] / 1e6:>10.2f}M{row['tokenizer_parameters'] / 1e6:>10.2f}M"
              f"{m.get('fid', float('nan')):>8.2f}{m.get('precision', float('nan')):>7.3f}{m.get('recall', float('nan')):>7.3f}"
              f"{m.get('inception_score', m.get('is', float('nan'))):>7.2f}{row['images_per_second']:>9.1f}"
              f"{row['images_per_second'] / base['images_per_second']:>8.2f}{row['evaluations_per_image']:>6}"
              f"{row['flops_per_image'] / 1e9:>10.3f}{(memory or 0) / 2**20:>9.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(pipelines[0].device), "rows": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
