"""Evaluation runs: generated images vs a reference, through one feature extractor, into a record.

- Generated side: uint8 images (a folder, an ADM `.npz`) or a pipeline that generates N class-balanced,
  seeded images, sharded across processes under torchrun and gathered (`generate_for_evaluation`).
- Reference side: a dataset (built-in or `folder`, a named split), a folder/npz of images, or
  precomputed statistics (`mu`/`sigma` and ADM's `mu_s`/`sigma_s`). Reference features are cached on
  disk, keyed by dataset, split, resolution, number of images and feature extractor, and for an image folder, .npz
  or `folder` dataset by the name, size, mtime and ctime of every file in it (`files_fingerprint`), so images
  rewritten in place are never read from a stale cache.
- Sample sizes: fewer than 2 images is an error (`EvaluationError`); fewer than makes a metric meaningful (FID below
  the feature dimension, KID subsets below 100, precision/recall below 1,000) is a `SmallSampleWarning`, also listed
  under "warnings" in the record.
- Extractors: `inception` (the TF Inception-v3 of the ADM protocol, weights from a local file) or a
  built-in feature net (`mnist-net`, `digits-net`, `shapes-net`) for the built-in datasets; metric
  names carry the extractor, e.g. "FID (mnist-net)", because the numbers are only comparable within one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..images import to_uint8
from .metrics import (
    EvaluationError,
    compute_statistics,
    extract_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_images,
    load_reference_statistics,
    precision_recall,
)

METRICS = ("fid", "sfid", "is", "kid", "precision_recall")
KID_MIN_SUBSET = 100  # below this, KID's subset estimates vary too much to compare
PRECISION_RECALL_MIN = 1000  # below this, k-NN manifolds are too coarse: the values move with the sample size


class SmallSampleWarning(UserWarning):
    """A metric was computed on fewer images than make it meaningful; the message says why and how many."""


@dataclass
class Extractor:
    """A feature network and which of its taps each metric reads."""

    name: str
    module: torch.nn.Module
    fid_tap: str
    is_tap: str | None
    spatial_tap: str | None = None
    taps: tuple[str, ...] = field(default=())

    def features(self, images: torch.Tensor, batch_size: int = 100, progress: bool = True) -> dict[str, np.ndarray]:
        return extract_features(self.module, images, batch_size=batch_size, taps=list(self.taps), progress=progress)


def load_extractor(name: str, inception_weights: str | None = None, device: str | torch.device = "cpu") -> Extractor:
    if name == "inception":
        from .inception import load_inception

        module = load_inception(inception_weights, device=device)
        has_logits = getattr(module, "has_classifier", True)
        taps = ("2048", "spatial") + (("logits_unbiased",) if has_logits else ())
        return Extractor("inception", module, "2048", "logits_unbiased" if has_logits else None, "spatial", taps)
    from .feature_nets import FEATURE_NETS, load_feature_net

    if name not in FEATURE_NETS:
        raise EvaluationError(f"unknown feature extractor {name!r}; choose inception or one of {', '.join(FEATURE_NETS)}")
    return Extractor(name, load_feature_net(name).to(device), "features", "logits", None, ("features", "logits"))


def default_extractor_for(dataset: str | None) -> str:
    from .feature_nets import feature_net_for_dataset

    if dataset in ("mnist", "digits", "shapes"):
        return feature_net_for_dataset(dataset)
    return "inception"


def cache_dir() -> Path:
    root = os.environ.get("EFFIGEN_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "effigen")
    return Path(root) / "reference"


# ------------------------------------------------------------------------------------------- generation
def balanced_labels(num: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., K-1, 0, 1, ...: every class gets num // K images (+1 for the first num % K)."""
    return torch.arange(num) % num_classes


def generate_for_evaluation(pipeline, num: int, seed: int = 0, batch_size: int = 64, precision: str = "fp32",
                            chunk_size: int = 100, progress: bool = True, **sampler_overrides) -> torch.Tensor:
    """N class-balanced images as uint8 (N, 3, H, W), identical for any number of processes.

    Images are made in chunks of `chunk_size`; chunk c uses its own generator seeded by (seed, c), and
    chunks are dealt round-robin to the torchrun processes, then gathered on every process.
    """
    import torch.distributed as dist
    from tqdm.auto import tqdm

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    labels = balanced_labels(num, pipeline.num_classes)
    chunks = list(range(0, num, chunk_size))
    mine: dict[int, torch.Tensor] = {}
    bar = tqdm(total=num, desc=f"generating (rank {rank})" if distributed else "generating", unit="img",
               disable=not progress or rank != 0)
    for index in range(rank, len(chunks), world):
        start = chunks[index]
        chunk_labels = labels[start : start + chunk_size].to(pipeline.device)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        images = pipeline(chunk_labels, generator=generator, batch_size=batch_size, precision=precision,
                          **sampler_overrides)
        mine[index] = to_uint8(images)
        bar.update(len(chunk_labels) * world)
    bar.close()
    if distributed:
        gathered: list[dict[int, torch.Tensor]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine)
        for part in gathered:
            mine.update(part)
    return torch.cat([mine[i] for i in range(len(chunks))])


# ------------------------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """What generated images are compared with. Exactly one of dataset / images / statistics."""

    dataset: str | None = None
    split: str = "train"
    resolution: int | None = None
    root: str | None = None  # for dataset="folder"
    num: int | None = None  # None: the whole split
    images: str | None = None
    statistics: str | None = None

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _dataset_images(reference: Reference) -> torch.Tensor:
    from ..data import DataConfig, build_dataset

    if reference.resolution is None:
        raise ValueError("a dataset reference needs a resolution (the generated images' size)")
    config = DataConfig(name=reference.dataset, resolution=reference.resolution, root=reference.root)
    dataset = build_dataset(config, reference.split)
    if reference.num is None or reference.num >= len(dataset):
        indices = list(range(len(dataset)))
    else:  # a seeded random subset: splits are stored class by class, so a prefix would miss classes
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[: reference.num].tolist()
    return to_uint8(dataset.images(indices))


def files_fingerprint(path: str | os.PathLike) -> str:
    """A hash of the relative name, size, mtime and ctime (ns) of every file under `path` (or of the file `path`): it
    changes when any file is added, removed or rewritten, even in place with the folder's mtime restored (a folder's
    mtime changes only when entries are added or removed; a file's ctime cannot be set back). Only file metadata is
    read, so a large reference set costs one stat per file, not a read of every byte."""
    root = Path(path).expanduser()
    if not root.exists():
        return "missing"
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        name = f.name if f == root else f.relative_to(root).as_posix()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\n".encode())
    return digest.hexdigest()


def reference_features(reference: Reference, extractor: Extractor, batch_size: int = 100, progress: bool = True,
                       use_cache: bool = True) -> dict[str, np.ndarray]:
    """Features of the reference set, from the cache when present. Returns {tap: (N, D)} arrays."""
    if reference.images is None and reference.dataset is None:
        raise ValueError("reference features need a dataset or an image set")
    files = reference.images or (reference.root if reference.dataset == "folder" else None)
    key_source = json.dumps({**reference.describe(), "extractor": extractor.name, "taps": extractor.taps,
                             "files": files_fingerprint(files) if files else None}, sort_keys=True)
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    label = reference.dataset or Path(reference.images).name
    path = cache_dir() / f"{label}-{reference.split if reference.dataset else 'images'}-{reference.resolution}-{extractor.name}-{key}.npz"
    if use_cache and path.is_file():
        try:
            with np.load(path) as cached:
                return {tap: cached[tap] for tap in extractor.taps}
        except Exception:  # a damaged cache entry is recomputed, never trusted
            pass
    images = load_images(reference.images) if reference.images else _dataset_images(reference)
    features = extractor.features(images, batch_size=batch_size, progress=progress)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}.npz")
        np.savez(tmp, **{k: v.astype(np.float32) for k, v in features.items()})
        os.replace(tmp, path)
    return features


# ------------------------------------------------------------------------------------------- metrics
def sample_size_problems(num_generated: int, num_reference: int | None, dims: dict[str, int],
                         metrics: tuple[str, ...], kid_subset_size: int = 1000, k: int = 3) -> list[str]:
    """Why the requested metrics are not meaningful at these sample sizes (empty when they are). `dims`: the feature
    dimension per metric ("fid", "sfid"). Fewer than 2 images on either side is an EvaluationError instead."""
    for side, count in (("generated", num_generated), ("reference", num_reference)):
        if count is not None and count < 2:
            fix = "generate or give more images" if side == "generated" else "use a larger reference set"
            raise EvaluationError(f"{count} {side} image{'s' if count != 1 else ''}: FID, KID and precision/recall "
                                  "compare distributions and need at least 2 images on each side (thousands for "
                                  f"meaningful values); {fix}")
    sizes = {"generated": num_generated, **({"reference": num_reference} if num_reference is not None else {})}
    problems = []
    for key, title in (("fid", "FID"), ("sfid", "sFID")):
        if key in metrics and key in dims:
            small = [f"{n} {side}" for side, n in sizes.items() if n < dims[key]]
            if small:
                problems.append(f"{title} on {' and '.join(small)} images with {dims[key]}-dimensional features: a "
                                f"covariance from N images has rank at most N - 1 < {dims[key]}, so the value is "
                                f"dominated by the estimate's bias (it falls as N grows) and comparable only at equal N; "
                                f"use at least {dims[key]} images (the papers use 10,000-50,000)")
    if "kid" in metrics and num_reference is not None:
        subset = min(kid_subset_size, num_generated, num_reference)
        if subset < KID_MIN_SUBSET:
            problems.append(f"KID from subsets of {subset} images: unbiased, but its variance is large at this size "
                            f"(see kid_std); use at least {KID_MIN_SUBSET} images per side (torch-fidelity: 1,000)")
    if "precision_recall" in metrics and num_reference is not None:
        smallest = min(num_generated, num_reference)
        if smallest <= k:
            problems.append(f"precision/recall skipped: its k-NN manifolds (k = {k}) need more than {k} images on each "
                            f"side (generated {num_generated}, reference {num_reference})")
        elif smallest < PRECISION_RECALL_MIN:
            problems.append(f"precision/recall on {smallest} images: k-NN manifolds (k = {k}) from so few points are "
                            f"coarse and the values move with the sample size; use at least {PRECISION_RECALL_MIN} "
                            "per side (Kynkaanniemi et al. use 50,000) and compare only at equal sizes")
    return problems


def compute_metrics(generated: dict[str, np.ndarray], extractor: Extractor, reference_feats: dict[str, np.ndarray] | None = None,
                    reference_stats: dict[str, np.ndarray] | None = None, metrics: tuple[str, ...] = METRICS,
                    kid_subset_size: int = 1000, k: int = 3, notes: list[str] | None = None) -> dict[str, float]:
    """The requested metrics; those that cannot be computed from what is given are skipped. Fewer than 2 images on
    either side is an EvaluationError; sample sizes too small for a metric to mean much give a SmallSampleWarning
    each (appended to `notes` when given)."""
    out: dict[str, float] = {}
    stats = dict(reference_stats or {})
    fake = generated[extractor.fid_tap]
    num_reference = len(reference_feats[extractor.fid_tap]) if reference_feats is not None else None
    dims = {"fid": fake.shape[1]}
    if extractor.spatial_tap and extractor.spatial_tap in generated:
        dims["sfid"] = generated[extractor.spatial_tap].shape[1]
    problems = sample_size_problems(len(fake), num_reference, dims, metrics, kid_subset_size, k)
    for problem in problems:
        warnings.warn(problem, SmallSampleWarning, stacklevel=2)
    if notes is not None:
        notes.extend(problems)
    if reference_feats is not None:
        stats.setdefault("mu", None)
        stats["mu"], stats["sigma"] = compute_statistics(reference_feats[extractor.fid_tap])
        if extractor.spatial_tap and extractor.spatial_tap in reference_feats:
            stats["mu_s"], stats["sigma_s"] = compute_statistics(reference_feats[extractor.spatial_tap])
    for mu_key, key, title in (("mu", "fid", "FID"), ("mu_s", "sfid", "sFID")):
        if key in metrics and stats.get(mu_key) is not None and key in dims and len(stats[mu_key]) != dims[key]:
            raise EvaluationError(f"the reference statistics for {title} are {len(stats[mu_key])}-dimensional but "
                                  f"{extractor.name}'s features are {dims[key]}-dimensional: they were computed with "
                                  "another feature extractor; pass the --features they were made with")
    if "fid" in metrics and "mu" in stats:
        out["fid"] = frechet_distance(*compute_statistics(fake), stats["mu"], stats["sigma"])
    if "sfid" in metrics and extractor.spatial_tap and "mu_s" in stats and extractor.spatial_tap in generated:
        out["sfid"] = frechet_distance(*compute_statistics(generated[extractor.spatial_tap]), stats["mu_s"], stats["sigma_s"])
    if "is" in metrics and extractor.is_tap and extractor.is_tap in generated:
        out["is"], out["is_std"] = inception_score(generated[extractor.is_tap], splits=min(10, len(fake)))
    if reference_feats is not None:
        real = reference_feats[extractor.fid_tap]
        if "kid" in metrics:
            subset = min(kid_subset_size, len(real), len(fake))
            out["kid"], out["kid_std"] = kernel_inception_distance(real, fake, subset_size=subset)
        if "precision_recall" in metrics and min(len(real), len(fake)) > k:
            out["precision"], out["recall"] = precision_recall(real, fake, k=k)
    return out


METRIC_TITLES = {"fid": "FID", "sfid": "sFID", "is": "IS", "is_std": "IS std", "kid": "KID", "kid_std": "KID std",
                 "precision": "precision", "recall": "recall"}


def make_record(values: dict[str, float], extractor: Extractor, num_generated: int, num_reference: int | None,
                reference: Reference, seed: int | None, settings: dict[str, Any],
                notes: list[str] | None = None) -> dict[str, Any]:
    return {
        "metrics": [{"metric": key, "name": f"{METRIC_TITLES.get(key, key)} ({extractor.name})", "value": float(value)}
                    for key, value in values.items()],
        "feature_extractor": extractor.name,
        "num_generated": num_generated,
        "num_reference": num_reference,
        "reference": reference.describe(),
        "seed": seed,
        "settings": settings,
        "warnings": list(notes or []),
        "effigen_version": __version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def format_table(record: dict[str, Any]) -> str:
    rows = [(m["name"], f"{m['value']:.4f}") for m in record["metrics"]]
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append(f"generated: {record['num_generated']}, reference: {record['num_reference']} "
                 f"({', '.join(f'{k}={v}' for k, v in record['reference'].items())})")
    return "\n".join(lines)


def evaluate_images(images: torch.Tensor, reference: Reference, extractor: Extractor, metrics: tuple[str, ...] = METRICS,
                    batch_size: int = 100, progress: bool = True, seed: int | None = None,
                    settings: dict[str, Any] | None = None, use_cache: bool = True) -> dict[str, Any]:
    """Everything but generation: features of `images` (uint8), the reference, the metrics, the record (its
    "warnings" list the sample-size problems, also raised as SmallSampleWarning)."""
    if len(images) < 2:
        sample_size_problems(len(images), None, {}, metrics)  # raises the EvaluationError, before any work
    generated = extractor.features(images, batch_size=batch_size, progress=progress)
    reference_feats, reference_stats, num_reference = None, None, None
    if reference.statistics is not None:
        reference_stats = load_reference_statistics(reference.statistics)
    else:
        reference_feats = reference_features(reference, extractor, batch_size, progress, use_cache)
        num_reference = len(reference_feats[extractor.fid_tap])
    notes: list[str] = []
    values = compute_metrics(generated, extractor, reference_feats, reference_stats, metrics, notes=notes)
    return make_record(values, extractor, len(images), num_reference, reference, seed, settings or {}, notes)
