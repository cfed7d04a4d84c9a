"""A low-bit copy of any effigen network: its nn.Linear / nn.Conv2d layers replaced by `nn.quant.QuantLayer`
(packed integer weights, per-timestep activation step sizes), everything else (norms, embeddings tables, position
tables) kept in float. Built by `effigen quantize` (post/quantize.py, EfficientDM); saved and loaded as the generator
component of a pipeline folder like any network, with the objective and sampler of the folder it came from.

The activation step sizes are calibrated on the grid of times that the folder's sampler passes to the network
(`time_grid`, ascending). At every forward this wrapper looks up each sample's t on that grid and hands the layers
their row through a `TimestepContext` (explicitly, from the t it is given; the official code's call counter breaks
under guidance batching or another step count). For a t between grid points (another step count or solver):

- "interpolate" (default): the step size and zero point are interpolated linearly in t between the two neighbouring
  grid rows (times outside the grid take the nearest end row);
- "nearest": the nearest row;
- "strict": an error that names the calibrated step count (re-quantize for the new sampler instead).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..nn.quant import LayerSpec, QuantLayer, TimestepContext

POLICIES = ("interpolate", "nearest", "strict")


@dataclass
class QuantizedConfig:
    base_class: str = ""  # the network class it quantizes (registry component name): DiT, DiCo, ...
    base_config: dict = field(default_factory=dict)  # that class's config
    layers: dict = field(default_factory=dict)  # module name -> [w_bits, a_bits] of each quantized layer
    time_grid: list = field(default_factory=lambda: [0.0])  # the calibrated t values, ascending
    timestep_policy: str = "interpolate"
    time_tolerance: float = 1e-4  # |t - grid point| below which t is that grid point

    def __post_init__(self):
        self.time_grid = [float(t) for t in self.time_grid]
        if not self.time_grid:
            raise ValueError("time_grid is empty: calibrate on at least one sampling step")
        if any(b <= a for a, b in zip(self.time_grid, self.time_grid[1:])):
            raise ValueError("time_grid must increase strictly (the calibrated t values, sorted)")
        if self.timestep_policy not in POLICIES:
            raise ValueError(f"timestep_policy must be one of {', '.join(POLICIES)}, got {self.timestep_policy!r}")
        for name, bits in self.layers.items():
            if not (isinstance(bits, (list, tuple)) and len(bits) == 2):
                raise ValueError(f"layers[{name!r}] must be [w_bits, a_bits], got {bits!r}")

    def __getattr__(self, name: str) -> Any:
        # The base network's settings (input_size, in_channels, num_classes, learn_sigma, ...) read through: the
        # pipeline and objectives use a quantized network as the network it quantizes.
        if name.startswith("__") or name in ("base_config", "_base"):
            raise AttributeError(name)
        base = self.__dict__.get("_base")
        if base is not None and hasattr(base, name):
            return getattr(base, name)
        raise AttributeError(f"{type(self).__name__} (of a {self.__dict__.get('base_class')}) has no setting {name!r}")


class QuantizedNetwork(nn.Module):
    config_class = QuantizedConfig
    # class name -> class, for the base network (set by the registry: models do not import it)
    resolve_class: Callable[[str], type] | None = None

    def __init__(self, config: QuantizedConfig, base: nn.Module | None = None):
        super().__init__()
        if base is None:
            if QuantizedNetwork.resolve_class is None:
                raise RuntimeError("no class resolver: import effigen.registry before building a QuantizedNetwork")
            cls = QuantizedNetwork.resolve_class(config.base_class)
            base = cls(cls.config_class(**config.base_config))
        config._base = base.config
        self.config = config
        self.context = TimestepContext()
        steps = len(config.time_grid)
        modules = dict(base.named_modules())
        for name, (w_bits, a_bits) in config.layers.items():
            if name not in modules:
                raise ValueError(f"layer {name!r} of the quantization config is not in the {config.base_class}")
            layer = QuantLayer(LayerSpec.of(modules[name]), int(w_bits), int(a_bits), steps, self.context)
            _set_module(base, name, layer.to(_device_of(modules[name])))
        self.network = base
        self.register_buffer("time_grid", torch.tensor(config.time_grid, dtype=torch.float64), persistent=False)

    @property
    def base_network_class(self) -> type:
        """The class this network stands in for (what a method's `network_class` is compared with)."""
        return type(self.network)

    def logical_parameter_count(self) -> int:
        """Parameters of the network it quantizes: each packed weight counted as its number of weights (not bytes),
        plus biases and the float parameters kept (norms, embedding tables); step-size tables are not counted."""
        total = 0
        for module in self.network.modules():
            if isinstance(module, QuantLayer):
                total += math.prod(module.spec.weight_shape) + (module.spec.out_features if module.bias is not None else 0)
            else:
                total += sum(p.numel() for p in module.parameters(recurse=False))
        return total

    def quant_layers(self) -> dict[str, QuantLayer]:
        return {name: m for name, m in self.network.named_modules() if isinstance(m, QuantLayer)}

    # -------------------------------------------------------------- timesteps
    def timestep_rows(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index0, index1, frac) per sample: the grid rows around each t and the interpolation weight."""
        grid = self.time_grid.to(t.device)
        tt = t.detach().reshape(-1).to(torch.float64)
        n = grid.numel()
        tol = self.config.time_tolerance
        hi = torch.searchsorted(grid, tt).clamp(max=n - 1)
        lo = (hi - 1).clamp(min=0)
        near = torch.where((tt - grid[lo]).abs() <= (tt - grid[hi]).abs(), lo, hi)
        on_grid = (tt - grid[near]).abs() <= tol
        policy = self.config.timestep_policy
        if policy == "strict" and not bool(on_grid.all()):
            bad = float(tt[~on_grid][0])
            raise ValueError(f"t = {bad:.6g} is not a calibrated timestep: this quantized network was calibrated for "
                             f"{n} sampling steps (t in {[round(float(g), 6) for g in grid[:4]]}...); sample with "
                             f"the folder's saved sampler, or set timestep_policy to 'interpolate' or 'nearest' in "
                             f"generator/config.json, or re-quantize for the new step count")
        if policy == "nearest" or n == 1:
            return near, near, torch.zeros_like(tt, dtype=torch.float32)
        span = (grid[hi] - grid[lo]).clamp_min(1e-12)
        frac = ((tt - grid[lo]) / span).clamp(0, 1)
        frac = torch.where(on_grid, (near == hi).to(frac.dtype), frac)  # exact rows on grid points
        frac = torch.where(tt >= grid[-1], torch.ones_like(frac), frac)
        frac = torch.where(tt <= grid[0], torch.zeros_like(frac), frac)
        return lo, hi, frac.float()

    def forward(self, x: torch.Tensor, t: torch.Tensor, *args, **kwargs):
        t_rows = t if t.ndim else t.expand(x.shape[0])
        self.context.set(*self.timestep_rows(t_rows))
        try:
            return self.network(x, t, *args, **kwargs)
        finally:
            self.context.clear()

    # -------------------------------------------------------------- building from a float network
    @classmethod
    def from_float(cls, network: nn.Module, class_name: str, base_config: dict, layers: dict[str, tuple[int, int]],
                   time_grid: list[float], timestep_policy: str = "interpolate") -> "QuantizedNetwork":
        """Quantize `network`'s weights (per-channel MSE init); activation step sizes start at 1 (calibrate them with
        `QuantLayer.set_activation_params`)."""
        import copy

        base = copy.deepcopy(network)
        config = QuantizedConfig(base_class=class_name, base_config=base_config,
                                 layers={k: [int(w), int(a)] for k, (w, a) in layers.items()},
                                 time_grid=sorted(float(t) for t in time_grid), timestep_policy=timestep_policy)
        source = dict(network.named_modules())
        quantized = cls.__new__(cls)
        nn.Module.__init__(quantized)
        config._base = network.config
        quantized.config = config
        quantized.context = TimestepContext()
        steps = len(config.time_grid)
        for name, (w_bits, a_bits) in config.layers.items():
            layer = QuantLayer.from_float(source[name], int(w_bits), int(a_bits), steps, quantized.context)
            _set_module(base, name, layer)
        quantized.network = base
        quantized.register_buffer("time_grid", torch.tensor(config.time_grid, dtype=torch.float64), persistent=False)
        return quantized


def quantizable_layers(network: nn.Module) -> list[str]:
    """Names of the nn.Linear / nn.Conv2d modules, in registration order."""
    return [name for name, m in network.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def boundary_layers(network: nn.Module) -> tuple[str, str]:
    """The first and the last layer (kept at 8 bits, as EfficientDM's `set_first_last_layer_to_8bit`): the network's
    `quant_boundary_layers` when it names them, else the first layer that sees the input (a patch or pixel embedding,
    found by name) and the output projection (`final_layer.linear`, `final_layer.out_proj`, or the last layer)."""
    names = quantizable_layers(network)
    if not names:
        raise ValueError(f"{type(network).__name__} has no nn.Linear or nn.Conv2d layer to quantize")
    declared = getattr(network, "quant_boundary_layers", None)
    if declared:
        return tuple(declared)
    first = next((n for n in names if re.match(r"(x_embedder|patch_embed|input|stem)", n)), names[0])
    last = next((n for n in names if re.match(r"final_layer\.(linear|out_proj)$", n)), names[-1])
    return first, last


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
