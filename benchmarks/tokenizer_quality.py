"""Reconstruction quality of tokenizer folders on the held-out split of their dataset: rFID (the dataset's built-in
feature net, reconstructions vs the training split, as generator FIDs are measured), PSNR, MSE, tokens per image,
and codebook usage per scale over the held-out images.

    python benchmarks/tokenizer_quality.py --from runs/mnist-msvq/final --from runs/mnist-vq/final
"""

from __future__ import annotations

import argparse

import torch

from effigen.data import DataConfig, build_dataset
from effigen.eval.evaluate import Reference, default_extractor_for, evaluate_images, load_extractor
from effigen.images import to_uint8
from effigen.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="sources", action="append", required=True)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    print(f"{'folder':<28}{'tokens':>7}{'codes':>6}{'rFID':>8}{'PSNR':>7}{'MSE':>9}  usage per scale (% of codes, held-out)")
    for source in args.sources:
        pipe = Pipeline.from_pretrained(source)
        tokenizer = pipe.tokenizer
        dataset = pipe.info["dataset"]
        test = build_dataset(DataConfig(name=dataset, resolution=tokenizer.config.resolution), "test")
        images = torch.stack([test[i][0] for i in range(len(test))])
        recon, hits = [], torch.zeros(len(tokenizer.scales), tokenizer.config.vocab_size)
        with torch.no_grad():
            for start in range(0, len(images), args.batch_size):
                batch = images[start : start + args.batch_size]
                indices = tokenizer.indices_from_images(batch)
                for si, idx in enumerate(indices):
                    hits[si] += idx.flatten().bincount(minlength=tokenizer.config.vocab_size).float()
                recon.append(tokenizer.decode(tokenizer.latent_from_indices(indices)))
        recon = torch.cat(recon)
        mse = (recon - images).square().mean().item()
        psnr = 10 * torch.log10(4 / (recon - images).square().mean(dim=(1, 2, 3))).mean().item()  # range 2 -> peak^2 4
        extractor = load_extractor(default_extractor_for(dataset))
        record = evaluate_images(to_uint8(recon), Reference(dataset=dataset, split="train", resolution=images.shape[-1]),
                                 extractor, metrics=("fid",), progress=False)
        fid = record["metrics"][0]["value"]
        usage = [round(100 * float((h > 0).float().mean()), 1) for h in hits]
        print(f"{source:<28}{tokenizer.config.num_tokens if hasattr(tokenizer.config, 'num_tokens') else '-':>7}"
              f"{tokenizer.config.vocab_size:>6}{fid:>8.3f}{psnr:>7.2f}{mse:>9.5f}  {usage}")
    print(f"rFID: {extractor.name}, {len(images)} held-out reconstructions vs the training split")


if __name__ == "__main__":
    main()
