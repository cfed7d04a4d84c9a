"""Conversions between effigen's image tensors (float32 (B, 3, H, W) in [-1, 1]) and files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, 3, H, W) -> uint8 (B, 3, H, W), rounding as ADM's sampler does."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(array) for array in to_uint8(images).permute(0, 2, 3, 1).numpy()]


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (B, 3, H, W) images in [-1, 1] into one uint8 (H', W', 3) array, `nrow` images per row."""
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    count, height, width, _ = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(count))
    rows = math.ceil(count / nrow)
    grid = np.full(
        (rows * (height + padding) + padding, nrow * (width + padding) + padding, 3), 255, dtype=np.uint8
    )
    for index in range(count):
        r, c = divmod(index, nrow)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[top : top + height, left : left + width] = pixels[index]
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(make_grid(images, nrow))
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    image.save(path)
    return path


def save_images(images: torch.Tensor, folder: str | Path, prefix: str = "", start: int = 0) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(to_pil(images)):
        path = folder / f"{prefix}{start + i:06d}.png"
        image.save(path)
        paths.append(path)
    return paths
