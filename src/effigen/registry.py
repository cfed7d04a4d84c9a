"""The map from a method name to its network and objective classes, on one screen.

A method is a generator family that trains with the shared Trainer and samples through the Pipeline.
Folders store the method name, never a class path.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models.dit import DIT_PRESETS, DiT
from .objectives.ddpm import GaussianDiffusion
from .objectives.flow_matching import RectifiedFlow


@dataclass(frozen=True)
class Method:
    name: str
    network_class: type
    objective_class: type
    network_presets: dict
    paper: str


METHODS: dict[str, Method] = {
    "dit-flow": Method("dit-flow", DiT, RectifiedFlow, DIT_PRESETS, "DiT (2212.09748) + rectified flow (2209.03003)"),
    "dit-ddpm": Method("dit-ddpm", DiT, GaussianDiffusion, DIT_PRESETS, "DiT (2212.09748) + DDPM with learned variance"),
}

NETWORKS: dict[str, type] = {m.network_class.__name__: m.network_class for m in METHODS.values()}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
