"""DetailFlow's training objectives (arXiv 2505.21473; ByteFlow-AI/DetailFlow `train/train_tokenizer.py`,
`autoregressive/train/train_c2i.py`, `extract_codes_c2i.py`).

Tokenizer (`DetailFlowTokenizerLoss`, method `detailflow-tokenizer`), per batch as the official loop:
- with probability `degradation_prob` (0.2) a prefix length t is drawn uniformly from 1..N-g and rounded up to a
  group boundary past the causal prefix; the target is the image degraded to R(t) (area down, then resized to the
  decoder's side; `tokenizers.detailflow`), and only the first t tokens are decoded. Otherwise t = N, full image;
- self-correction (`correction_training`): for t > 1 a noise position is drawn below min(t, c) (inside the causal
  prefix) or below t - g and floored to a group start; the official tokenizer loop always applies it (its
  probability argument is 1). The batch then decodes twice: the clean codes and [clean prefix, noisy token(s),
  codes re-encoded after them], both against the same target, so later tokens learn to repair earlier errors;
- loss = l2_weight * MSE + l1_weight * L1 + vq_weight * VQ loss (codebook + beta * commitment, l2-normalised),
  with the VQ tokenizers' dead-code restarts every `restart_every` steps (ours: the codebook of a from-scratch
  tokenizer collapses on MNIST without them; the official encoder starts from pretrained SigLIP2), and optionally
  (`continuous_steps`, ours, for the same reason) a first phase that decodes the unquantised normalised latents,
  plus the trainer's perceptual / patch-GAN terms at full resolution only (the official code likewise turns its
  LPIPS and GAN terms off below `degradation_loss_res`). The random near code of each noisy token is one of the 50
  nearest.
Not implemented: LPIPS (VGG weights), the DINO discriminator, the global-token / REPA loss (a pretrained SigLIP2).

Generator (`DetailFlowARObjective`, method `detailflow`): cross-entropy of the group-parallel GPT's teacher-forced
logits against all N tokens (input z[:, :-g]), labels dropped to the null class with `label_dropout` (0.1).
Self-correction (`correction_prob`, 0.3 in the README): per batch one noise position is drawn (the official code
extraction draws one per batch with probability 1), the tokenizer makes the (clean, noisy input, corrected target)
triple, and each sample trains on (noisy input -> corrected target) with probability `correction_prob`, else
(clean -> clean). The official pipeline extracts the triples once to disk; here they are made on the fly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.losses import token_cross_entropy
from ..rng import BatchRandom
from ..samplers.detailflow import NextDetailSamplerConfig, detail_schedule, sample_next_detail
from .next_scale import TokenizedObjective, unwrap
from .vq_tokenizer import VQTokenizerLoss


def draw_prefix(num_tokens: int, group_size: int, causal_num: int, u: float) -> int:
    """The official degraded prefix: uniform in 1..N-g (u in [0, 1)), rounded up to a group past the causal prefix."""
    t = 1 + int(u * (num_tokens - group_size))
    return t if t <= causal_num else math.ceil(t / group_size) * group_size


def draw_noise_index(t: int, group_size: int, causal_num: int, u: float) -> int | None:
    """The official `get_noise_token_idx` (with probability 1): None for t = 1, else a position below min(t, c)
    inside the causal prefix or below t - g, floored to a group start."""
    if t == 1:
        return None
    high = min(t, causal_num) if t <= causal_num else t - group_size
    index = int(u * high)
    return index if index < causal_num else index // group_size * group_size


@dataclass
class DetailFlowTokenizerLossConfig:
    l2_weight: float = 1.0
    l1_weight: float = 0.0
    vq_weight: float = 1.0  # the official vq_loss_ratio (the codebook term; beta weights the commitment)
    perceptual_weight: float = 0.0
    perceptual_net: str = ""
    gan_weight: float = 0.0
    gan_start_step: int = 0
    discriminator_channels: int = 64
    discriminator_layers: int = 2
    restart_every: int = 25  # dead-code restarts (ours, see Quantizer.restart_dead_codes); 0 disables
    restart_threshold: float = 0.03  # hit EMA (hits per batch) below which a code is dead
    continuous_steps: int = 0  # ours: decode unquantised latents for this many first steps (no self-correction yet)


class DetailFlowTokenizerLoss(VQTokenizerLoss):
    """VQ tokenizer loss (with its dead-code restarts, `after_step`) on degraded prefixes and self-corrected codes."""

    config_class = DetailFlowTokenizerLossConfig

    @torch.no_grad()
    def after_step(self, network: nn.Module, step: int, seed: int) -> dict[str, float]:
        """The VQ tokenizers' dead-code restarts; at the end of the continuous warm-up, every code restarts onto the
        latents of the last batch (the codebook starts from the encoder's own latents, like a k-means init)."""
        if self.config.continuous_steps and step == self.config.continuous_steps:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
            self.restarted += unwrap(network).quantize.restart_dead_codes(float("inf"), generator)
        return super().after_step(network, step, seed)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        images = batch["images"]
        tokenizer = unwrap(model)
        c = tokenizer.config
        draws = random.shared_rand(3).tolist()  # batch-wide decisions, as the official loop
        t = c.num_tokens
        if draws[0] < c.degradation_prob:
            t = draw_prefix(c.num_tokens, c.group_size, c.causal_num, draws[1])
        quantized = random.key[1] >= self.config.continuous_steps  # key[1]: the step
        noise_idx = (draw_noise_index(t, c.group_size, c.causal_num, draws[2])
                     if c.correction_training and quantized else None)
        choice = None
        if noise_idx is not None:
            span = tokenizer.noise_span(noise_idx) - noise_idx
            choice = random.rand(span)  # per sample: which near code replaces each noisy token
        target = tokenizer.degraded_target(images, t) if t < c.num_tokens else images
        reconstruction, vq_loss, indices = model(images, t, noise_idx, choice, quantized)
        reconstruction = reconstruction.float()
        if noise_idx is not None:
            target = torch.cat((target, target))
        logs: dict[str, torch.Tensor] = {"vq": vq_loss.detach(), "prefix": torch.tensor(float(t))}
        full = target.shape[-1] == images.shape[-1]
        if full:
            rec_loss = self.reconstruction_terms(target, reconstruction, logs)
        else:  # degraded targets: pixel terms only (the feature net and the discriminator see full-size images)
            l2, l1 = (reconstruction - target).square().mean(), (reconstruction - target).abs().mean()
            rec_loss = self.config.l2_weight * l2 + self.config.l1_weight * l1
            logs.update(l2=l2.detach(), l1=l1.detach())
        loss = rec_loss + self.config.vq_weight * vq_loss
        if full:
            loss = loss + self.adversarial_terms(model, target, reconstruction, rec_loss, random.key[1], logs)
        elif self.discriminator is not None:  # every parameter gets a gradient (DDP), as at the GAN's start
            loss = loss + sum(p.sum() for p in self.discriminator.parameters()) * 0.0
        logs["usage"] = torch.tensor(indices.flatten().unique().numel() / c.vocab_size * 100)
        logs["loss"] = loss
        return logs


@dataclass
class DetailFlowARConfig:
    label_dropout: float = 0.1  # the official class_dropout_prob
    correction_prob: float = 0.3  # share of samples trained on (noisy input -> corrected target); 0 disables
    label_smoothing: float = 0.0


class DetailFlowARObjective(TokenizedObjective):
    config_class = DetailFlowARConfig
    sampler_config_class = NextDetailSamplerConfig
    # why `effigen edit` refuses (no `edit_spec`): a spatial mask has nothing to select in a 1D coarse-to-fine sequence
    no_edit_reason = ("DetailFlow's 1D tokens each describe the whole image, coarse to fine, so no token belongs to a "
                      "region that a mask could keep or regenerate")

    def __init__(self, config, num_classes: int, tokenizer: nn.Module | None = None):
        super().__init__(config, num_classes, tokenizer)
        if not hasattr(self.tokenizer, "correction_codes"):
            raise ValueError(f"method detailflow needs a DetailFlow tokenizer (1D token sequence), got "
                             f"{type(self.tokenizer).__name__}")

    @torch.no_grad()
    def input_and_target(self, images: torch.Tensor, random: BatchRandom) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, target ids), each (B, N): clean -> clean, or with probability correction_prob per sample,
        noisy input -> corrected target."""
        tokenizer = self._tokenizer_on(images.device)
        c = tokenizer.config
        if not self.config.correction_prob:
            clean = self.tokenize(images)
            return clean, clean
        if not images.is_floating_point():
            raise ValueError("DetailFlow's self-correction (objective.correction_prob > 0) re-encodes each image "
                             "with noise, which a token cache cannot hold: train from images (data.token_cache=false) "
                             "or set objective.correction_prob=0")
        noise_idx = draw_noise_index(c.num_tokens, c.group_size, c.causal_num, float(random.shared_rand(1)))
        span = tokenizer.noise_span(noise_idx) - noise_idx
        choice = random.rand(span).to(images.device)
        with torch.autocast(images.device.type, enabled=False):
            triple = tokenizer.correction_codes(images.float(), noise_idx, choice)  # (B, N, 3)
        noisy = (random.rand() < self.config.correction_prob).to(images.device)[:, None]
        return (torch.where(noisy, triple[..., 1], triple[..., 0]), torch.where(noisy, triple[..., 2], triple[..., 0]))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        tokens, target = self.input_and_target(batch["images"], random)
        labels = self.drop_labels(batch["labels"], random)
        logits = model(labels, tokens)  # (B, N, V); reads tokens[:, :N - g]
        loss = token_cross_entropy(logits, target, self.config.label_smoothing)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == target).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    def sample(self, network: nn.Module, labels: torch.Tensor, shape, settings: NextDetailSamplerConfig,
               generator: torch.Generator | None = None, edit=None) -> torch.Tensor:
        if edit is not None:
            raise ValueError(f"DetailFlow has no zero-shot editing: {self.no_edit_reason}")
        return sample_next_detail(unwrap(network), self._tokenizer_on(labels.device), labels, settings, generator)

    def evaluations_per_sample(self, settings: NextDetailSamplerConfig) -> int:
        c = self.tokenizer.config
        return len(detail_schedule(c.num_tokens, c.group_size, c.causal_num)) * (2 if settings.guided else 1)
