"""The token generators' training loss: cross-entropy of (..., V) logits against integer targets.

`token_cross_entropy(logits, target, label_smoothing, reduction)` is `F.cross_entropy(logits.reshape(-1, V).float(),
target.reshape(-1), ...)`, the loss of VAR, HMAR, DetailFlow and the raster AR baseline. In bf16 CPU training
(gradients flowing through CPU logits that are bf16, or fp32 under bf16 autocast: VAR and HMAR cast their head's
output to fp32 as the official VAR does) it runs as two C passes (`cpu_kernels.cross_entropy` and its backward):
torch's chain there (cast to fp32, log_softmax, nll, then a zero-filled gradient, log_softmax's backward and the cast
back) makes six passes over the (tokens, V) logits, ~6% of a VAR-d12 step from a token cache on a 2-core CPU. The
kernel computes in fp32, as the chain does, and rounds the gradient to the logits' precision once. Plain fp32
training keeps `F.cross_entropy` (bit-for-bit as before).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, label_smoothing):
        loss, lse = cpu_kernels.cross_entropy(logits, target, label_smoothing)
        ctx.save_for_backward(logits, target, lse)
        ctx.label_smoothing = label_smoothing
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        logits, target, lse = ctx.saved_tensors
        out = cpu_kernels.cross_entropy_backward(logits, target, lse, grad, ctx.label_smoothing)
        if out is None:  # the kernels were switched off between forward and backward
            probs = torch.softmax(logits.float(), dim=-1)
            eps = ctx.label_smoothing
            probs = probs - eps / logits.shape[-1]
            probs[torch.arange(len(target)), target] -= 1 - eps
            out = (probs * grad.float()[:, None]).to(logits.dtype)
        return out, None, None


def _kernel_applies(logits: torch.Tensor, target: torch.Tensor) -> bool:
    bf16_training = logits.dtype == torch.bfloat16 or (
        logits.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    if not (logits.requires_grad and torch.is_grad_enabled() and bf16_training and logits.device.type == "cpu"
            and not torch.compiler.is_compiling() and cpu_kernels.active()):
        return False
    if target.dtype.is_floating_point or target.numel() == 0:
        return False
    return bool(target.min() >= 0 and target.max() < logits.shape[-1])  # else F.cross_entropy raises its error


def token_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                        reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (..., V) against integer targets (...), computed in fp32: the mean over every token
    (`reduction="mean"`) or one value per token, flattened (`"none"`). Equal to `F.cross_entropy` on the fp32 logits up
    to the order of fp32 sums; on the C kernels in bf16 CPU training (see the module docstring)."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r}: use 'mean' or 'none'")
    V = logits.shape[-1]
    flat, labels = logits.reshape(-1, V), target.reshape(-1)
    if _kernel_applies(flat, labels):
        per_token = _TokenCrossEntropy.apply(flat, labels, float(label_smoothing))
        return per_token.mean() if reduction == "mean" else per_token
    return F.cross_entropy(flat.float(), labels, reduction=reduction, label_smoothing=label_smoothing)
