"""Small classifiers trained by effigen on the built-in datasets, used as the feature extractor for
FID / IS / precision-recall on built-in data ("FID (mnist-net)" and so on -- not comparable with the
Inception-v3 FID of papers, which is computed on ImageNet features).

Each net is a compact GroupNorm CNN (batch-independent, so features never depend on batch
composition). It takes ``(B, 3, H, W)`` images at any size ``>= 8`` -- float in ``[-1, 1]`` or uint8 in
``0..255`` -- resizes them to its native resolution with antialiased bilinear interpolation, and
returns ``{"features": (B, D), "logits": (B, K)}``. Weights ship inside the package
(``effigen/assets/<name>.safetensors``, fp16 tensors, architecture in the safetensors metadata), so
loading needs no download and no pickle::

    net = load_feature_net(feature_net_for_dataset("mnist"))
    feats = net(images)["features"]      # images: float [-1, 1] or uint8, any size >= 8
    # or, in batches: effigen.eval.metrics.extract_features(net, uint8_images, taps=["features", "logits"])

Float inputs are read as ``[-1, 1]`` (a float batch whose values exceed 2 is refused as probably
``0..255``; pass it as uint8). The nets are trained without blur or noise augmentation so that their
features stay sensitive to those defects.

Rebuild the assets with ``.venv/bin/python scripts/build_feature_nets.py [--only mnist]``.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from effigen.io import CheckpointError, load_state_dict_strict, load_weights

FEATURE_NETS: tuple[str, ...] = ("mnist-net", "digits-net", "shapes-net")
_NET_FOR_DATASET = {"mnist": "mnist-net", "digits": "digits-net", "shapes": "shapes-net"}
REBUILD_COMMAND = ".venv/bin/python scripts/build_feature_nets.py"
_METADATA_KEY = "effigen_feature_net"
MINIMUM_INPUT_SIZE = 8

# Per-dataset training recipe used by scripts/build_feature_nets.py (any field can be overridden).
TRAINING_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist": {"resolution": 32, "epochs": 12, "num_images": None},
    "digits": {"resolution": 16, "epochs": 40, "num_images": None},
    "shapes": {"resolution": 32, "epochs": 8, "num_images": 20000},
}


@dataclass
class FeatureNetConfig:
    """Architecture of a `FeatureNet`; stored as JSON in the safetensors metadata."""

    name: str = "mnist-net"
    dataset: str = "mnist"
    num_classes: int = 10
    native_resolution: int = 32  # inputs of any size are resized to this
    widths: tuple[int, ...] = (32, 64, 128)  # channels per stage; each stage ends with a 2x average pool
    depths: tuple[int, ...] = (1, 2, 1)  # 3x3 convs per stage
    stem_width: int = 32
    feature_dim: int = 128
    groups: int = 8  # GroupNorm groups
    class_names: list[str] = field(default_factory=list)


def _conv_block(in_channels: int, out_channels: int, groups: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.GroupNorm(min(groups, out_channels), out_channels),
        nn.SiLU(),
    )


class FeatureNet(nn.Module):
    """``images (B, 3, H, W)`` -> ``{"features": (B, feature_dim), "logits": (B, num_classes)}``."""

    def __init__(self, config: FeatureNetConfig) -> None:
        super().__init__()
        if len(config.widths) != len(config.depths) or min(config.depths) < 1:
            raise ValueError(f"widths {config.widths} and depths {config.depths} must pair up, depths >= 1")
        self.config = config
        layers: list[nn.Module] = [_conv_block(3, config.stem_width, config.groups)]
        channels = config.stem_width
        for width, depth in zip(config.widths, config.depths):
            for _ in range(depth):
                layers.append(_conv_block(channels, width, config.groups))
                channels = width
            layers.append(nn.AvgPool2d(2))
        layers.append(_conv_block(channels, config.feature_dim, config.groups, kernel=1))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``0..255`` or float ``[-1, 1]`` ``(B, 3|1, H, W)`` -> float ``[-1, 1]`` at native size.
        Float values slightly outside ``[-1, 1]`` are clipped, as saving them to an image file would;
        values beyond 2 are refused (probably a 0..255 float batch)."""
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"{self.config.name} expects (batch, 3, height, width) images, got {shape}")
        if min(images.shape[-2:]) < MINIMUM_INPUT_SIZE:
            raise ValueError(
                f"{self.config.name} needs images of at least {MINIMUM_INPUT_SIZE}x{MINIMUM_INPUT_SIZE}, "
                f"got {tuple(images.shape[-2:])}"
            )
        weight = self.head.weight
        if images.dtype == torch.uint8:
            images = images.to(weight.device, torch.float32).div(127.5).sub(1.0)
        elif images.is_floating_point():
            images = images.to(weight.device, torch.float32)
            if images.numel() and float(images.abs().max()) > 2.0:
                raise ValueError(
                    f"{self.config.name} reads float images as [-1, 1] but got values up to "
                    f"{float(images.abs().max()):.3g}; pass 0..255 images as uint8 (or clamp [-1, 1] samples)"
                )
            images = images.clamp(-1.0, 1.0)
        else:
            raise ValueError(f"images must be uint8 (0..255) or float ([-1, 1]), got {images.dtype}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        size = self.config.native_resolution
        if tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return images.to(weight.dtype)

    def forward(self, images: torch.Tensor, taps: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        features = self.body(self.prepare(images)).mean(dim=(2, 3))
        out = {"features": features, "logits": self.head(features)}
        if taps is not None:  # so `effigen.eval.metrics.extract_features` can drive it (uint8 images)
            taps = list(taps)
            unknown = [tap for tap in taps if tap not in out]
            if unknown:
                raise ValueError(f"unknown taps {unknown}; {self.config.name} has 'features' and 'logits'")
            out = {tap: out[tap] for tap in taps}
        return out


# --- Saving and loading ------------------------------------------------------------------------


def feature_net_for_dataset(dataset_name: str) -> str:
    """The feature net for a built-in dataset: ``"mnist"`` -> ``"mnist-net"``."""
    if dataset_name not in _NET_FOR_DATASET:
        raise ValueError(
            f"no feature net for dataset {dataset_name!r}; there is one for {', '.join(_NET_FOR_DATASET)} "
            "(use the Inception-v3 extractor of effigen.eval for other images)"
        )
    return _NET_FOR_DATASET[dataset_name]


def save_feature_net(net: FeatureNet, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write fp16 weights plus the config (and ``extra`` info) as safetensors metadata, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in net.state_dict().items()}
    # One metadata key: safetensors writes several in a random order, which would make rebuilt files differ.
    metadata = {_METADATA_KEY: json.dumps({"config": asdict(net.config), "info": extra or {}}, sort_keys=True)}
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # package data: readable by everyone, like the rest of the source tree
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_feature_net_file(path: str | Path) -> FeatureNet:
    """Build a `FeatureNet` from a safetensors file written by `save_feature_net` (eval mode, float32)."""
    path = Path(path)
    state = load_weights(path)  # CheckpointError if missing or corrupt
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if _METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} has no {_METADATA_KEY!r} metadata; it was not written by save_feature_net")
    try:
        raw = json.loads(metadata[_METADATA_KEY])["config"]
        raw["widths"], raw["depths"] = tuple(raw["widths"]), tuple(raw["depths"])
        net = FeatureNet(FeatureNetConfig(**raw))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} has an unreadable {_METADATA_KEY!r} config: {error}") from error
    load_state_dict_strict(net, {k: v.to(torch.float32) for k, v in state.items()}, str(path))
    return net.eval().requires_grad_(False)


def feature_net_asset(name: str) -> Path:
    """Path of the packaged asset of feature net ``name`` (may not exist if the assets were not built)."""
    if name not in FEATURE_NETS:
        raise ValueError(f"unknown feature net {name!r}; choose one of {', '.join(FEATURE_NETS)}")
    return Path(str(resources.files("effigen").joinpath("assets").joinpath(f"{name}.safetensors")))


def load_feature_net(name: str) -> FeatureNet:
    """Load packaged feature net ``name`` (one of `FEATURE_NETS`), in eval mode, on the CPU."""
    path = feature_net_asset(name)
    if not path.is_file():
        dataset = name.removesuffix("-net")
        raise CheckpointError(
            f"feature net asset {path} is missing; rebuild it with `{REBUILD_COMMAND} --only {dataset}`"
        )
    return load_feature_net_file(path)


# --- Training ----------------------------------------------------------------------------------


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light, label-preserving jitter: scale 0.9-1.1, rotation +-8 degrees, shifts of +-2/32 of the
    image (edge pixels extend the border). Deliberately no blur, resampling or noise augmentation:
    invariance to those would hide exactly the defects FID must see (a resolution round trip made
    FID(blurred digits) 6x smaller)."""
    batch = images.shape[0]
    draws = torch.rand(batch, 4, generator=generator)
    scale = 0.9 + 0.2 * draws[:, 0]
    angle = (draws[:, 1] - 0.5) * (2 * math.radians(8))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = (draws[:, 2:] - 0.5) * (2 * 4 / 32)  # normalised coordinates span 2, so +-2/32 of the width
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def load_split(dataset_name: str, split: str, resolution: int, num_images: int | None = None, seed: int = 0):
    """A built-in split as ``(images float32 (N, 3, R, R), labels (N,), class_names)``."""
    from effigen.data import DataConfig, build_dataset

    config = DataConfig(name=dataset_name, resolution=resolution, seed=seed)
    if num_images is not None:
        config.num_images = num_images
    dataset = build_dataset(config, split)
    return dataset.images(), dataset.labels, dataset.class_names


@torch.no_grad()
def accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``net`` on ``images`` (any resolution)."""
    was_training = net.training
    net.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = net(images[start : start + batch_size])["logits"]
        correct += int((logits.argmax(1) == labels[start : start + batch_size].to(logits.device)).sum())
    net.train(was_training)
    return correct / max(images.shape[0], 1)


def train_feature_net(
    dataset_name: str,
    resolution: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    num_images: int | None = None,
    log: Callable[[str], None] | None = print,
) -> tuple[FeatureNet, dict[str, Any]]:
    """Train the feature net of built-in ``dataset_name`` on its train split; evaluate on its test split.

    Deterministic from ``seed`` (initialisation, shuffling and augmentation), for a given machine and
    thread count. AdamW with a one-epoch linear warm-up, then cosine decay. The returned net is in eval
    mode with its weights rounded to fp16, exactly as `save_feature_net` stores them, so the reported
    test accuracy is the shipped net's. Returns ``(net, report)``.
    """
    defaults = TRAINING_DEFAULTS.get(dataset_name)
    if defaults is None:
        raise ValueError(f"can only train feature nets for {', '.join(TRAINING_DEFAULTS)}, not {dataset_name!r}")
    resolution = resolution or defaults["resolution"]
    epochs = epochs or defaults["epochs"]
    num_images = num_images or defaults["num_images"]
    started = time.perf_counter()
    images, labels, class_names = load_split(dataset_name, "train", resolution, num_images)
    test_images, test_labels, _ = load_split(dataset_name, "test", resolution, num_images)
    generator = torch.Generator().manual_seed(seed)
    config = FeatureNetConfig(
        name=_NET_FOR_DATASET[dataset_name], dataset=dataset_name, num_classes=len(class_names),
        native_resolution=resolution, class_names=list(class_names),
    )
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, caller's global RNG left alone
        torch.manual_seed(seed)
        net = FeatureNet(config).train()
    decay = [p for p in net.parameters() if p.dim() > 1]  # no weight decay on norms and biases
    no_decay = [p for p in net.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = math.ceil(images.shape[0] / batch_size)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for epoch in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        loss_sum, epoch_start = 0.0, time.perf_counter()
        for start in range(0, images.shape[0], batch_size):
            index = order[start : start + batch_size]
            batch = augment(images[index], generator)
            loss = F.cross_entropy(net(batch)["logits"], labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * index.numel()
        if log is not None:
            seconds = time.perf_counter() - epoch_start
            log(
                f"{config.name} epoch {epoch + 1}/{epochs}: loss {loss_sum / images.shape[0]:.4f}, "
                f"test accuracy {accuracy(net, test_images, test_labels):.4f} ({seconds:.1f} s)"
            )
    with torch.no_grad():  # round to the stored precision so the report describes the shipped weights
        for tensor in net.state_dict().values():
            tensor.copy_(tensor.to(torch.float16).to(tensor.dtype))
    net.eval().requires_grad_(False)
    report = {
        "dataset": dataset_name,
        "test_accuracy": round(accuracy(net, test_images, test_labels), 5),
        "test_images": int(test_images.shape[0]),
        "train_images": int(images.shape[0]),
        "train_seconds": round(time.perf_counter() - started, 1),
        "data": f"effigen.data.build_dataset(DataConfig(name={dataset_name!r}, resolution={resolution}"
        + (f", num_images={num_images}" if num_images else "") + "), split='train' / 'test')",
        "weights_dtype": "float16 (stored), float32 (loaded)",
        "training": {
            "epochs": epochs, "batch_size": batch_size, "optimizer": "AdamW", "lr": lr,
            "weight_decay": weight_decay, "schedule": "1-epoch linear warm-up, cosine decay", "seed": seed,
            "resolution": resolution, "num_images": num_images, "threads": torch.get_num_threads(),
            "augmentation": "scale 0.9-1.1, rotation +-8 deg, shift +-2/32 (affine, border padding)",
        },
        "architecture": {key: value for key, value in asdict(config).items() if key != "class_names"},
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    return net, report
