"""ResGen's training objective (Kim et al., ICML 2025, arXiv 2412.10208): masked discrete diffusion over the
position x depth grid of residual-VQ tokens, trained by the likelihood of the summed embeddings of masked depths
under a mixture of Gaussians.

Per sample (facts from next_wave.md §2; the paper has no public code):

- forward masking, fine to coarse: r ~ U[0, 1), n = ceil(gamma(r) L D) cells masked (gamma(r) = cos(pi r / 2), MaskGIT's
  schedule: the paper's gamma is "cosine-like", our exact choice). A uniformly random n-subset of the L x D cells
  is drawn and only its per-position counts k_i are used (so the k_i are multivariate hypergeometric, as in the
  paper); at position i the k_i *finest* depths are masked, so every position keeps a coarse prefix;
- target per position with k_i > 0: z_i = sum of the codes of its masked depths (`draw_fine_to_coarse_mask`);
- loss: -log p_theta(z_i | known prefixes, class) under the network's mixture of Gaussians, in nats per code
  dimension, averaged over the masked positions of a sample, then over the batch. `mog_loss: nll` is the exact
  mixture likelihood (log-sum-exp over components); `mog_loss: split` is the paper's split into a classification
  term and a regression term: -log pi_k* - log N(z; mu_k*, sigma_k*^2) with k* the most responsible component
  (an upper bound on the NLL by Jensen / max <= log-sum-exp; which bound the paper uses exactly is not published);
- label dropout (`label_dropout`, 0.1) for classifier-free guidance.

Sampling is `effigen.samplers.resgen.sample_resgen`; `sample` returns the latent f_hat that the pipeline decodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..rng import BatchRandom
from ..samplers.resgen import (ResGenSamplerConfig, ResidualEditSpec, evaluations, masking_schedule,
                               mixture_log_density, sample_resgen)
from .next_scale import TokenizedObjective, unwrap


@dataclass
class ResGenObjectiveConfig:
    label_dropout: float = 0.1
    mog_loss: Literal["nll", "split"] = "nll"

    def __post_init__(self):
        if self.mog_loss not in ("nll", "split"):
            raise ValueError(f"mog_loss={self.mog_loss!r}: use 'nll' (exact mixture likelihood) or 'split' "
                             "(classification + regression of the most responsible component)")


def draw_fine_to_coarse_mask(batch: int, positions: int, depth: int, random: BatchRandom,
                             device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked (B, L, D) bool, True on the finest k_i depths of position i; ratio r (B,)). The total number of masked
    cells is ceil(gamma(r) L D) >= 1, spread over positions as a uniformly random subset of cells would be."""
    ratio = random.rand()
    cells = positions * depth
    scores = random.rand(cells)  # (B, L*D)
    count = torch.ceil(masking_schedule(ratio) * cells).clamp(1, cells)
    chosen = scores.argsort(dim=1).argsort(dim=1) < count.unsqueeze(1)  # a uniform count-subset of the cells
    per_position = chosen.view(-1, positions, depth).sum(-1)  # (B, L), multivariate hypergeometric
    levels = torch.arange(depth)
    masked = levels >= (depth - per_position).unsqueeze(-1)
    return masked.to(device), ratio.to(device)


def mixture_nll(mixture, z: torch.Tensor, kind: str = "nll") -> torch.Tensor:
    """-log p(z) (...,) under the mixture (fields (..., K[, C])), exact (`nll`) or split (`split`, see above)."""
    joint = mixture_log_density(tuple(m.float() for m in mixture), z.float())  # (..., K)
    if kind == "nll":
        return -torch.logsumexp(joint, dim=-1)
    best = joint.detach().argmax(-1, keepdim=True)
    return -joint.gather(-1, best).squeeze(-1)


class ResGenObjective(TokenizedObjective):
    config_class = ResGenObjectiveConfig
    sampler_config_class = ResGenSamplerConfig

    def check_depth(self, network: nn.Module) -> None:
        D = self.tokenizer.quantize.depth
        if unwrap(network).rvq_depth != D:
            raise ValueError(f"the generator predicts {unwrap(network).rvq_depth} depths per position but the tokenizer "
                             f"was trained for depth {D}: build the generator from this tokenizer (network.rvq_depth is "
                             "set from it by effigen train) or use the tokenizer of that depth")

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        self.check_depth(model)
        images = batch["images"]
        indices = self.tokenize(images)  # (B, L, D)
        B, L, D = indices.shape
        masked, ratio = draw_fine_to_coarse_mask(B, L, D, random, images.device)
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            codes = self.tokenizer.quantize.embed(indices).float()  # (B, L, D, Cvae)
            known_sum = (codes * (~masked).unsqueeze(-1)).sum(-2)
            target = (codes * masked.unsqueeze(-1)).sum(-2)
        kept = D - masked.sum(-1)  # (B, L)
        labels = self.drop_labels(batch["labels"], random)
        mixture = model(labels, known_sum, kept)
        per_position = mixture_nll(mixture, target, self.config.mog_loss) / target.shape[-1]  # (B, L)
        weights = (kept < D).float()
        counts = weights.sum(1)
        loss = ((per_position * weights).sum(1) / counts.clamp(min=1)).mean()
        with torch.no_grad():
            responsibility = mixture_log_density(tuple(m.float() for m in mixture), target).softmax(-1)
            used = (responsibility * weights.unsqueeze(-1)).sum((0, 1)) / counts.sum().clamp(min=1)
            entropy = -(used * used.clamp(min=1e-12).log()).sum()
        return {"loss": loss, "mask_ratio": masked.float().mean(),
                "components_used": entropy.exp(),  # effective number of mixture components in use
                "component_entropy_per_dim": torch.tensor(0.5 * math.log(2 * math.pi * math.e)) + mixture.log_std.detach().mean()}

    def sample(self, network: nn.Module, labels: torch.Tensor, shape, settings: ResGenSamplerConfig,
               generator: torch.Generator | None = None, edit: ResidualEditSpec | None = None) -> torch.Tensor:
        self.check_depth(network)
        return sample_resgen(unwrap(network), self._tokenizer_on(labels.device), labels, settings, generator, edit)

    @torch.no_grad()
    def edit_spec(self, images: torch.Tensor, keep_mask: torch.Tensor) -> ResidualEditSpec:
        """images (B, 3, H, W) in [-1, 1]; keep_mask (B or 1, 1, H, W), 1 = keep: a position keeps its tokens where the
        mask, area-averaged over its patch, exceeds 0.5."""
        if keep_mask.ndim != 4 or keep_mask.shape[1] != 1 or keep_mask.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"the mask must be (B, 1, {images.shape[-2]}, {images.shape[-1]}) like the image, "
                             f"got {tuple(keep_mask.shape)}")
        tokenizer = self._tokenizer_on(images.device)
        with torch.autocast(images.device.type, enabled=False):
            indices = tokenizer.indices_from_images(images.float())
        side = tokenizer.config.side
        keep = F.interpolate(keep_mask.float().to(images.device), size=(side, side), mode="area") > 0.5
        return ResidualEditSpec(indices, keep.flatten(1).expand(images.shape[0], -1))

    def evaluations_per_sample(self, settings: ResGenSamplerConfig) -> int:
        return evaluations(settings)
