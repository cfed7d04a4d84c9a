"""Small blocks shared across networks: adaLN modulation and the transformer MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, D) conditioning broadcast over tokens of x (B, L, D);
    `shift=None` for scale-only modulation (LightningDiT's `wo_shift`)."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


# ------------------------------------------------------------------ fused CPU inference (oneDNN post-ops, bf16)
_FUSED = {"enabled": True}


def set_fused_inference(enabled: bool) -> None:
    """Switch the fused bf16 CPU inference kernels (`fused_dtype`) on or off globally (off = the eager ops; for A/B
    timing and the tests that compare the two)."""
    _FUSED["enabled"] = bool(enabled)


def fused_dtype(x: torch.Tensor, *modules: nn.Module) -> torch.dtype | None:
    """The dtype in which `modules`' linear layers may run fused with their activation through oneDNN's post-ops
    (`torch.ops.mkldnn._linear_pointwise`, the kernels inductor uses on a CPU), or None for the eager path. Fused only
    where it changes nothing but speed and rounding: bf16 inference on a CPU (no gradients; under bf16 autocast, or
    with bf16 weights), never fp32 (whose outputs stay bit-identical to the eager ops) and never in training."""
    if not _FUSED["enabled"] or x.device.type != "cpu" or torch.is_grad_enabled() or not torch.backends.mkldnn.is_available():
        return None
    if torch.compiler.is_compiling():
        return None  # under torch.compile inductor makes its own fusions (and cannot lower these direct calls)
    if any(m.training for m in modules):
        return None
    if any(type(child) not in (nn.Linear, Linear) and child_name in ("fc1", "w12")
           for m in modules for child_name, child in m.named_children()):
        return None  # a quantized (nn/quant.py) or otherwise replaced linear layer keeps its own forward
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if autocast or x.dtype == torch.bfloat16:
        return torch.bfloat16
    return None


def lowp_weights(linear: nn.Linear, dtype: torch.dtype, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`linear`'s weight and bias (optionally a slice of output rows) in `dtype`, contiguous, cast once and kept on the
    module (not in its state dict) until the parameter changes (new storage or an in-place update): the weights are
    held in bf16 for sampling instead of being cast at every call."""
    key = (dtype, rows.start if rows else None, rows.stop if rows else None)
    weight, bias = linear.weight, linear.bias
    stamp = (weight.data_ptr(), weight._version, None if bias is None else (bias.data_ptr(), bias._version))
    cache = linear.__dict__.setdefault("_lowp_weights", {})
    hit = cache.get(key)
    if hit is None or hit[0] != stamp:
        w = weight.detach() if rows is None else weight.detach()[rows]
        b = None if bias is None else (bias.detach() if rows is None else bias.detach()[rows])
        hit = (stamp, w.to(dtype).contiguous(), None if b is None else b.to(dtype).contiguous())
        cache[key] = hit
    return hit[1], hit[2]


def fused_linear(x: torch.Tensor, linear: nn.Linear, dtype: torch.dtype, attr: str = "none", algorithm: str = "",
                 rows: slice | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`linear(x)` followed by the oneDNN post-op `attr` (`none`, `gelu`, `swish`, ...), as one call on `linear`'s
    weights held in `dtype`; `bias` replaces the module's own (VAR's qkv bias is assembled from q and v biases)."""
    weight, own_bias = lowp_weights(linear, dtype, rows)
    bias = own_bias if bias is None else bias.to(dtype)
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, attr, [], algorithm)


class Linear(nn.Linear):
    """`nn.Linear` (the same parameters, state dict and training arithmetic) whose bf16 CPU inference (`fused_dtype`)
    is one oneDNN call on weights held in bf16 (`lowp_weights`): no cast of the fp32 weight per sampling call (autocast
    casts again in every autocast region) and the bias added in the GEMM's epilogue instead of broadcast into the
    output first (~1.1x on the GEMMs of DiT-B/2 and VAR-d16, `benchmarks/profile_sampling.py`). fp32 is unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = fused_dtype(x, self)
        if dtype is not None:
            return fused_linear(x, self, dtype, "none")
        return F.linear(x, self.weight, self.bias)


class _TrainingActivation(torch.autograd.Function):
    """An MLP activation in bf16 CPU training whose forward and backward are one C pass each: `ops` is
    (kernel, kernel_backward, eager, eager_backward), the eager pair running where a kernel returns None. Keeps the
    input for the backward, as torch's activations do."""

    @staticmethod
    def forward(ctx, x, ops):
        out = ops[0](x)
        ctx.save_for_backward(x)
        ctx.ops = ops
        return ops[2](x) if out is None else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad = grad.to(x.dtype)
        out = ctx.ops[1](grad, x)
        return (ctx.ops[3](grad, x) if out is None else out), None


def _silu_mul_eager(x: torch.Tensor) -> torch.Tensor:
    gate, value = x.chunk(2, dim=-1)
    return F.silu(gate) * value


def _silu_mul_backward_eager(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    gate, value = x.float().chunk(2, dim=-1)
    sig, grad = torch.sigmoid(gate), grad.float()
    return torch.cat((grad * value * sig * (1 + gate * (1 - sig)), grad * gate * sig), dim=-1).to(x.dtype)


# (kernel, kernel_backward, eager, eager_backward); the kernels looked up on cpu_kernels at call time
_GELU_TANH = (lambda x: cpu_kernels.gelu_tanh(x), lambda g, x: cpu_kernels.gelu_tanh_backward(g, x),
              lambda x: F.gelu(x, approximate="tanh"),
              lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"))
_SILU_MUL = (lambda x: cpu_kernels.silu_mul(x.contiguous()), lambda g, x: cpu_kernels.silu_mul_backward(g, x),
             _silu_mul_eager, _silu_mul_backward_eager)


def _training_kernels(x: torch.Tensor) -> bool:
    """Whether gradients flow through the bf16 CPU tensor x with the C kernels on (outside torch.compile and
    dispatch modes): where the training activations run as C passes (`_TrainingActivation`)."""
    return (x.requires_grad and torch.is_grad_enabled() and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and not torch.compiler.is_compiling() and cpu_kernels.active())


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh-GELU; forward and backward on the C kernels in bf16 CPU training, else `F.gelu`."""
    return _TrainingActivation.apply(x, _GELU_TANH) if _training_kernels(x) else F.gelu(x, approximate="tanh")


class Mlp(nn.Module):
    """Linear-GELU(tanh)-Linear, names `fc1`/`fc2` as timm's Mlp (DiT's checkpoints use them). In bf16 CPU inference
    (`fused_dtype`) fc1 runs on bf16-held weights with its bias in the GEMM's epilogue and the GELU is one pass of the
    C kernel of `cpu_kernels` in place (1.2x faster than oneDNN's tanh-GELU epilogue, which costs as much as the GEMM,
    at DiT-B/2's shapes); without the C kernels, the GELU in oneDNN's epilogue. In bf16 CPU training the GELU's
    forward and backward are C passes too (`gelu_tanh`)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = fused_dtype(x, self)
        if dtype is not None:
            if cpu_kernels.active() and dtype == torch.bfloat16:
                hidden = fused_linear(x, self.fc1, dtype, "none")
                if cpu_kernels.gelu_tanh_(hidden):
                    return self.fc2(hidden)
            return self.fc2(fused_linear(x, self.fc1, dtype, "gelu", "tanh"))
        hidden = self.fc1(x)
        if type(self.act) is nn.GELU and self.act.approximate == "tanh":
            return self.fc2(gelu_tanh(hidden))
        return self.fc2(self.act(hidden))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): w3(silu(x W1) * x W2) with W1, W2 fused as `w12` (the
    xformers/LightningDiT layout, biases on). LightningDiT sizes the hidden layer int(2/3 * 4 * D) so the
    parameter count equals the GELU MLP's. On a CPU in bf16, the activation is one C pass (`cpu_kernels.silu_mul`)
    in inference and, with its backward, in training."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = fused_dtype(x, self)
        if dtype is not None:  # bf16 CPU inference: one GEMM for [gate | value], then silu(gate) * value in one pass
            if cpu_kernels.active() and dtype == torch.bfloat16:
                activated = cpu_kernels.silu_mul(fused_linear(x, self.w12, dtype, "none"))  # of the C kernel
                if activated is not None:
                    return self.w3(activated)
            # without the C kernels: silu(x W1) and (x W2) * gate each in one oneDNN call, no extra pass
            hidden = self.w12.weight.shape[0] // 2
            gate = fused_linear(x, self.w12, dtype, "swish", rows=slice(0, hidden))
            w2, b2 = lowp_weights(self.w12, dtype, slice(hidden, 2 * hidden))
            return self.w3(torch.ops.mkldnn._linear_pointwise.binary(x.to(dtype), gate, w2, b2, "mul"))
        projected = self.w12(x)
        if _training_kernels(projected):
            return self.w3(_TrainingActivation.apply(projected, _SILU_MUL))
        return self.w3(_silu_mul_eager(projected))


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p (scaled by 1/(1-p)) in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)
