"""Datasets for training and evaluation: built-in real images (``mnist``, ``digits``), procedural
``shapes``, and ImageNet-style image ``folder`` trees. See `effigen.data.datasets` for details."""

from effigen.data.builtin import SHAPES_CLASS_NAMES, ShapesDataset, draw_shape_image
from effigen.data.datasets import (
    DATASETS,
    SPLITS,
    DataConfig,
    DataError,
    GrayscaleTensorDataset,
    ImageDataset,
    check_resolution,
    random_flip,
    stratified_split,
)
from effigen.data.build import build_dataset
from effigen.data.folder import FolderDataset, center_crop_arr, scan_folder

__all__ = [
    "DATASETS",
    "SPLITS",
    "SHAPES_CLASS_NAMES",
    "DataConfig",
    "DataError",
    "ImageDataset",
    "GrayscaleTensorDataset",
    "ShapesDataset",
    "FolderDataset",
    "build_dataset",
    "check_resolution",
    "random_flip",
    "stratified_split",
    "draw_shape_image",
    "center_crop_arr",
    "scan_folder",
]
