"""Latent caches: a dataset encoded once by a frozen KL autoencoder, stored as sharded safetensors, and read
back by training (`--data.name=latents --data.root=CACHE`), as LightningDiT and REPA train on pre-extracted
VAE latents. `effigen train` builds the cache itself (in `<output_dir>/latents`) when a latent generator is
given an image dataset; `effigen cache-latents` builds one explicitly to share between runs.

Folder layout:

    index.json                    format, count, latent shape, source dataset/split/resolution, class names,
                                  the tokenizer's fingerprint, shard names (written last: its presence = complete)
    latents-00000.safetensors     "latents" (N, C, h, w) float32, "labels" (N,) int64,
                                  "latents_flip" (N, C, h, w) when built with flips

Flip augmentation (LightningDiT): the latents of each image *and of its left-right mirror* are stored; when
training with `data.horizontal_flip`, the trainer picks one of the two per sample from its seeded stream (a
flipped latent is not the latent of the flipped image, so flipping latents directly would be wrong).
Latents are the tokenizer's normalised ones (`KLVAE.encode`: posterior mean, per-channel or scalar scaling).

Token caches (`kind="tokens"`, `data.token_cache=true` or `effigen cache-latents --tokens`): a VQ tokenizer's
token ids instead, "tokens" (N, num_tokens) int16 (int32 above 32768 codes; + "tokens_flip"), each row `TokenSpace.flatten_indices` of
`indices_from_images` (fp32, as the token objectives tokenize). The token generators (VAR, HMAR, ResGen, DetailFlow,
the raster AR baseline) then skip the frozen encoder on every step: it is a third of a VAR-d12 training step on a
CPU, and the ids are the same ones the step would compute, so training from the cache is training from the images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..io import atomic_directory, read_json, write_json
from .datasets import DataError

FORMAT = "effigen-latents-v1"
INDEX = "index.json"


def tokenizer_fingerprint(tokenizer: torch.nn.Module) -> str:
    """sha256 of the tokenizer's config and weights: a cache built by another tokenizer is refused."""
    from ..config import config_to_dict

    digest = hashlib.sha256(repr(sorted(config_to_dict(tokenizer.config).items())).encode())
    for name, tensor in sorted(tokenizer.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def cache_latents(tokenizer: torch.nn.Module, dataset, out: str | Path, *, flip: bool = False, batch_size: int = 64,
                  shard_size: int = 16384, precision: str = "fp32", progress: bool = True,
                  kind: str = "latents") -> Path:
    """Encode every image of `dataset` with `tokenizer.encode` (`kind="tokens"`: the token ids of a VQ tokenizer's
    `indices_from_images`, always in fp32) and write the cache folder atomically.
    Returns `out`. An existing complete cache of the same tokenizer, source, flips and kind is reused."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out = Path(out)
    fingerprint = tokenizer_fingerprint(tokenizer)
    source = {"dataset": dataset.name, "split": dataset.split, "resolution": dataset.resolution}
    if (out / INDEX).is_file():
        index = read_json(out / INDEX)
        if index.get("tokenizer") == fingerprint and index.get("source") == source and index.get("flip") == flip \
                and index.get("count") == len(dataset) and index.get("kind", "latents") == kind:
            return out
        raise DataError(f"{out} already holds a latent cache of another tokenizer, dataset, flip setting or kind; "
                        "delete it or choose another folder")
    if kind not in ("latents", "tokens"):
        raise ValueError(f"kind={kind!r}: a cache holds 'latents' or 'tokens'")
    if kind == "tokens" and getattr(tokenizer.output, "kind", None) != "tokens":
        raise DataError(f"a token cache needs a VQ tokenizer; {type(tokenizer).__name__} has "
                        f"{tokenizer.output.describe()}")
    device = next(tokenizer.parameters()).device
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    tokenizer.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    shards, buffers, latent_shape = [], {kind: [], f"{kind}_flip": [], "labels": []}, None

    def encode(images: torch.Tensor) -> torch.Tensor:
        if kind == "tokens":  # as TokenizedObjective.tokenize: fp32, autocast off
            with torch.autocast(device.type, enabled=False):
                return tokenizer.output.flatten_indices(tokenizer.indices_from_images(images.float())).cpu()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return tokenizer.encode(images).float().cpu()

    with atomic_directory(out) as tmp:
        def flush() -> None:
            if not buffers["labels"]:
                return
            name = f"latents-{len(shards):05d}.safetensors"
            tensors = {key: torch.cat(value) for key, value in buffers.items() if value}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
            shards.append({"file": name, "count": len(tensors["labels"])})
            for value in buffers.values():
                value.clear()

        bar = tqdm(total=len(dataset), desc="encoding latents", unit="img", disable=not progress)
        pending = 0
        for images, labels in loader:
            images = images.to(device)
            latents = encode(images)
            if flip:
                buffers[f"{kind}_flip"].append(encode(images.flip(-1)))
            latent_shape = list(latents.shape[1:])
            buffers[kind].append(latents)
            buffers["labels"].append(torch.as_tensor(labels, dtype=torch.long))
            pending += len(labels)
            bar.update(len(labels))
            if pending >= shard_size:
                flush()
                pending = 0
        flush()
        bar.close()
        write_json(tmp / INDEX, {
            "format": FORMAT, "kind": kind, "count": len(dataset), "latent_shape": latent_shape, "flip": flip,
            "source": source,
            "class_names": list(dataset.class_names), "tokenizer": fingerprint,
            "tokenizer_class": type(tokenizer).__name__, "shards": shards,
        })
    return out


class LatentDataset(Dataset):
    """A latent cache folder as a dataset of (latent, label). With flipped latents stored, an item is the latent
    and its mirror's latent concatenated along channels (`stores_flipped`); the trainer keeps one half."""

    def __init__(self, root: str | Path, resolution: int | None = None, fingerprint: str | None = None):
        from safetensors.torch import load_file

        self.root = Path(root)
        if not (self.root / INDEX).is_file():
            raise DataError(f"{self.root} is not a complete latent cache (no {INDEX}); build one with "
                            "`effigen cache-latents --tokenizer DIR --out DIR`")
        index = read_json(self.root / INDEX)
        if index.get("format") != FORMAT:
            raise DataError(f"{self.root / INDEX}: unknown format {index.get('format')!r} (expected {FORMAT})")
        self.index = index
        source = index["source"]
        self.name, self.split, self.resolution = source["dataset"], source["split"], source["resolution"]
        if resolution is not None and resolution != self.resolution:
            raise DataError(f"the latent cache {self.root} holds {self.resolution} px images but data.resolution is "
                            f"{resolution}; use --data.resolution={self.resolution}")
        if fingerprint is not None and index.get("tokenizer") != fingerprint:
            raise DataError(f"the latent cache {self.root} was built by another tokenizer than this run's; rebuild it "
                            "with `effigen cache-latents` and this tokenizer")
        self.class_names = list(index["class_names"])
        self.num_classes = len(self.class_names)
        self.stores_flipped = bool(index.get("flip"))
        self.kind = index.get("kind", "latents")  # "tokens": integer ids of a VQ tokenizer
        parts = {self.kind: [], f"{self.kind}_flip": [], "labels": []}
        for shard in index["shards"]:
            path = self.root / shard["file"]
            try:
                tensors = load_file(str(path))
            except Exception as e:  # missing or truncated shard
                raise DataError(f"cannot read latent shard {path}: {e}; rebuild the cache") from None
            for key in parts:
                if key in tensors:
                    parts[key].append(tensors[key])
        self.latents = torch.cat(parts[self.kind])
        self.latents_flip = torch.cat(parts[f"{self.kind}_flip"]) if self.stores_flipped else None
        self._labels = torch.cat(parts["labels"])
        if len(self._labels) != index["count"]:
            raise DataError(f"{self.root}: the shards hold {len(self._labels)} latents, index.json says {index['count']}; "
                            "rebuild the cache")

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        latent = self.latents[i]
        if self.latents_flip is not None:
            latent = torch.cat((latent, self.latents_flip[i]))
        return latent, int(self._labels[i])

    def labels(self) -> torch.Tensor:
        return self._labels.clone()

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.index["latent_shape"])

    def __repr__(self) -> str:
        return (f"LatentDataset({self.root}, {len(self)} x {self.latent_shape} {self.kind} of {self.name}/{self.split} at "
                f"{self.resolution} px{', with flips' if self.stores_flipped else ''})")


def pick_views(latents: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    """(B, 2C, h, w) latent + mirror-latent pairs (or (B, 2T) token rows) -> (B, C, h, w) (or (B, T)): the mirror
    where `flip` (B,) is true."""
    plain, mirrored = latents.chunk(2, dim=1)
    if flip is None:
        return plain
    return torch.where(flip.view(-1, *[1] * (latents.dim() - 1)), mirrored, plain)


__all__ = ["LatentDataset", "cache_latents", "pick_views", "tokenizer_fingerprint"]
