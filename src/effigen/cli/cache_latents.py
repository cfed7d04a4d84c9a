"""`effigen cache-latents`: encode a dataset once with a continuous-latent tokenizer (a KL autoencoder or an RAE)
or a residual-VQ tokenizer (its quantized latents) into a latent cache (sharded safetensors), for latent
generators to train on.

    effigen cache-latents --tokenizer runs/mnist-klvae/final --out cache/mnist-klvae --data.name=mnist --data.resolution=32
    effigen cache-latents --tokenizer sd-vae/ --out cache/imagenet --data.name=folder --data.root=/data/imagenet/train \
        --data.resolution=256 --flip
    effigen train --preset mnist-lightningdit-latent --data.name=latents --data.root=cache/mnist-klvae

`--flip` also stores the latents of every image's mirror, which training with `--data.horizontal_flip=true` picks
from (LightningDiT's flip augmentation). `effigen train` builds such a cache by itself in its output folder when a
latent generator is given an image dataset; a shared cache saves re-encoding across runs.

`--tokens` caches a VQ tokenizer's token ids instead (multi-scale, residual or 1D), for the token generators, which
then skip the frozen encoder on every training step (`effigen train --data.token_cache=true` builds one itself in
`<output_dir>/tokens`):

    effigen cache-latents --tokenizer runs/mnist-msvq/final --tokens --out cache/mnist-msvq --data.name=mnist --flip
    effigen train --preset mnist-var --tokenizer=runs/mnist-msvq/final --data.name=latents --data.root=cache/mnist-msvq
"""

from __future__ import annotations

import argparse
import time

from ..config import ConfigError, apply_overrides, config_from_dict
from ..data import DataConfig, build_dataset
from ..data.latents import cache_latents
from ..training.experiment import tokenizer_folder
from ..pipeline import load_network
from ..registry import TOKENIZERS
from .main import check_output_folder, positive_int, select_device_flag

# tokenizers whose `encode` gives a continuous latent to cache: the KL-VAE's (normalised) latents, the residual VQ's
# quantized latents f_hat (the sum of each position's code vectors)
CACHEABLE = ("KLVAE", "RAE", "ResidualVQ")


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="effigen cache-latents", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a KL-VAE or residual-VQ folder (tokenizer run's "
                                                            "final/, a converted SD-VAE, or a pipeline folder with tokenizer/)")
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--flip", action="store_true", help="also store the latents of mirrored images")
    parser.add_argument("--tokens", action="store_true", help="cache a VQ tokenizer's token ids (for token generators)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--shard-size", type=positive_int, default=16384, help="latents per safetensors shard")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: a GPU when there is one)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--data.") or "=" not in o]
    if bad:
        parser.error(f"unrecognised arguments {bad}; dataset settings look like --data.name=mnist")
    data = apply_overrides({"data": {}}, overrides)["data"]
    data_config = config_from_dict(DataConfig, data, "data")
    if data_config.name == "latents":
        raise ConfigError("--data.name=latents is already a latent cache; name the image dataset to encode")
    device = select_device_flag(args.device)
    check_output_folder(args.out)
    folder = tokenizer_folder(args.tokenizer)
    from ..io import read_json

    kind = read_json(folder / "config.json").get("_class_name")
    if args.tokens:
        if kind not in TOKENIZERS:
            raise ConfigError(f"{folder} holds a {kind}; token caches are made with a VQ tokenizer (MultiScaleVQ, "
                              "ResidualVQ, the DetailFlow tokenizer)")
    elif kind not in CACHEABLE:
        raise ConfigError(f"{folder} holds a {kind}; latent caches are made with a KL autoencoder (KLVAE), an RAE "
                          "or a residual VQ (ResidualVQ: its quantized latents); token ids with --tokens")
    tokenizer = load_network(folder, TOKENIZERS[kind]).to(device).eval()
    if args.tokens and tokenizer.output.kind != "tokens":
        raise ConfigError(f"{folder} holds a {kind}, whose output is {tokenizer.output.describe()}: --tokens needs a "
                          "VQ tokenizer (MultiScaleVQ, ResidualVQ, the DetailFlow tokenizer)")
    if tokenizer.config.resolution != data_config.resolution:
        raise ConfigError(f"the tokenizer works at {tokenizer.config.resolution} px; use --data.resolution="
                          f"{tokenizer.config.resolution}")
    dataset = build_dataset(data_config, args.split)
    started = time.perf_counter()
    out = cache_latents(tokenizer, dataset, args.out, flip=args.flip, batch_size=args.batch_size,
                        shard_size=args.shard_size, precision=args.precision,
                        kind="tokens" if args.tokens else "latents")
    seconds = time.perf_counter() - started
    print(f"cached {len(dataset)} {'token maps' if args.tokens else 'latents'} of {dataset.name}/{args.split} ({'with' if args.flip else 'no'} flips) in "
          f"{out} ({seconds:.1f}s)")
    return 0
