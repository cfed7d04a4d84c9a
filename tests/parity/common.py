"""Shared discovery for parity tests (see ../shared/parity/README.md).

Folders come from $EFFIGEN_PARITY_DIR (default <repo>/../shared/parity); every folder whose manifest
names a supported architecture is a test case; a missing root or no supported folder is a failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PARITY_ROOT = Path(os.environ.get("EFFIGEN_PARITY_DIR") or (REPO_ROOT.parent / "shared" / "parity"))


def discover(architecture: str) -> list:
    """pytest params: one per matching folder, or one that fails with the reason."""
    reason = None
    found = []
    if not PARITY_ROOT.is_dir():
        reason = f"parity root folder {PARITY_ROOT} does not exist (set EFFIGEN_PARITY_DIR)"
    else:
        for sub in sorted(PARITY_ROOT.iterdir()):
            manifest = sub / "manifest.json"
            if manifest.is_file():
                try:
                    if json.loads(manifest.read_text()).get("architecture") == architecture:
                        found.append(sub.name)
                except (OSError, ValueError):
                    continue
        if not found:
            reason = f"no folder under {PARITY_ROOT} has a manifest with architecture {architecture!r}"
    if found:
        return found
    return [pytest.param(reason, id="no-supported-parity-folder")]


def folder(name: str) -> Path:
    path = PARITY_ROOT / name
    if not (path / "manifest.json").is_file():
        pytest.fail(name)  # `name` carries the discovery failure reason
    return path


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def vectors_path(path: Path, spec: dict) -> Path:
    """The folder's tensors file: the manifest's "vectors" entry, else the README's default name."""
    return path / spec.get("vectors", "vectors.safetensors")


def relative_error(a, b) -> float:
    a = np.asarray(a.detach().double().numpy() if hasattr(a, "detach") else a, dtype=np.float64)
    b = np.asarray(b.detach().double().numpy() if hasattr(b, "detach") else b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def max_abs_error(a, b) -> float:
    """max |a - b| in float64 (the manifests' `max_abs` tolerance rule)."""
    a = a.detach().double() if hasattr(a, "detach") else np.asarray(a, dtype=np.float64)
    b = b.detach().double() if hasattr(b, "detach") else np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def assert_max_abs(spec: dict, name: str, actual, expected) -> None:
    """max |actual - expected| <= the manifest's tolerance["max_abs"][name], with both in the message."""
    error, tol = max_abs_error(actual, expected), spec["tolerance"]["max_abs"][name]
    assert error <= tol, f"{name}: max abs error {error:.3g} > {tol:.3g}"


def replay_noise(monkeypatch, draws):
    """Make effigen's samplers draw recorded noise: returns (generator, used). Every `torch.randn(shape,
    generator=generator)` call returns the next (step, sample) slice of `draws` (steps, B, ...) in order (effigen draws
    one sample at a time, step by step); calls with any other generator are untouched. `used` counts the draws."""
    import torch

    marker, real_randn, used = torch.Generator(), torch.randn, []

    def recorded_randn(*shape, generator=None, **kwargs):
        if generator is not marker:
            return real_randn(*shape, generator=generator, **kwargs)
        step, index = divmod(len(used), draws.shape[1])
        used.append((step, index))
        return draws[step, index].to(torch.float32)

    monkeypatch.setattr(torch, "randn", recorded_randn)
    return marker, used


def repa_heads_argument(path: Path, spec: dict) -> int | None:
    """For a REPA/SiT checkpoint: None when the converter tells the head count itself (args.model, qk-norm, an
    official width); otherwise the manifest's, as a user passes --num-heads."""
    from effigen.convert.sit_official import load_official_checkpoint, resolve_heads
    from effigen.io import CheckpointError

    state, args, _, _ = load_official_checkpoint(path / spec["checkpoint"])
    try:
        resolve_heads(state["x_embedder.proj.weight"].shape[0], None, args, state)
        return None
    except CheckpointError:
        return spec["sit"]["num_heads"]
