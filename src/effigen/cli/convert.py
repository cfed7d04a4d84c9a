"""`effigen convert`: official checkpoints -> effigen pipeline folders.

    effigen convert dit-official --ckpt DiT-XL-2-256x256.pt --out dit-xl-2-256 [--num-heads 16]
    effigen convert lightningdit-official --ckpt lightningdit-xl-imagenet256-800ep.pt --out lightningdit-xl-1

Converters: dit-official (facebookresearch/DiT: released weights or training checkpoints, EMA weights);
lightningdit-official (hustvl/LightningDiT training checkpoints, EMA weights; time and velocity
conventions translated, official sampler settings recorded). The converted folders sample latents;
decoding them to images needs the SD-VAE / VA-VAE, which effigen does not load yet (sample with
`output_type="latent"`).
"""

from __future__ import annotations

import argparse

CONVERTERS = ("dit-official", "lightningdit-official")


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="effigen convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=CONVERTERS, help="which official format")
    parser.add_argument("--ckpt", required=True, help="the official checkpoint file")
    parser.add_argument("--out", required=True, help="output pipeline folder")
    parser.add_argument("--num-heads", type=int, help="attention heads (not stored in DiT checkpoints; default: official sizes)")
    parser.add_argument("--steps", type=int, default=250,
                        help="default sampling steps saved with the folder (LightningDiT: its num_sampling_steps)")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="default guidance scale saved with the folder (DiT: 1.5, LightningDiT: 6.7)")
    args = parser.parse_args(argv)
    if args.source == "dit-official":
        from ..convert.dit_official import convert_dit_official

        path = convert_dit_official(args.ckpt, args.out, args.num_heads, args.steps,
                                    1.5 if args.cfg_scale is None else args.cfg_scale)
    else:
        from ..convert.lightningdit_official import convert_lightningdit_official, official_sampler

        sampler = official_sampler(args.steps, cfg_scale=6.7 if args.cfg_scale is None else args.cfg_scale)
        path = convert_lightningdit_official(args.ckpt, args.out, args.num_heads, sampler)
    print(f"converted {args.ckpt} -> {path}")
    return 0
