"""`build_dataset`: the one entry from a `DataConfig` to a dataset, dispatching to the built-in sets, image folders
and latent caches. It sits above the modules that define them (each subclasses `datasets.ImageDataset`), so the data
package has no import cycle."""

from __future__ import annotations

from effigen.data.builtin import build_builtin_dataset
from effigen.data.datasets import DataConfig, DataError, ImageDataset, _validate
from effigen.data.folder import build_folder_dataset
from effigen.data.latents import LatentDataset


def build_dataset(config: DataConfig, split: str = "train") -> ImageDataset:
    """Build the ``split`` ("train" or "test") of the dataset described by ``config``."""
    _validate(config, split)
    if config.name == "latents":
        if not config.root:
            raise DataError("data.name=latents needs data.root, the folder of a latent cache (`effigen cache-latents`)")
        if split != "train":
            raise DataError("a latent cache holds one split of its source dataset; evaluate and preview against the "
                            "source dataset (the pipeline records it)")
        return LatentDataset(config.root, config.resolution)
    if config.name == "folder":
        return build_folder_dataset(config, split)
    return build_builtin_dataset(config, split)
