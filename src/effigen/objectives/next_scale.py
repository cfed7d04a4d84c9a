"""The next-scale prediction objective (VAR, arXiv 2404.02905): cross-entropy of the transformer's logits
against the tokenizer's token maps at every scale, teacher-forced, with label dropout for guidance.

Per batch: the frozen tokenizer turns images into token maps r_1..r_K and the teacher-forcing input (f_hat after
each scale, downsampled to the next); labels are replaced by the null class with probability `label_dropout`
(VAR: 0.1); the loss is the cross-entropy over all L tokens, weighted per scale by `scale_weighting`: `uniform`
(VAR: every token 1/L) or `lognorm` (HMAR's re-weighting, `scale_loss_weights`).
Tokenization runs in fp32 outside autocast so the targets never depend on the training precision.

Sampling is `effigen.samplers.next_scale.sample_next_scale`; `sample` returns the latent f_hat, which the
pipeline decodes with the tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..nn.losses import token_cross_entropy
from ..rng import BatchRandom
from ..samplers.next_scale import EditSpec, NextScaleSamplerConfig, sample_next_scale


@dataclass
class NextScaleConfig:
    label_dropout: float = 0.1
    label_smoothing: float = 0.0
    scale_weighting: Literal["uniform", "lognorm"] = "uniform"


def scale_loss_weights(scales: tuple[int, ...], kind: str) -> torch.Tensor:
    """Per-token loss weights (L,), summing to 1.

    `uniform`: 1/L each (VAR). `lognorm`: HMAR's `norm_dist_equivalent` (trainer.py): with r_k = s_k / s_K and
    z_k = (r_{K+1-k} - mean r) / std r (sample std; note the reversed order), scale k gets the weight
    N(z_k; 0, 1) / sum_j N(z_j; 0, 1), spread evenly over its s_k^2 tokens. For VAR's 256 px schedule the scales
    3x3 .. 8x8 get 11-14% of the loss each, 1x1 2.5% and 16x16 7% (uniform weights give 16x16 38%)."""
    counts = [s * s for s in scales]
    if kind == "uniform":
        return torch.full((sum(counts),), 1.0 / sum(counts))
    if kind != "lognorm":
        raise ValueError(f"unknown scale_weighting {kind!r}; use 'uniform' or 'lognorm'")
    K = len(scales)
    if K == 1:
        return torch.full((counts[0],), 1.0 / counts[0])
    ratios = [s / scales[-1] for s in scales]
    mean = sum(ratios) / K
    std = math.sqrt(sum((r - mean) ** 2 for r in ratios) / (K - 1))
    density = [math.exp(-0.5 * ((r - mean) / std) ** 2) for r in reversed(ratios)]
    total = sum(density)
    return torch.cat([torch.full((n,), d / total / n, dtype=torch.float64) for d, n in zip(density, counts)]).float()


def unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


class TokenizedObjective:
    """Base for objectives of token generators: holds the frozen tokenizer and tokenizes batches."""

    needs_tokenizer = True

    def __init__(self, config, num_classes: int, tokenizer: nn.Module | None = None):
        if tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer: train one first (e.g. `effigen train --preset "
                             "mnist-msvq`) and pass its folder as `tokenizer` in the experiment config")
        self.config = config
        self.num_classes = num_classes
        self.tokenizer = tokenizer.eval().requires_grad_(False)

    def _tokenizer_on(self, device: torch.device) -> nn.Module:
        if next(self.tokenizer.parameters()).device != device:
            self.tokenizer.to(device)
        return self.tokenizer

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, C, H, W) -> the tokenizer's token ids; integer rows (B, num_tokens) are a token cache's ids
        (`data.token_cache`), already what the tokenizer would compute, and are only reshaped."""
        if not images.is_floating_point():
            return self.tokenizer.output.unflatten_indices(images)
        tokenizer = self._tokenizer_on(images.device)
        with torch.autocast(images.device.type, enabled=False):
            return tokenizer.indices_from_images(images.float())

    def drop_labels(self, labels: torch.Tensor, random: BatchRandom) -> torch.Tensor:
        drop = random.rand().to(labels.device) < self.config.label_dropout
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)


class NextScalePrediction(TokenizedObjective):
    config_class = NextScaleConfig
    sampler_config_class = NextScaleSamplerConfig

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        indices = self.tokenize(batch["images"])
        with torch.no_grad(), torch.autocast(batch["images"].device.type, enabled=False):
            teacher = self.tokenizer.quantize.teacher_forcing_input(indices)
        labels = self.drop_labels(batch["labels"], random)
        logits = model(labels, teacher)
        target = torch.cat(indices, dim=1)
        if self.config.scale_weighting == "uniform":
            loss = token_cross_entropy(logits, target, self.config.label_smoothing)
        else:
            weights = scale_loss_weights(tuple(self.tokenizer.scales), self.config.scale_weighting)
            per_token = token_cross_entropy(logits, target, self.config.label_smoothing, "none").view(target.shape)
            loss = (per_token * weights.to(per_token.device)).sum(dim=1).mean()
        with torch.no_grad():
            correct = (logits.argmax(-1) == target).float()
            last = indices[-1].shape[1]
        return {"loss": loss, "accuracy": correct.mean(), "accuracy_last_scale": correct[:, -last:].mean()}

    def sample(self, network: nn.Module, labels: torch.Tensor, shape, settings: NextScaleSamplerConfig,
               generator: torch.Generator | None = None, edit=None) -> torch.Tensor:
        tokenizer = self._tokenizer_on(labels.device)
        return sample_next_scale(unwrap(network), tokenizer, labels, settings, generator, edit)

    @torch.no_grad()
    def edit_spec(self, images: torch.Tensor, keep_mask: torch.Tensor) -> EditSpec:
        tokenizer = self._tokenizer_on(images.device)
        with torch.autocast(images.device.type, enabled=False):
            return EditSpec.from_images(tokenizer, images.float(), keep_mask)

    def evaluations_per_sample(self, settings: NextScaleSamplerConfig) -> int:
        return len(self.tokenizer.scales) * (2 if settings.cfg_scale != 1 else 1)
