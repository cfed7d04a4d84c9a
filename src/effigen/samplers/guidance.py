"""Classifier-free guidance, with every convention the papers use made explicit.

- constant (Ho & Salimans 2022): out = uncond + s * (cond - uncond); s = 1 is unguided.
- interval: the guidance is applied only while t lies in [t_low, t_high] (Kynkäänniemi et al. 2024,
  used by LightningDiT / RAE); outside it the conditional prediction is used.
- `channels`: guide only the first N channels of the output. DiT, SiT, LightningDiT and DiCo guide only
  the first 3 channels (a quirk inherited from GLIDE, kept to reproduce their published numbers);
  None guides all channels.
- VAR's ramped scale for next-scale token models lives with the token samplers.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import check_range

CFG_SCALE_MEANING = "uncond + s (cond - uncond): 1 = no guidance, 0 = unconditional, > 1 guides toward the class"


def check_guidance(cfg_scale: float, interval: tuple[float, float] | None = None, channels: int | None = None) -> None:
    """Validate guidance settings (for a sampler config's `__post_init__`); a ValueError names the setting and its
    valid range. A negative scale would push samples away from their class, which no method here means."""
    check_range("cfg_scale", cfg_scale, 0, meaning=CFG_SCALE_MEANING)
    if interval is not None:
        low, high = interval
        if not (0 <= low <= high <= 1):
            raise ValueError(f"cfg_interval = {tuple(interval)} is out of range: it must be (low, high) with "
                             "0 <= low <= high <= 1 (guidance applies while t is in [low, high]; null guides every step)")
    check_range("cfg_channels", channels, 1, meaning="guide the first N output channels; null guides all")


def check_num_steps(num_steps: int) -> None:
    check_range("num_steps", num_steps, 1, meaning="the number of sampling steps")


def guided_prediction(
    model_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    null_label: int,
    cfg_scale: float,
    interval: tuple[float, float] | None = None,
    channels: int | None = None,
    interval_time: torch.Tensor | None = None,
) -> torch.Tensor:
    """Evaluate `model_fn(x, t, labels)` with classifier-free guidance in one doubled batch.

    x: (B, C, H, W); t: (B,); labels: (B,). Returns the guided output (B, C_out, H, W). `interval_time` (B,): the
    time whose position decides the interval (default `t`; REPA's Heun decides at the start of the step).
    """
    if cfg_scale == 1.0:
        return model_fn(x, t, labels)
    if interval is not None:
        at = t if interval_time is None else interval_time
        if not bool(((at >= interval[0]) & (at <= interval[1])).any()):
            return model_fn(x, t, labels)  # outside the interval the output is the conditional one: one pass, not two
    null = torch.full_like(labels, null_label)
    out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))  # (2B, C_out, H, W)
    cond, uncond = out.chunk(2)
    scale = torch.full((x.shape[0],), float(cfg_scale), device=x.device, dtype=out.dtype)
    if interval is not None:
        low, high = interval
        at = t if interval_time is None else interval_time
        inside = (at >= low) & (at <= high)
        scale = torch.where(inside, scale, torch.ones_like(scale))
    scale = scale.view(-1, *([1] * (out.dim() - 1)))
    guided = uncond + scale * (cond - uncond)
    if channels is not None:
        guided = torch.cat([guided[:, :channels], cond[:, channels:]], dim=1)
    return guided


def guided_evaluations(decision_times, cfg_scale: float, interval: tuple[float, float] | None = None) -> int:
    """Network evaluations per sample for evaluations whose guidance is decided at `decision_times`: two inside the
    guidance interval (conditional and unconditional), one outside it or without guidance."""
    if cfg_scale == 1.0:
        return len(decision_times)
    if interval is None:
        return 2 * len(decision_times)
    low, high = interval
    return sum(2 if low <= float(t) <= high else 1 for t in decision_times)


def autoguided_prediction(
    model_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    guide_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    interval: tuple[float, float] | None = None,
    interval_time: torch.Tensor | None = None,
) -> torch.Tensor:
    """Autoguidance (Karras et al. arXiv 2406.02507, as RAE uses it): a smaller or less trained `guide_fn` of the same
    task stands in for the unconditional model, both conditioned on the same labels:
        out = guide + s * (model - guide)     where t lies in the interval, else the model's output.
    x: (B, C, H, W); t, labels: (B,). Outside the interval (or at s = 1) the guide is not evaluated."""
    out = model_fn(x, t, labels)
    if scale == 1.0:
        return out
    at = t if interval_time is None else interval_time
    inside = torch.ones_like(at, dtype=torch.bool) if interval is None else (at >= interval[0]) & (at <= interval[1])
    if not bool(inside.any()):
        return out
    weak = guide_fn(x, t, labels).to(out.dtype)
    guided = weak + scale * (out - weak)
    return torch.where(inside.view(-1, *([1] * (out.dim() - 1))), guided, out)
