"""The next-token prediction objective of raster-scan AR generators (LlamaGen, arXiv 2406.06525): cross-entropy
of the transformer's logits against the tokenizer's single token map in raster order, teacher-forced under a
causal mask, with label dropout for guidance.

Per batch: the frozen single-scale tokenizer turns images into a (B, h * w) id sequence (fp32, outside autocast,
`TokenizedObjective.tokenize`); labels are replaced by the null class with probability `label_dropout` (LlamaGen's
`class_dropout_prob` 0.1); the loss is the mean cross-entropy over all L tokens (LlamaGen: `F.cross_entropy` over
every position). The same trainer, tokenizer and token-sampling pieces as VAR's next-scale objective, so the two
compare on equal terms.

Sampling is `effigen.samplers.next_token.sample_next_token`; `sample` returns the tokenizer latent of the sampled
grid, which the pipeline decodes with the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn.losses import token_cross_entropy
from ..rng import BatchRandom
from ..samplers.next_token import NextTokenSamplerConfig, sample_next_token
from .next_scale import TokenizedObjective, unwrap


@dataclass
class NextTokenConfig:
    label_dropout: float = 0.1
    label_smoothing: float = 0.0


class NextTokenPrediction(TokenizedObjective):
    config_class = NextTokenConfig
    sampler_config_class = NextTokenSamplerConfig

    def __init__(self, config, num_classes: int, tokenizer: nn.Module | None = None):
        super().__init__(config, num_classes, tokenizer)
        if len(self.tokenizer.scales) != 1:
            raise ValueError(f"next-token prediction needs a single-scale tokenizer, this one has scales "
                             f"{tuple(self.tokenizer.scales)}; train one with scales=[h] (e.g. the mnist-vq preset)")

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        (target,) = self.tokenize(batch["images"])  # (B, L) raster order
        labels = self.drop_labels(batch["labels"], random)
        logits = model(labels, target)
        loss = token_cross_entropy(logits, target, self.config.label_smoothing)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == target).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    def sample(self, network: nn.Module, labels: torch.Tensor, shape, settings: NextTokenSamplerConfig,
               generator: torch.Generator | None = None, edit=None) -> torch.Tensor:
        if edit is not None:
            raise ValueError("raster-scan AR has no zero-shot editing (a raster prefix cannot condition on what follows)")
        tokenizer = self._tokenizer_on(labels.device)
        return sample_next_token(unwrap(network), tokenizer, labels, settings, generator)

    def evaluations_per_sample(self, settings: NextTokenSamplerConfig) -> int:
        return self.tokenizer.scales[0] ** 2 * (2 if settings.guided else 1)
