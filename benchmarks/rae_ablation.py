"""RAE's sampling-time choices on one trained DiT^DH folder, one protocol: guidance (none, CFG, autoguidance with an
earlier or smaller model of the same latent) and the dimension-dependent time shift (the training shift, none, or
any other), each scored with FID / precision / recall / IS on the built-in feature net and timed (images/s).

    python benchmarks/rae_ablation.py --from runs/dit-dh/final --guide runs/dit-dh/checkpoints/step_0000100 \
        --num-images 500 --json ablation.json

Variants (all with the folder's solver and step count; the same labels and seed for every row):
  cfg-<w>            classifier-free guidance at scale w (w = 1: no guidance)
  ag-<w>             autoguidance at scale w with --guide's generator (Karras et al. 2024; RAE uses a DiT^DH-S)
  cfg-<w>-shift-<s>  CFG with the sampling grid shifted by s instead of the training shift (s = 1: uniform grid)
Default: cfg-1, cfg-<the folder's scale>, ag-1.5, ag-<the folder's scale>, cfg-<scale>-shift-1.
The training shift itself cannot be changed after training: compare runs trained with different
`objective.shift_base` (benchmarks/alignment_curves.py over their checkpoints) for that.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch

from effigen.convert.rae_official import add_guidance_model
from effigen.eval.evaluate import default_extractor_for, load_extractor
from effigen.pipeline import Pipeline
from effigen.report import quality_metrics

VARIANT = re.compile(r"^(cfg|ag)-([0-9.]+)(?:-shift-([0-9.]+))?$")


def overrides_for(variant: str) -> dict:
    match = VARIANT.match(variant)
    if match is None:
        raise SystemExit(f"unknown variant {variant!r}: use cfg-W, ag-W or cfg-W-shift-S (e.g. cfg-2.0-shift-1)")
    kind, scale, shift = match.groups()
    overrides = {"cfg_scale": float(scale), "guidance": "autoguidance" if kind == "ag" else "cfg"}
    if shift is not None:
        overrides["time_shift"] = float(shift)
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="a dit-dh pipeline folder")
    parser.add_argument("--guide", help="pipeline folder (or checkpoint folder) whose generator guides the ag-* rows")
    parser.add_argument("--variants", nargs="+")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipeline = Pipeline.from_pretrained(args.source)
    scale = float(pipeline.sampler_config.cfg_scale)
    variants = args.variants or ["cfg-1", f"cfg-{scale:g}", "ag-1.5", f"ag-{scale:g}", f"cfg-{scale:g}-shift-1"]
    if any(v.startswith("ag-") for v in variants):
        if not args.guide:
            raise SystemExit("the ag-* variants need --guide FOLDER (an earlier checkpoint or a smaller model)")
        add_guidance_model(pipeline, Pipeline.from_pretrained(args.guide).generator, args.guide)
    extractor = load_extractor(default_extractor_for(pipeline.info.get("dataset")))
    rows = []
    print("variant | FID | precision | recall | IS | images/s (generation, batch of the evaluation)")
    for variant in variants:
        started = time.perf_counter()
        result = quality_metrics(pipeline, args.num_images, args.seed, args.precision, extractor,
                                 **overrides_for(variant))
        m = result["metrics"]
        row = {"variant": variant, **overrides_for(variant), **m,
               "images_per_second": args.num_images / result["generation_seconds"],
               "seconds": time.perf_counter() - started}
        rows.append(row)
        print(f"{variant} | {m.get('fid', float('nan')):.3f} | {m.get('precision', float('nan')):.3f} | "
              f"{m.get('recall', float('nan')):.3f} | {m.get('is', float('nan')):.2f} | "
              f"{row['images_per_second']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": args.source, "guide": args.guide, "num_images": args.num_images, "seed": args.seed,
                       "precision": args.precision, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
