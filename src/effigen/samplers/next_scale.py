"""Next-scale sampling for VAR-style generators (Tian et al., arXiv 2404.02905, `autoregressive_infer_cfg`).

For each scale k = 1..K: run the transformer on scale k's tokens only, attending to the cached keys/values of all
coarser scales (`network.new_cache()`: a KV cache per layer; no attention mask is needed because a scale sees
all cached scales and itself), turn the logits into a token map (guidance uncond + s_k (cond - uncond) with s_k - 1 ramping linearly from 0 at the
first scale to cfg_scale - 1 at the last, as VAR does; top-k/top-p, Gumbel-max sampling or
VAR's Gumbel-softmax smoothing), add it to the tokenizer's accumulated latent f_hat, and feed the area-downsampled
f_hat to the next scale. Returns f_hat; the pipeline decodes it.

Zero-shot editing (VAR's `demo_zero_shot_edit`): with an `EditSpec`, the code map of every scale is replaced by
the code map of a given image where a keep-mask (downsampled to that scale: area to the finest token grid, then
bilinear, > 0.5) is set; scales with at most 3 tokens are copied entirely. Inpainting keeps the outside of a box,
outpainting its inside, class-conditional editing does either with another class label.

The network provides `class_condition`, `first_tokens`, `scale_tokens`, `trunk(x, cond, mask, cache)`,
`logits(h, cond)`, `new_cache()` and `null_class` (`effigen.models.var.VAR`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .tokens import (SampleNoise, check_token_sampling, filter_logits, gumbel_soft_codes, guidance_weight, guided_logits,
                     sample_tokens)


@dataclass
class NextScaleSamplerConfig:
    # effigen's guidance scale s everywhere: uncond + s (cond - uncond), 1 = off. VAR's own `cfg` w (logits
    # (1 + w) cond - w uncond) is s - 1: the README's FID setting cfg=1.5 is cfg_scale=2.5.
    cfg_scale: float = 2.5
    guidance_schedule: Literal["linear", "constant"] = "linear"  # VAR ramps s - 1 linearly: 0 at the first scale
    top_k: int = 900  # 0 disables; >= vocabulary size disables
    top_p: float = 0.96  # 0 disables
    temperature: float = 1.0
    more_smooth: bool = False  # Gumbel-softmax code mixture (visualisation only, not for FID)

    def __post_init__(self):
        check_token_sampling(self.cfg_scale, self.top_k, self.top_p, self.temperature)


@dataclass
class EditSpec:
    """Known code maps and where to keep them: `codes[k]` (B, C, s_k, s_k), `keep[k]` (B, 1, s_k, s_k) bool, and
    (optional) the token indices behind the codes, `indices[k]` (B, s_k^2)."""

    codes: list[torch.Tensor]
    keep: list[torch.Tensor]
    indices: list[torch.Tensor] | None = None

    @classmethod
    def from_images(cls, tokenizer, images: torch.Tensor, keep_mask: torch.Tensor) -> "EditSpec":
        """images (B, 3, H, W) in [-1, 1]; keep_mask (B or 1, 1, H, W) in [0, 1], 1 = keep the image there."""
        if keep_mask.ndim != 4 or keep_mask.shape[1] != 1 or keep_mask.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"the mask must be (B, 1, {images.shape[-2]}, {images.shape[-1]}) like the image, "
                             f"got {tuple(keep_mask.shape)}")
        scales = tokenizer.scales
        indices = tokenizer.indices_from_images(images)
        quant = tokenizer.quantize
        finest = F.interpolate(keep_mask.float().to(images.device), size=(scales[-1],) * 2, mode="area")
        finest = finest.expand(images.shape[0], -1, -1, -1)
        codes, keep = [], []
        for idx, side in zip(indices, scales):
            codes.append(quant.embed(idx, side))
            if side * side <= 3:
                keep.append(torch.ones(images.shape[0], 1, side, side, dtype=torch.bool, device=images.device))
            else:
                keep.append(F.interpolate(finest, size=(side, side), mode="bilinear") > 0.5)
        return cls(codes, keep, list(indices))


@torch.no_grad()
def sample_next_scale(network, tokenizer, labels: torch.Tensor, settings: NextScaleSamplerConfig,
                      generator: torch.Generator | None = None, edit: EditSpec | None = None) -> torch.Tensor:
    """labels (B,) -> f_hat (B, C, s_K, s_K)."""
    quant = tokenizer.quantize
    scales = network.scales
    if tuple(scales) != tuple(quant.scales):
        raise ValueError(f"the generator's scales {scales} differ from the tokenizer's {quant.scales}")
    B, K = labels.shape[0], len(scales)
    device = labels.device
    guided = settings.cfg_scale != 1
    all_labels = torch.cat((labels, torch.full_like(labels, network.null_class))) if guided else labels
    cond = network.class_condition(all_labels)
    cache = network.new_cache()
    x = network.first_tokens(cond)
    f_hat = torch.zeros(B, quant.config.latent_channels, scales[-1], scales[-1], device=device)
    noise = SampleNoise(generator, B, device)
    codebook = quant.embedding.weight
    for si, side in enumerate(scales):
        logits = network.logits(network.trunk(x, cond, None, cache), cond)
        uncond, weight = None, 0.0
        if guided:
            weight = guidance_weight(settings.cfg_scale - 1, si, K, settings.guidance_schedule)
            logits, uncond = logits[:B], logits[B:]
        ratio = si / max(K - 1, 1)
        if settings.more_smooth:
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            if uncond is not None:
                logits = guided_logits(logits, uncond, weight)
            # the official sampler filters the logits in place before its Gumbel-softmax
            codes = gumbel_soft_codes(filter_logits(logits, settings.top_k, settings.top_p) * (1 + ratio), codebook, tau, noise)
        else:
            tokens = sample_tokens(logits, noise, settings.top_k, settings.top_p, settings.temperature, uncond, weight)
            codes = F.embedding(tokens, codebook)
        codes = codes.float().transpose(1, 2).reshape(B, -1, side, side)
        if edit is not None:
            codes = torch.where(edit.keep[si], edit.codes[si].float(), codes)
        f_hat, next_features = quant.next_input(si, f_hat, codes)
        if next_features is not None:
            x = network.scale_tokens(si + 1, next_features)
            if guided:
                x = x.repeat(2, 1, 1)
    return f_hat
