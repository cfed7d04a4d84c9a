"""The ``folder`` dataset: an ImageNet-style tree ``root/<class_name>/<image files>``.

Classes are the subfolders of ``root`` sorted by name (hidden folders skipped); each class's images
are found recursively (png, jpg, jpeg, webp, bmp, any letter case) and sorted by path. Images are
decoded lazily in ``__getitem__`` and preprocessed like ADM (guided-diffusion's ``center_crop_arr``):
halve with a BOX filter while the short side is >= 2x the target, BICUBIC-resize the short side to
the target, then crop the centre square. 16-bit grayscale PNGs are scaled to 8 bits (`effigen.images.convert_image`),
not clipped at 255 as PIL's `convert("RGB")` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from effigen.data.datasets import DataConfig, DataError, ImageDataset, stratified_split
from effigen.images import convert_image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM's preprocessing: uint8 ``(resolution, resolution, 3)`` centre crop of an RGB PIL image."""
    # Halving with BOX first is cheap and avoids the aliasing a single large bicubic shrink causes.
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def scan_folder(root: str | Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Class names, image paths and labels of a class-per-subfolder tree, checking its layout."""
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DataError(
            f"dataset root {str(root_path)!r} does not exist; "
            "pass --data.root=PATH to a folder with one subfolder per class"
        )
    if not root_path.is_dir():
        raise DataError(
            f"dataset root {str(root_path)!r} is a file, not a folder; "
            "pass --data.root=PATH to a folder with one subfolder per class"
        )
    class_folders = sorted(
        (entry for entry in root_path.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda entry: entry.name,
    )
    if not class_folders:
        loose_images = any(_is_image(entry) for entry in root_path.iterdir())
        hint = (
            f"; it holds images directly, so move them into a subfolder such as {str(root_path / 'all')!r}"
            if loose_images
            else ""
        )
        raise DataError(
            f"dataset root {str(root_path)!r} has no class subfolders{hint}; "
            "the folder dataset needs root/<class_name>/<image files> (png, jpg, jpeg, webp or bmp)"
        )
    class_names: list[str] = []
    paths: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(class_folders):
        images = sorted(path for path in folder.rglob("*") if _is_image(path))
        if not images:
            raise DataError(
                f"class {folder.name!r} has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} "
                f"in {str(folder)!r}); add images to it or remove the folder"
            )
        class_names.append(folder.name)
        paths.extend(images)
        labels.extend([label] * len(images))
    return class_names, paths, np.asarray(labels, dtype=np.int64)


class FolderDataset(ImageDataset):
    """Images decoded on demand from a list of paths; a corrupt file raises DataError naming it."""

    def __init__(
        self, split: str, resolution: int, class_names: list[str], paths: list[Path], labels: np.ndarray
    ) -> None:
        super().__init__("folder", split, resolution, class_names)
        self.paths = paths
        self._labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = self._check_index(index)
        path = self.paths[index]
        try:
            with Image.open(path) as opened:
                # convert() forces the full decode inside the try, so truncated files are caught here.
                image = convert_image(opened, "RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise DataError(
                f"cannot read image {str(path)!r} ({type(error).__name__}: {error}); "
                "delete or replace the corrupt file"
            ) from error
        pixels = center_crop_arr(image, self.resolution)
        tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).to(torch.float32)
        return tensor.div_(127.5).sub_(1.0), int(self._labels[index])

    @property
    def labels(self) -> torch.Tensor:
        return self._labels.clone()


def build_folder_dataset(config: DataConfig, split: str) -> FolderDataset:
    """Build a split of the ``folder`` dataset (``config`` already validated by `build_dataset`)."""
    if not config.root:
        raise DataError(
            "the folder dataset needs a root; pass --data.root=PATH to a folder with one subfolder per class"
        )
    class_names, paths, labels = scan_folder(config.root)
    indices = stratified_split(labels, config.holdout_fraction, config.seed)[split]
    return FolderDataset(
        split, config.resolution, class_names, [paths[index] for index in indices], labels[indices]
    )
