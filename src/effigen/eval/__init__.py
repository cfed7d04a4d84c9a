"""Evaluation: the TF-compatible Inception-v3 feature extractor and FID / sFID / IS / KID /
precision-recall, reproducing torch-fidelity 0.4.0 and the ADM evaluation suite.

Typical use::

    from effigen.eval import load_inception, load_images, extract_features, compute_statistics, frechet_distance

    model = load_inception("/path/to/weights-inception-2015-12-05-6726825d.pth")  # never downloaded
    fake = extract_features(model, load_images("samples.npz"), taps=["2048", "spatial", "logits_unbiased"])
    ref = load_reference_statistics("VIRTUAL_imagenet256_labeled.npz")
    fid = frechet_distance(*compute_statistics(fake["2048"]), ref["mu"], ref["sigma"])
    sfid = frechet_distance(*compute_statistics(fake["spatial"]), ref["mu_s"], ref["sigma_s"])
    is_mean, is_std = inception_score(fake["logits_unbiased"])
"""

from .inception import (
    INCEPTION_TAPS,
    INCEPTION_WEIGHT_FILENAMES,
    INCEPTION_WEIGHTS_ENV,
    InceptionV3Features,
    convert_inception_state_dict,
    default_inception_weights_dir,
    load_inception,
    resize_bilinear_tf1,
    resolve_inception_weights,
)
from .metrics import (
    compute_statistics,
    extract_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_images,
    load_reference_statistics,
    precision_recall,
    save_reference_statistics,
    spatial_frechet_distance,
)

__all__ = [
    "INCEPTION_TAPS",
    "INCEPTION_WEIGHT_FILENAMES",
    "INCEPTION_WEIGHTS_ENV",
    "InceptionV3Features",
    "compute_statistics",
    "convert_inception_state_dict",
    "default_inception_weights_dir",
    "extract_features",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "load_images",
    "load_inception",
    "load_reference_statistics",
    "precision_recall",
    "resize_bilinear_tf1",
    "resolve_inception_weights",
    "save_reference_statistics",
    "spatial_frechet_distance",
]
