"""Reconstruction quality of tokenizer folders: rFID (built-in feature net) of the held-out split's reconstructions
against the training split, and their pixel MSE / PSNR, side by side in one process.

    python benchmarks/reconstruction_fid.py --from runs/vavae/final runs/klvae16/final --num-images 500

The held-out split is the pipeline's dataset at its resolution (`data.holdout_fraction`'s default split); the
reference is the training split, as `effigen eval` uses for generated images, so rFID and generation FID compare.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from effigen.data import DataConfig, build_dataset
from effigen.eval.evaluate import Reference, default_extractor_for, evaluate_images, load_extractor
from effigen.pipeline import Pipeline


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="sources", nargs="+", required=True, help="tokenizer (or pipeline) folders")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for source in args.sources:
        pipeline = Pipeline.from_pretrained(source)
        tokenizer = pipeline.tokenizer
        if tokenizer is None:
            raise SystemExit(f"{source} holds no tokenizer")
        dataset_name, resolution = pipeline.info["dataset"], tokenizer.output.resolution
        test = build_dataset(DataConfig(name=dataset_name, resolution=resolution), "test")
        count = min(args.num_images, len(test))
        images = torch.stack([test[i][0] for i in range(count)])
        recon = torch.cat([tokenizer.reconstruct(images[i:i + 100]).float().clamp(-1, 1)
                           for i in range(0, count, 100)])
        mse = torch.mean(((recon - images) / 2) ** 2).item()  # on [0, 1] pixels
        extractor = load_extractor(default_extractor_for(dataset_name))
        reference = Reference(dataset=dataset_name, split="train", resolution=resolution)
        record = evaluate_images(recon, reference, extractor, ("fid",), progress=False)
        fid = record["metrics"][0]["value"]
        shape = "x".join(map(str, tokenizer.output.shape)) if hasattr(tokenizer.output, "shape") else "tokens"
        rows.append({"folder": source, "latent": shape, "images": count, "rfid": fid, "mse": mse,
                     "psnr": 10 * math.log10(1 / mse)})
        print(f"{source:<40} latent {shape:<8} rFID {fid:7.3f}  MSE {mse:.5f}  PSNR {rows[-1]['psnr']:.2f} dB "
              f"({count} held-out images, {extractor.name})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
