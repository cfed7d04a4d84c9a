"""ResGen's network (Kim et al., "Efficient Generative Modeling with Residual Vector Quantization-Based Tokens",
ICML 2025, arXiv 2412.10208): a bidirectional transformer over the L positions of a residual-VQ token grid
(`tokenizers.rvq`, D codes per position) with a mixture-of-Gaussians head over the *sum of the code embeddings of
a position's masked depths* (the paper's "collective" or cumulative-embedding target).

Inputs per position i, where the first k_i depths are known (a coarse prefix; `kept` = k_i in 0..D):

    x_i = word_embed(sum_{j < k_i} e_j(x_{i,j})) + kept_embed(k_i) + pos_i          (B, L, width)

The class conditions every block through adaLN (VAR's blocks, `models.var.AdaLNSelfAttn`, imported), the null
class `num_classes` is the unconditional one. No attention mask: every position sees every other.

Head, per position: K mixture logits, K means in the tokenizer's code space (Cvae) and K isotropic log-scales:

    mu_k = U a_k + b      a_k = (W h)_k in R^r       (low rank r = `mixture_rank`; 0: a full Linear to K x Cvae)

What the paper does not pin down (no public code) and is our choice here: the input embedding (the sum of the
known depths' codes, RQ-Transformer's convention, plus an embedding of how many depths are known, so a fully masked
position gets a learned mask vector); the low-rank form above (the paper cites CLaM-TTS's low-rank projection
without its exact shape); isotropic per-component scales (clamped to log sigma in [-7, 4]); K, r and the sizes of
the presets (ours, for built-in MNIST). The loss lives in `objectives.resgen`, the sampling loop in `samplers.resgen`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .var import AdaLNBeforeHead, AdaLNSelfAttn, VARConfig


@dataclass
class ResGenConfig(VARConfig):
    # `depth` is the transformer's (the size dial: width 64 x depth, heads = depth, as VAR); `rvq_depth` the
    # tokenizer's codes per position, `scales` = (grid side,), both set from the tokenizer by `effigen train`
    rvq_depth: int = 4
    mixture_components: int = 8
    mixture_rank: int = 8  # 0: full-rank means
    scales: tuple[int, ...] = (8,)
    vocab_size: int = 256
    latent_channels: int = 16

    def __post_init__(self):
        super().__post_init__()
        if len(self.scales) != 1:
            raise ValueError(f"scales={self.scales}: ResGen works on one grid of positions (scales=(side,)); use a "
                             "residual-VQ tokenizer (method rvq)")
        if self.rvq_depth < 1 or self.mixture_components < 1 or self.mixture_rank < 0:
            raise ValueError("rvq_depth and mixture_components must be >= 1 and mixture_rank >= 0")

    @property
    def num_positions(self) -> int:
        return self.scales[0] ** 2


RESGEN_PRESETS: dict[str, dict] = {
    # VAR-d4's blocks (width 256, 4 heads): about its parameter count on an 8x8 grid
    "ResGen-d4": {"depth": 4, "mixture_components": 16, "mixture_rank": 8},
    "ResGen-Test": {"depth": 2, "embed_dim": 32, "num_heads": 2, "mixture_components": 3, "mixture_rank": 2},
}

LOG_STD_RANGE = (-7.0, 4.0)


class Mixture(NamedTuple):
    """Per-position mixture of isotropic Gaussians: logits (..., K), means (..., K, C), log_std (..., K)."""

    logits: torch.Tensor
    means: torch.Tensor
    log_std: torch.Tensor


class MixtureHead(nn.Module):
    def __init__(self, width: int, channels: int, components: int, rank: int):
        super().__init__()
        self.components, self.channels, self.rank = components, channels, rank
        self.logits = nn.Linear(width, components)
        self.log_std = nn.Linear(width, components)
        if rank:
            self.coefficients = nn.Linear(width, components * rank)
            self.up = nn.Linear(rank, channels)  # shared by the components
        else:
            self.means = nn.Linear(width, components * channels)

    def forward(self, h: torch.Tensor) -> Mixture:
        K = self.components
        if self.rank:
            means = self.up(self.coefficients(h).unflatten(-1, (K, self.rank)))  # (B, L, K, C)
        else:
            means = self.means(h).unflatten(-1, (K, self.channels))
        return Mixture(self.logits(h), means, self.log_std(h).clamp(*LOG_STD_RANGE))


class ResGen(nn.Module):
    config_class = ResGenConfig

    def __init__(self, config: ResGenConfig):
        super().__init__()
        self.config = config
        C = config.embed_dim
        self.class_emb = nn.Embedding(config.num_classes + 1, C)
        self.word_embed = nn.Linear(config.latent_channels, C, bias=False)
        self.kept_embed = nn.Embedding(config.rvq_depth + 1, C)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_positions, C))
        rates = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        self.blocks = nn.ModuleList([AdaLNSelfAttn(config, rates[i]) for i in range(config.depth)])
        self.head_nm = AdaLNBeforeHead(C, config.norm_eps)
        self.head = MixtureHead(C, config.latent_channels, config.mixture_components, config.mixture_rank)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        C = self.config.embed_dim
        std = math.sqrt(1 / C / 3)  # VAR's init_std for every Linear / Embedding / position
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        nn.init.trunc_normal_(self.pos_embed, std=std)
        # residual projections scaled by depth, adaLN gates small (VAR's init_adaln / init_adaln_gamma)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.config.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.config.depth))
            block.ada_lin[-1].weight[2 * C :].mul_(self.config.init_adaln)
            block.ada_lin[-1].weight[: 2 * C].mul_(self.config.init_adaln_gamma)
        self.head_nm.ada_lin[-1].weight.mul_(self.config.init_adaln)
        # the head starts with equal mixture weights and unit scales
        self.head.logits.weight.mul_(self.config.init_head)
        self.head.log_std.weight.mul_(self.config.init_head)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def rvq_depth(self) -> int:
        return self.config.rvq_depth

    def forward(self, labels: torch.Tensor, known_sum: torch.Tensor, kept: torch.Tensor) -> Mixture:
        """labels (B,), known_sum (B, L, Cvae): the sum of each position's known depths' code vectors, kept (B, L)
        long: how many depths (a coarse prefix) are known -> the Mixture over the sum of the other depths' codes."""
        B, L = kept.shape
        if known_sum.shape != (B, self.config.num_positions, self.config.latent_channels) or L != self.config.num_positions:
            raise ValueError(f"known_sum must be (B, {self.config.num_positions}, {self.config.latent_channels}) and kept "
                             f"(B, {self.config.num_positions}); got {tuple(known_sum.shape)} and {tuple(kept.shape)}")
        cond = self.class_emb(labels)  # (B, C)
        x = self.word_embed(known_sum.float()) + self.kept_embed(kept) + self.pos_embed  # (B, L, C)
        for block in self.blocks:
            x = block(x, cond)  # bidirectional: no mask
        with torch.autocast(x.device.type, enabled=False):  # the mixture in fp32: bf16 means would blur small scales
            return self.head(self.head_nm(x.float(), cond.float()))
