"""Conversions between effigen's image tensors (float32 (B, 3, H, W) in [-1, 1]) and files.

Every image file is read through `convert_image`, which scales 16-bit grayscale PNGs (PIL modes I;16 and I) to 8 bits;
PIL's own `convert("RGB")` clips their 0..65535 values at 255, so anything above 1/257 of full scale turned white.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def convert_image(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """A PIL image in `mode` ("RGB" or "L") with 8-bit channels. 16-bit grayscale (I;16, I;16B, ..., and I, the mode
    older Pillows give 16-bit PNGs) is scaled 0..65535 -> 0..255 first, rounding like a 257 divisor (65535 -> 255);
    PIL's `convert` would clip it. 16-bit RGB(A) PNGs already open as 8-bit RGB(A) in PIL, scaled correctly."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        pixels = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8))  # mode L
    return image.convert(mode)  # a decoded copy even in the same mode, so the file can be closed


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


def load_image(path: str | Path, resolution: int, channels: int = 3) -> torch.Tensor:
    """An image file -> float (1, channels, resolution, resolution) in [-1, 1] (resized with antialiasing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as opened:
            image = convert_image(opened, "RGB" if channels == 3 else "L")
    except OSError as e:
        raise ValueError(f"{path} is not a readable image: {e}") from e
    return image_to_tensor(image, resolution, channels)


def image_to_tensor(image: Image.Image, resolution: int, channels: int = 3) -> torch.Tensor:
    """A PIL image -> float (1, channels, resolution, resolution) in [-1, 1] (resized bicubic, with antialiasing)."""
    image = convert_image(image, "RGB" if channels == 3 else "L")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32).reshape(resolution, resolution, channels)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).div(127.5).sub(1.0)


def load_mask(path: str | Path, resolution: int) -> torch.Tensor:
    """A mask image -> float (1, 1, resolution, resolution) in [0, 1] (white = 1), resized with area averaging."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file {path} does not exist")
    try:
        with Image.open(path) as opened:
            image = convert_image(opened, "L")
    except OSError as e:
        raise ValueError(f"{path} is not a readable image: {e}") from e
    return mask_to_tensor(np.asarray(image, dtype=np.float32) / 255.0, resolution)


def mask_to_tensor(mask: np.ndarray, resolution: int) -> torch.Tensor:
    """A (H, W) float mask in [0, 1] -> (1, 1, resolution, resolution), resized with area averaging."""
    mask = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    if tuple(mask.shape[-2:]) != (resolution, resolution):
        mask = torch.nn.functional.interpolate(mask, size=(resolution, resolution), mode="area")
    return mask


def box_mask(box: tuple[float, float, float, float], resolution: int) -> torch.Tensor:
    """(x0, y0, x1, y1) as fractions of the side (0..1) -> (1, 1, resolution, resolution), 1 inside the box."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"box {box} must be fractions 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1")
    mask = torch.zeros(1, 1, resolution, resolution)
    mask[..., round(y0 * resolution):round(y1 * resolution), round(x0 * resolution):round(x1 * resolution)] = 1.0
    return mask
