"""Built-in teachers for the built-in data, shipped inside the package (nothing is downloaded):

- `mnist-vit`: a small ViT (DINOv2's architecture, `teachers/vit.py`: 32 px, patch 4 -> 8 x 8 = 64 patch tokens plus
  CLS, width 128, 4 heads, 6 blocks, MLP ratio 2, no registers or layer scale, learned positions interpolated like
  DINOv2's *_reg models) trained by effigen as a classifier on the built-in MNIST train split. The classifier head
  reads DINOv2's linear-probe input, [final-normed CLS, mean of the final-normed patch tokens], so the patch tokens
  themselves are trained. As a teacher it has attention maps (HASTE) and serves any token grid (the images are resized
  to grid * 4 px). Weights: `effigen/assets/teacher-mnist-vit.safetensors` (fp16, config in the metadata), its record
  (test accuracy, command) in `assets/teachers.json`; rebuild with `scripts/build_teachers.py`.
- `mnist-net`: the convolutional FID feature net (`eval/feature_nets.py`) as a features-only teacher: its deepest 8 x 8
  feature map (the last 3x3 conv stage, 128 channels, at its native 32 px) as 64 tokens, so it lands on the 8 x 8
  token grid of every MNIST preset (pixel DiT 32 px / patch 4 and 16 px / patch 2, KL-VAE latents 8 x 8 / patch 1);
  other grids are pooled or repeated when the sides divide, else refused (`check_grid_mapping`).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..eval.feature_nets import FeatureNet, augment, load_split
from ..io import CheckpointError, load_state_dict_strict, load_weights
from ..nn.embeddings import sincos_2d_positions
from .base import Teacher, TeacherError
from .vit import ViTConfig, ViTTeacher, VisionTransformer

BUILTIN_TEACHERS = ("mnist-vit", "mnist-net")
REBUILD_COMMAND = ".venv/bin/python scripts/build_teachers.py"
METADATA_KEY = "effigen_teacher"
MNIST_NET_GRID = 8  # the 8 x 8 token grid of the MNIST presets

# the built-in ViT teacher per dataset, and how scripts/build_teachers.py trains it
VIT_TEACHERS: dict[str, dict[str, Any]] = {
    "mnist-vit": {
        "dataset": "mnist",
        "config": ViTConfig(image_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, ffn="mlp",
                            ffn_hidden_dim=256, layer_scale=False, num_register_tokens=0,
                            interpolate_antialias=True, interpolate_offset=0.0),
        "training": {"epochs": 30, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.05, "label_smoothing": 0.1},
    },
}
_SPREAD = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # [-1, 1] images go in as they are


class ViTClassifier(nn.Module):
    """A `VisionTransformer` plus a linear head on [normed CLS, mean normed patch token]: the form the built-in ViT
    teachers are trained in (the head is dropped by the teacher)."""

    def __init__(self, config: ViTConfig, num_classes: int):
        super().__init__()
        self.vit = VisionTransformer(config)
        self.head = nn.Linear(2 * config.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)  # zero-init head: the first steps train the representation, not the head
        nn.init.zeros_(self.head.bias)
        # learned positions that start as the 2-D sin-cos table (MAE's): a ViT on 4,500 digits otherwise spends
        # most of its steps discovering which patches are neighbours
        table = sincos_2d_positions(config.embed_dim, config.table_grid)
        with torch.no_grad():
            self.vit.pos_embed[0, 1:] = torch.from_numpy(table).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.norm(self.vit(x))  # (B, 1 + R + N, D)
        pooled = torch.cat((tokens[:, 0], tokens[:, self.vit.num_prefix_tokens:].mean(1)), dim=-1)  # (B, 2D)
        return self.head(pooled)  # (B, K)


# --------------------------------------------------------------------------- files

def teacher_asset(name: str) -> Path:
    """Path of the packaged weights of built-in ViT teacher `name` (may be absent if not built)."""
    return Path(str(resources.files("effigen").joinpath("assets").joinpath(f"teacher-{name}.safetensors")))


def save_vit_classifier(model: ViTClassifier, path: str | Path, meta: dict[str, Any]) -> None:
    """fp16 weights + `{"config", **meta}` as one safetensors metadata entry, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps({"config": asdict(model.vit.config), **meta}, sort_keys=True)}
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_vit_classifier(path: str | Path) -> tuple[ViTClassifier, dict[str, Any]]:
    """(classifier in eval mode, float32; its metadata) from a file written by `save_vit_classifier`."""
    path = Path(path)
    try:
        state = load_weights(path)
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[METADATA_KEY])
        model = ViTClassifier(ViTConfig(**meta["config"]), int(meta["num_classes"]))
        load_state_dict_strict(model, {k: v.float() for k, v in state.items()}, str(path))
    except (CheckpointError, KeyError, TypeError, ValueError) as error:
        raise TeacherError(f"{path} is not a teacher file written by effigen ({type(error).__name__}: {error}); "
                           f"rebuild the built-in ones with `{REBUILD_COMMAND}`") from None
    return model.eval().requires_grad_(False), meta


def load_vit_teacher(name: str, path: str | Path | None = None, resize_antialias: bool = True) -> ViTTeacher:
    """Built-in ViT teacher `name`, from its packaged file or from `path` (a rebuilt one)."""
    path = Path(path) if path else teacher_asset(name)
    if not path.is_file():
        raise TeacherError(f"the {name} teacher's weights {path} are missing; rebuild them with `{REBUILD_COMMAND}`")
    model, meta = load_vit_classifier(path)
    return ViTTeacher(model.vit, name, mean=meta["mean"], std=meta["std"], resize_antialias=resize_antialias)


class FeatureNetTeacher(Teacher):
    """A `FeatureNet` (convolutional, `eval/feature_nets.py`) as a features-only teacher: its deepest feature map of
    side `grid` at the net's native resolution, as (B, grid^2, C) tokens (row-major). It cannot interpolate: a student
    grid is served by pooling or repeating when the sides divide (`Teacher.grid_for`), else a `TeacherError`."""

    interpolates = False
    num_heads = 0  # no attention maps

    def __init__(self, net: FeatureNet, grid: int, name: str | None = None):
        super().__init__()
        self.net = net
        self.name = name or net.config.name
        size = net.config.native_resolution
        with torch.no_grad():
            x, sides = torch.zeros(1, 3, size, size), []
            for layer in net.body:
                x = layer(x)
                sides.append((x.shape[-1], x.shape[1]))
        found = [i for i, (side, _) in enumerate(sides) if side == grid]
        if not found:
            raise TeacherError(f"the {self.name} net has feature maps of sides {sorted({s for s, _ in sides})} at "
                               f"{size} px, none of {grid} x {grid}")
        self.last_layer = found[-1]
        self.embed_dim = sides[self.last_layer][1]
        self.native_grid = grid
        self.patch_size = size // grid
        self.depth = 0
        self.frozen()

    def _features(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        x = self.net.prepare(images)  # [-1, 1], resized to the native resolution
        for layer in self.net.body[: self.last_layer + 1]:
            x = layer(x)
        return x.flatten(2).transpose(1, 2)  # (B, grid^2, C)


# --------------------------------------------------------------------------- training

@torch.no_grad()
def classifier_accuracy(model: ViTClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    was_training = model.training
    model.eval()
    correct = sum(int((model(images[i: i + batch_size]).argmax(1) == labels[i: i + batch_size]).sum())
                  for i in range(0, images.shape[0], batch_size))
    model.train(was_training)
    return correct / max(images.shape[0], 1)


def train_vit_teacher(name: str = "mnist-vit", epochs: int | None = None, seed: int = 0,
                      log: Callable[[str], None] | None = print) -> tuple[ViTClassifier, dict[str, Any]]:
    """Train built-in ViT teacher `name` as a classifier on its dataset's train split; report the test accuracy.

    AdamW (no decay on norms, biases, tokens and positions), one-epoch linear warm-up then cosine decay, label
    smoothing, the feature nets' light affine jitter. Deterministic from `seed` for a machine and thread count. The
    returned model is in eval mode with its weights rounded to fp16 as stored, so the report describes the shipped
    file. Returns `(model, report)`."""
    if name not in VIT_TEACHERS:
        raise ValueError(f"no training recipe for {name!r}; built-in ViT teachers: {', '.join(VIT_TEACHERS)}")
    recipe = VIT_TEACHERS[name]
    config, train = recipe["config"], dict(recipe["training"])
    train["epochs"] = epochs or train["epochs"]
    started = time.perf_counter()
    images, labels, class_names = load_split(recipe["dataset"], "train", config.image_size)
    test_images, test_labels, _ = load_split(recipe["dataset"], "test", config.image_size)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, the caller's global RNG left alone
        torch.manual_seed(seed)
        model = ViTClassifier(config, len(class_names)).train()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() > 1 and n.endswith("weight"))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train["weight_decay"]},
                                   {"params": rest, "weight_decay": 0.0}], lr=train["lr"])
    steps_per_epoch = math.ceil(images.shape[0] / train["batch_size"])
    total, warmup = train["epochs"] * steps_per_epoch, steps_per_epoch

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for epoch in range(train["epochs"]):
        order = torch.randperm(images.shape[0], generator=generator)
        loss_sum, epoch_start = 0.0, time.perf_counter()
        for start in range(0, images.shape[0], train["batch_size"]):
            index = order[start: start + train["batch_size"]]
            logits = model(augment(images[index], generator))
            loss = F.cross_entropy(logits, labels[index], label_smoothing=train["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * index.numel()
        if log is not None:
            log(f"{name} epoch {epoch + 1}/{train['epochs']}: loss {loss_sum / images.shape[0]:.4f}, test accuracy "
                f"{classifier_accuracy(model, test_images, test_labels):.4f} ({time.perf_counter() - epoch_start:.1f} s)")
    with torch.no_grad():  # round to the stored precision so the report describes the shipped weights
        for tensor in model.state_dict().values():
            tensor.copy_(tensor.to(torch.float16).to(tensor.dtype))
    model.eval().requires_grad_(False)
    report = {
        "dataset": recipe["dataset"],
        "num_classes": len(class_names),
        "class_names": list(class_names),
        **_SPREAD,
        "test_accuracy": round(classifier_accuracy(model, test_images, test_labels), 5),
        "test_images": int(test_images.shape[0]),
        "train_images": int(images.shape[0]),
        "train_seconds": round(time.perf_counter() - started, 1),
        "data": f"effigen.data.build_dataset(DataConfig(name={recipe['dataset']!r}, resolution={config.image_size}), "
                "split='train' / 'test')",
        "weights_dtype": "float16 (stored), float32 (loaded)",
        "training": {**train, "optimizer": "AdamW", "schedule": "1-epoch linear warm-up, cosine decay", "seed": seed,
                     "threads": torch.get_num_threads(),
                     "augmentation": "scale 0.9-1.1, rotation +-8 deg, shift +-2/32 (affine, border padding)"},
        "parameters": sum(p.numel() for p in model.vit.parameters()),
    }
    return model, report
