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
