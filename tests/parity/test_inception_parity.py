"""Parity of effigen.eval against torch-fidelity 0.4.0's TF-compatible Inception-v3 and metrics.

Reads every folder under ``$EFFIGEN_PARITY_DIR`` (default ``<repo>/../shared/parity``) whose
``manifest.json`` names ``"architecture": "inception-fid-torch-fidelity"`` and checks, against the
manifest's tolerances: every feature tap of the probe images, FID / IS (mean, std) / KID (mean, std)
between the two image sets the manifest names (``set_a`` and ``set_b``). A missing root folder or no
supported folder is a failure.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from .common import PARITY_ROOT, discover, folder, relative_error, vectors_path
from effigen.eval import (
    compute_statistics,
    convert_inception_state_dict,
    extract_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_images,
    load_inception,
)

ARCHITECTURE = "inception-fid-torch-fidelity"
PARAMS = discover(ARCHITECTURE)

pytestmark = pytest.mark.parity


def _folder(name: str) -> Path:
    return folder(name)


def _rel(a, b) -> float:
    return relative_error(a, b)


def _int_setting(text: str, pattern: str, default: int) -> int:
    m = re.search(pattern, text or "")
    return int(m.group(1)) if m else default


@functools.lru_cache(maxsize=None)
def _manifest(name: str) -> dict:
    return json.loads((PARITY_ROOT / name / "manifest.json").read_text())


@functools.lru_cache(maxsize=None)
def _model(name: str):
    return load_inception(PARITY_ROOT / name / _manifest(name)["weights"])


def _image_sets(name: str) -> tuple[str, str]:
    """The two image folders the manifest names, in its order: FID/KID compare them, IS scores the first."""
    sets = tuple(_manifest(name)["image_sets"])
    assert len(sets) == 2, f"{name}: expected two image sets, the manifest names {sets}"
    return sets


@functools.lru_cache(maxsize=None)
def _set_features(name: str) -> list[dict[str, np.ndarray]]:
    model = _model(name)
    taps = ["2048", "logits_unbiased"]
    return [extract_features(model, load_images(PARITY_ROOT / name / s), batch_size=40, taps=taps, progress=False)
            for s in _image_sets(name)]


@pytest.mark.parametrize("name", PARAMS)
def test_probe_features(name):
    folder = _folder(name)
    from safetensors.numpy import load_file

    vectors = load_file(str(vectors_path(folder, _manifest(name))))
    tol = _manifest(name)["tolerance"]["features_rel_l2"]
    taps = {k[len("probe_features_"):]: v for k, v in vectors.items() if k.startswith("probe_features_")}
    assert taps, f"{folder}: no probe_features_* tensors"
    model = _model(name)
    with torch.inference_mode():
        out = model(torch.from_numpy(vectors["probe_images_uint8"]), taps=list(taps))
    errors = {t: _rel(out[t].numpy(), ref) for t, ref in taps.items()}
    print(f"{name} probe feature rel L2 errors (tol {tol}): {errors}")
    bad = {t: e for t, e in errors.items() if not e <= tol}
    assert not bad, f"{name}: taps over tolerance {tol}: {bad}"


@pytest.mark.parametrize("name", PARAMS)
def test_fid(name):
    _folder(name)
    man = _manifest(name)
    f = _set_features(name)
    fid = frechet_distance(*compute_statistics(f[0]["2048"]), *compute_statistics(f[1]["2048"]))
    ref = man["metrics"]["frechet_inception_distance"]
    err = abs(fid - ref) / abs(ref)
    print(f"{name} FID {fid!r} vs {ref!r}: rel err {err:.3g} (tol {man['tolerance']['fid_rel']})")
    assert err <= man["tolerance"]["fid_rel"]


@pytest.mark.parametrize("name", PARAMS)
def test_inception_score(name):
    _folder(name)
    man = _manifest(name)
    splits = _int_setting(man.get("metric_settings", {}).get("isc", ""), r"(\d+)\s*splits", 10)
    # The manifest's prose says "no shuffling", but its numbers are torch-fidelity's default
    # (samples_shuffle=True, RandomState(2020).permutation); an explicit key would override that.
    shuffle = bool(man.get("metric_settings", {}).get("isc_shuffle", True))
    mean, std = inception_score(_set_features(name)[0]["logits_unbiased"], splits=splits, shuffle=shuffle)
    tol = man["tolerance"]["isc_rel"]
    ref_mean, ref_std = man["metrics"]["inception_score_mean"], man["metrics"]["inception_score_std"]
    e_mean, e_std = abs(mean - ref_mean) / abs(ref_mean), abs(std - ref_std) / abs(ref_std)
    print(f"{name} IS ({mean!r}, {std!r}) vs ({ref_mean!r}, {ref_std!r}): rel err {e_mean:.3g}, {e_std:.3g} (tol {tol})")
    assert e_mean <= tol and e_std <= tol


@pytest.mark.parametrize("name", PARAMS)
def test_kid(name):
    _folder(name)
    man = _manifest(name)
    text = man.get("metric_settings", {}).get("kid", "")
    subset_size = _int_setting(text, r"subset size\s*(\d+)", 1000)
    subsets = _int_setting(text, r"(\d+)\s*subsets", 100)
    degree = _int_setting(text, r"degree\s*(\d+)", 3)
    f = _set_features(name)
    mean, std = kernel_inception_distance(
        f[0]["2048"], f[1]["2048"], subset_size=subset_size, subsets=subsets, degree=degree
    )
    tol = man["tolerance"].get("kid_rel", man["tolerance"]["fid_rel"])
    ref_mean = man["metrics"]["kernel_inception_distance_mean"]
    ref_std = man["metrics"]["kernel_inception_distance_std"]
    e_mean, e_std = abs(mean - ref_mean) / abs(ref_mean), abs(std - ref_std) / abs(ref_std)
    print(f"{name} KID ({mean!r}, {std!r}) vs ({ref_mean!r}, {ref_std!r}): rel err {e_mean:.3g}, {e_std:.3g} (tol {tol})")
    assert e_mean <= tol and e_std <= tol


@pytest.mark.parametrize("name", PARAMS)
def test_released_weight_layouts_load(name):
    """The parity file is in the released (torch-fidelity) layout; the same weights without the
    BatchNorm ``num_batches_tracked`` entries (as the TF->PyTorch converters write them) and as a
    pytorch-fid ``InceptionV3`` module state dict (``blocks.*``, no classifier) give the same taps.
    (tests/test_metrics.py covers the same through files on disk with random weights.)"""
    folder = _folder(name)
    path = folder / _manifest(name)["weights"]
    sd = torch.load(path, map_location="cpu", weights_only=True)
    _, layout = convert_inception_state_dict(sd, str(path))
    assert layout == "flat"
    from safetensors.numpy import load_file

    images = torch.from_numpy(load_file(str(vectors_path(folder, _manifest(name))))["probe_images_uint8"][:1])
    with torch.inference_mode():
        ref = _model(name)(images)

    no_nbt = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    blocks = [
        ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"],
        ["Conv2d_3b_1x1", "Conv2d_4a_3x3"],
        ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
        ["Mixed_7a", "Mixed_7b", "Mixed_7c"],
    ]
    rename = {n: f"blocks.{i}.{j}" for i, names in enumerate(blocks) for j, n in enumerate(names)}
    blocks_sd = {}
    for k, v in sd.items():
        head, rest = k.split(".", 1)
        if head != "fc":
            blocks_sd[rename[head] + "." + rest] = v

    m1 = load_inception(no_nbt)
    m2 = load_inception(blocks_sd)
    assert not m2.has_classifier
    with torch.inference_mode():
        o1, o2 = m1(images), m2(images)
    for tap in ref:
        torch.testing.assert_close(o1[tap], ref[tap], rtol=0, atol=0)
        if tap in m2.available_taps:
            torch.testing.assert_close(o2[tap], ref[tap], rtol=0, atol=0)
    with pytest.raises(ValueError, match="classifier"):
        m2(images, taps=["logits"])
