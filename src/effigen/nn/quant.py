"""Low-bit quantization building blocks: uniform affine fake-quantizers with straight-through rounding, MSE-searched
initial step sizes, bit packing, and a linear/conv layer that holds packed integer weights and runs its products in
integers where the hardware allows (`torch._int_mm`: int8 x int8 -> int32 on CPU and CUDA).

Conventions (EfficientDM's `UniformAffineQuantizer`, arXiv 2310.03270 and ThisisBillhe/EfficientDM):

    q = clamp(round(x / delta) + zp, 0, 2^b - 1),    x_hat = (q - zp) * delta

with `round` straight-through (identity gradient), so gradients reach x inside the range and the step size delta
(LSQ-style, without LSQ's gradient-scale factor, as the official code). Weights: one (delta, zp) per output channel,
found by a grid search of clipping ratios minimising the squared error. Activations: per tensor, one (delta, zp) per
calibrated sampling timestep, selected by the timestep the sampler passes to the network (`TimestepContext`), never
by a call counter.

`QuantLayer` replaces an `nn.Linear` or `nn.Conv2d`. It stores the integer weight codes packed `8 // bits` per byte
(`w_packed`) with `w_delta`, `w_zp` and the activation tables `a_delta`, `a_zp` (T,). In training (QALoRA) it keeps
the dequantized base weight in float plus a LoRA pair (A, B) and re-quantizes `deq(W) + B A` at every forward, so the
LoRA merges into low-bit weights (`merge_lora`). In inference a linear layer runs the integer product

    y[m, n] = dx[m] * dw[n] * sum_k (xq[m, k] - zx[m]) (wq[n, k] - zw[n]) + b[n]

as one int8 GEMM of the codes shifted by 128 plus rank-1 zero-point corrections (exact in int32). Convolutions and
layers with more than 8 activation bits use the dequantized weight in float (simulated quantization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["round_ste", "fake_quant", "mse_weight_params", "mse_activation_params", "pack_codes", "unpack_codes",
           "TimestepContext", "QuantLayer", "int_kernel_available"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return (x.round() - x).detach() + x


def fake_quant(x: torch.Tensor, delta: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize and dequantize `x` with step `delta` and zero point `zp` (broadcast against x)."""
    q = torch.clamp(round_ste(x / delta) + zp, 0, 2 ** bits - 1)
    return (q - zp) * delta


def quant_codes(x: torch.Tensor, delta: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes of `x` (float tensor holding integers in [0, 2^bits - 1])."""
    return torch.clamp(torch.round(x / delta) + zp, 0, 2 ** bits - 1)


def _affine_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))  # 0 exactly representable
    delta = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8)
    zp = torch.round(-lo / delta)
    return delta, zp


def mse_weight_params(weight: torch.Tensor, bits: int, ratios: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel (dim 0) (delta, zp) minimising ||fq(w) - w||^2 over clipping ratios 1.0 ... 0.3 of the
    channel's range."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    best_err = torch.full_like(lo, math.inf)
    best_delta, best_zp = torch.ones_like(lo), torch.zeros_like(lo)
    for r in torch.linspace(1.0, 0.3, ratios).tolist():
        delta, zp = _affine_from_range(lo * r, hi * r, bits)
        err = (fake_quant(w, delta[:, None], zp[:, None], bits) - w).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_delta, best_zp = torch.where(better, delta, best_delta), torch.where(better, zp, best_zp)
    return best_delta, best_zp


def mse_activation_params(samples: torch.Tensor, bits: int, ratios: int = 40) -> tuple[float, float]:
    """Per tensor (delta, zp) minimising the squared error on `samples` (a 1-D tensor of activation values) over
    clipping ratios of its range (the lower and upper ends shrunk together, 1.0 ... 0.2)."""
    x = samples.detach().float().flatten()
    lo, hi = x.min(), x.max()
    best = (math.inf, 1.0, 0.0)
    for r in torch.linspace(1.0, 0.2, ratios).tolist():
        delta, zp = _affine_from_range(lo * r, hi * r, bits)
        err = float((fake_quant(x, delta, zp, bits) - x).pow(2).sum())
        if err < best[0]:
            best = (err, float(delta), float(zp))
    return best[1], best[2]


# ------------------------------------------------------------------------------------------------ packing
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1] -> a flat uint8 tensor holding 8 // bits codes per byte (low bits first)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"packing supports 2, 4 or 8 bits, got {bits}")
    flat = codes.detach().flatten().to(torch.int32)
    if flat.numel() and (flat.min() < 0 or flat.max() > 2 ** bits - 1):
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] for {bits} bits, got [{int(flat.min())}, {int(flat.max())}]")
    per = 8 // bits
    pad = (-flat.numel()) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=flat.device) * bits
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_codes`: a uint8 tensor -> int32 codes of `shape`."""
    if bits not in (2, 4, 8):
        raise ValueError(f"packing supports 2, 4 or 8 bits, got {bits}")
    per = 8 // bits
    numel = math.prod(shape)
    if packed.numel() != -(-numel // per):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} {bits}-bit codes of shape {tuple(shape)}")
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32)[:, None] >> shifts) & (2 ** bits - 1)
    return codes.flatten()[:numel].view(shape)


# ------------------------------------------------------------------------------------------------ timestep context
class TimestepContext:
    """Which row of the per-timestep activation tables each sample uses: a linear interpolation between the two
    calibrated grid points around its t (`index0`, `index1`, `frac`; all (B,)). Set by QuantizedNetwork before each
    forward; `None` (not set) is an error in any layer with more than one timestep row."""

    def __init__(self):
        self.index0: torch.Tensor | None = None
        self.index1: torch.Tensor | None = None
        self.frac: torch.Tensor | None = None

    def set(self, index0: torch.Tensor, index1: torch.Tensor, frac: torch.Tensor) -> None:
        self.index0, self.index1, self.frac = index0, index1, frac

    def clear(self) -> None:
        self.index0 = self.index1 = self.frac = None

    def select(self, table: torch.Tensor, batch: int) -> torch.Tensor:
        """(B,) values of the (T,) `table` for the current samples."""
        if table.numel() == 1:
            return table.reshape(1).expand(batch)
        if self.index0 is None:
            raise RuntimeError("a per-timestep activation quantizer was called without a timestep: call the model "
                               "through QuantizedNetwork, which selects the row from the t it is given")
        a, b, f = table[self.index0], table[self.index1], self.frac.to(table.dtype)
        return a + (b - a) * f


def _to_float_in_place(acc: torch.Tensor) -> torch.Tensor:
    """int32 -> float32 in the same memory (both 4 bytes; each element is read before it is overwritten): a fresh
    output buffer costs page faults that are as slow as the conversion itself on CPU."""
    out = acc.view(torch.float32)
    out.copy_(acc)
    return out


def int_kernel_available(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and hasattr(torch, "_int_mm")


@dataclass
class LayerSpec:
    """What a QuantLayer replaces: an nn.Linear (kernel_size = ()) or nn.Conv2d."""
    out_features: int
    in_features: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True

    @classmethod
    def of(cls, module: nn.Module) -> "LayerSpec":
        if isinstance(module, nn.Linear):
            return cls(module.out_features, module.in_features, bias=module.bias is not None)
        if isinstance(module, nn.Conv2d):
            if not isinstance(module.padding, tuple):
                raise ValueError(f"convolutions with padding={module.padding!r} cannot be quantized; use numeric padding")
            return cls(module.out_channels, module.in_channels, tuple(module.kernel_size), tuple(module.stride),
                       tuple(module.padding), tuple(module.dilation), module.groups, module.bias is not None)
        raise TypeError(f"only nn.Linear and nn.Conv2d can be quantized, got {type(module).__name__}")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if not self.kernel_size:
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features // self.groups, *self.kernel_size)


class QuantLayer(nn.Module):
    """A quantized nn.Linear / nn.Conv2d (see the module docstring). Built empty from its `LayerSpec` and bit widths,
    then filled either by `from_float` (calibration) or by loading a state dict (a saved folder)."""

    def __init__(self, spec: LayerSpec, w_bits: int, a_bits: int, num_steps: int, context: TimestepContext | None = None):
        super().__init__()
        if w_bits not in (2, 4, 8):
            raise ValueError(f"weight bits must be 2, 4 or 8, got {w_bits}")
        if not 2 <= a_bits <= 16:
            raise ValueError(f"activation bits must be in [2, 16], got {a_bits}")
        self.spec, self.w_bits, self.a_bits = spec, w_bits, a_bits
        shape = spec.weight_shape
        per = 8 // w_bits
        self.register_buffer("w_packed", torch.zeros(-(-math.prod(shape) // per), dtype=torch.uint8))
        self.w_delta = nn.Parameter(torch.ones(spec.out_features))
        self.register_buffer("w_zp", torch.zeros(spec.out_features))
        self.bias = nn.Parameter(torch.zeros(spec.out_features)) if spec.bias else None
        self.a_delta = nn.Parameter(torch.ones(num_steps))
        self.a_zp = nn.Parameter(torch.zeros(num_steps))
        self.context = context
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self._base: torch.Tensor | None = None  # float dequantized weight while fine-tuning
        self._int_cache: tuple | None = None  # (w_i8^T (K, N), (128 - zw) (N,), colsum(w_i8) (N,)) for inference

    # -------------------------------------------------------------- building
    @classmethod
    def from_float(cls, module: nn.Module, w_bits: int, a_bits: int, num_steps: int,
                   context: TimestepContext | None = None) -> "QuantLayer":
        layer = cls(LayerSpec.of(module), w_bits, a_bits, num_steps, context).to(module.weight.device)
        delta, zp = mse_weight_params(module.weight, w_bits)
        w = module.weight.detach().float()
        view = (-1,) + (1,) * (w.ndim - 1)
        layer.w_packed.copy_(pack_codes(quant_codes(w, delta.view(view), zp.view(view), w_bits), w_bits))
        layer.w_delta.data.copy_(delta)
        layer.w_zp.copy_(zp)
        if layer.bias is not None:
            layer.bias.data.copy_(module.bias.detach().float())
        return layer

    def set_activation_params(self, delta: torch.Tensor, zp: torch.Tensor) -> None:
        self.a_delta.data.copy_(torch.as_tensor(delta, dtype=torch.float32).expand_as(self.a_delta))
        self.a_zp.data.copy_(torch.as_tensor(zp, dtype=torch.float32).expand_as(self.a_zp))

    # -------------------------------------------------------------- weights
    def weight_codes(self) -> torch.Tensor:
        return unpack_codes(self.w_packed, self.w_bits, self.spec.weight_shape)

    def _view(self) -> tuple[int, ...]:
        return (-1,) + (1,) * (len(self.spec.weight_shape) - 1)

    def dequantized_weight(self) -> torch.Tensor:
        v = self._view()
        return (self.weight_codes().float() - self.w_zp.view(v)) * self.w_delta.view(v)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (dequantized) weight; modules that read `.weight` (e.g. for its dtype) keep working."""
        return self.effective_weight().detach()

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward uses: the dequantized codes, or while fine-tuning with LoRA the re-quantized
        deq(W) + B A (straight-through gradients to B, A and the step sizes)."""
        if self.lora_A is None:
            return self.dequantized_weight()
        base = self._base if self._base is not None else self.dequantized_weight().detach()
        update = (self.lora_B @ self.lora_A).view(self.spec.weight_shape)
        v = self._view()
        return fake_quant(base + update, self.w_delta.view(v), self.w_zp.view(v), self.w_bits)

    def add_lora(self, rank: int) -> None:
        """QALoRA: A kaiming-uniform, B zero (the layer's output is unchanged until B moves)."""
        fan_in = math.prod(self.spec.weight_shape[1:])
        rank = max(1, min(rank, fan_in, self.spec.out_features))
        device = self.w_delta.device
        A = torch.empty(rank, fan_in, device=device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A, self.lora_B = nn.Parameter(A), nn.Parameter(torch.zeros(self.spec.out_features, rank, device=device))
        self._base = self.dequantized_weight().detach()
        self._int_cache = None

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold B A into the integer codes: codes = quantize(deq(W) + B A) with the current step sizes; drop LoRA."""
        if self.lora_A is None:
            return
        v = self._view()
        merged = self._base + (self.lora_B @ self.lora_A).view(self.spec.weight_shape)
        self.w_packed.copy_(pack_codes(quant_codes(merged, self.w_delta.view(v), self.w_zp.view(v), self.w_bits), self.w_bits))
        self.lora_A = self.lora_B = None
        self._base = None
        self._int_cache = None

    # -------------------------------------------------------------- activations
    def _activation_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta, zp) shaped to broadcast against x: per sample (leading batch dim) or one scalar."""
        n = self.a_delta.numel()
        if n == 1 or self.context is None or self.context.index0 is None:
            if n != 1 and (self.context is None or self.context.index0 is None):
                raise RuntimeError("this layer has per-timestep activation step sizes but no timestep was given: "
                                   "call it through QuantizedNetwork, which selects them from the t it is given")
            return self.a_delta.view([1] * x.ndim), self.a_zp.view([1] * x.ndim)
        B = self.context.index0.shape[0]
        delta, zp = self.context.select(self.a_delta, B), self.context.select(self.a_zp, B)
        if x.shape[0] != B:
            if not (bool((delta == delta[0]).all()) and bool((zp == zp[0]).all())):
                raise RuntimeError(f"this layer's input has leading dimension {x.shape[0]}, not the batch {B}, and the "
                                   "samples are at different timesteps: per-sample step sizes cannot be applied")
            delta, zp = delta[:1], zp[:1]
        shape = [delta.shape[0]] + [1] * (x.ndim - 1)
        return delta.view(shape), zp.view(shape)

    # -------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        delta, zp = self._activation_params(xf)
        if (not self.training and self.lora_A is None and not self.spec.kernel_size and self.a_bits <= 8
                and int_kernel_available(x.device) and not torch.is_grad_enabled()):
            return self._int_linear(xf, delta, zp).to(dtype)
        xq = fake_quant(xf, delta, round_ste(zp), self.a_bits)  # integer zero points, as the integer kernel uses
        w = self.effective_weight()
        if self.spec.kernel_size:
            s = self.spec
            y = F.conv2d(xq, w, self.bias, s.stride, s.padding, s.dilation, s.groups)
        else:
            y = F.linear(xq, w, self.bias)
        return y.to(dtype)

    def _int_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(w_i8^T (K, N), d (N,) or None, colsum(w_i8) (N,)) with (codes - zw) = w_i8 + d. Below 8 bits the centred
        codes fit int8 themselves (|codes - zw| <= 2^b - 1 <= 127), so d = 0 and the row-sum correction vanishes."""
        if self._int_cache is None or self._int_cache[0].device != self.w_packed.device:
            codes = self.weight_codes()  # (N, K) in [0, 2^b - 1]
            zw = self.w_zp.round().to(torch.int32)
            if self.w_bits < 8:
                w_i8, d = (codes - zw[:, None]).to(torch.int8), None
            else:
                w_i8, d = (codes - 128).to(torch.int8), 128 - zw
            colsum = w_i8.sum(dim=1, dtype=torch.int32)
            self._int_cache = (w_i8.t().contiguous(), d, colsum)
        return self._int_cache

    def _int_linear(self, x: torch.Tensor, delta: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        """The integer product (module docstring). x: (..., K) float; delta, zp: one value or one per leading row.
        Activation codes are shifted by s = 128 at 8 bits (into int8), unshifted below."""
        w_t, d, colsum = self._int_weights()
        K, N = x.shape[-1], self.spec.out_features
        lead = x.shape[:-1]
        x2 = x.reshape(-1, K)
        M = x2.shape[0]
        if M == 0:
            return x.new_zeros(*lead, N)
        shift = 128 if self.a_bits == 8 else 0
        hi = 2 ** self.a_bits - 1 - shift
        zx = zp.round()
        if delta.numel() == 1 or bool((delta == delta.reshape(-1)[0]).all() and (zx == zx.reshape(-1)[0]).all()):
            # one step size for the whole call (every sample at the same t): scalar operands, in-place passes
            dx, z = float(delta.reshape(-1)[0]), int(zx.reshape(-1)[0])
            x_i8 = torch.div(x2, dx).round_().add_(z - shift).clamp_(-shift, hi).to(torch.int8)
            c = shift - z
            acc = torch._int_mm(x_i8, w_t)  # (M, N) int32; every step below is in place (no new M x N buffer)
            acc.add_(c * colsum if d is None else c * colsum + K * c * d)
            if d is not None:
                acc.addr_(x_i8.sum(dim=1, dtype=torch.int32), d)
            y = _to_float_in_place(acc).mul_(self.w_delta * dx)
            if self.bias is not None:
                y.add_(self.bias)
            return y.view(*lead, N)
        # per-sample step sizes (samples at different t)
        rows_delta = delta.expand(*lead, 1).reshape(-1, 1)
        rows_zx = zx.expand(*lead, 1).reshape(-1, 1)
        x_i8 = torch.clamp(torch.round(x2 / rows_delta) + rows_zx - shift, -shift, hi).to(torch.int8)
        c = (shift - rows_zx).to(torch.int32)  # (M, 1): (codes - zx) = x_i8 + c
        acc = torch._int_mm(x_i8, w_t) + c * colsum.view(1, -1)
        if d is not None:
            acc = acc + x_i8.sum(dim=1, keepdim=True, dtype=torch.int32) * d.view(1, -1) + K * c * d.view(1, -1)
        y = acc.float() * rows_delta * self.w_delta.view(1, -1)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, N)

    def extra_repr(self) -> str:
        kind = "conv" + "x".join(map(str, self.spec.kernel_size)) if self.spec.kernel_size else "linear"
        return (f"{kind} {self.spec.in_features}->{self.spec.out_features}, W{self.w_bits}A{self.a_bits}, "
                f"{self.a_delta.numel()} timestep rows" + (f", LoRA rank {self.lora_A.shape[0]}" if self.lora_A is not None else ""))
