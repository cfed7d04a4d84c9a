"""Raster-scan next-token sampling for LlamaGen-style generators (Sun et al., arXiv 2406.06525; `generate`,
`prefill`, `decode_n_tokens` in LlamaGen's `autoregressive/models/generate.py`).

Step 0 runs the class token alone; step i >= 1 runs only token t_{i-1} at sequence position i, attending to the
keys/values of every earlier position cached per layer (`network.new_cache()`; a single new position needs no
mask), and samples t_i from the logits: L = h * w steps in all, one token each.

Guidance: LlamaGen's classifier-free guidance uncond + s (cond - uncond) with a constant scale s (`cfg_scale`; 1 = none),
the conditional and null-class halves in one doubled batch. `tokens.guided_logits` is written in VAR's convention
(1 + w) cond - w uncond, so s maps to w = s - 1 (`guidance_weight(s - 1, ...)`; `guidance_schedule="linear"` ramps w
from 0 to s - 1 over the tokens instead, like DetailFlow's `gradual_cfg`). Filtering and sampling are
`tokens.sample_tokens` (top-k, top-p, temperature; Gumbel-max with one noise stream per sample, so a sample does not
depend on its batch). LlamaGen's FID setting is top-k 0, top-p 1.0 (off; here top_p=0 also means off),
temperature 1, s = 2.0 for GPT-B/L.

The network provides `class_tokens`, `token_embeddings`, `trunk(x, start, mask, cache)`, `logits(h)`, `new_cache()`,
`null_class`, `num_tokens` and `scales` (`effigen.models.gpt.GPT`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .tokens import SampleNoise, check_token_sampling, guidance_weight, guided_logits, sample_tokens


@dataclass
class NextTokenSamplerConfig:
    cfg_scale: float = 2.0  # LlamaGen's s: uncond + s (cond - uncond); 1 = no guidance (VAR's w = s - 1)
    guidance_schedule: Literal["constant", "linear"] = "constant"  # LlamaGen: constant
    top_k: int = 0  # 0 disables; >= vocabulary size disables
    top_p: float = 0.0  # 0 disables (LlamaGen's top_p = 1.0)
    temperature: float = 1.0

    def __post_init__(self):
        check_token_sampling(self.cfg_scale, self.top_k, self.top_p, self.temperature)

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


@torch.no_grad()
def generate_tokens(network, labels: torch.Tensor, settings: NextTokenSamplerConfig,
                    generator: torch.Generator | None = None, guided: bool | None = None,
                    return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """labels (B,) -> token ids (B, L) in raster order (and the (guided) logits each was drawn from, (B, L, V)).
    `guided` (default: cfg_scale != 1) forces the doubled conditional/unconditional batch on or off."""
    B, L = labels.shape[0], network.num_tokens
    guided = settings.guided if guided is None else guided
    all_labels = torch.cat((labels, torch.full_like(labels, network.null_class))) if guided else labels
    cache = network.new_cache()
    x = network.class_tokens(all_labels)
    noise = SampleNoise(generator, B, labels.device)
    ids = torch.empty(B, L, dtype=torch.long, device=labels.device)
    steps = []
    for i in range(L):
        logits = network.logits(network.trunk(x, i, None, cache))  # (B or 2B, 1, V)
        if guided:
            weight = guidance_weight(settings.cfg_scale - 1.0, i, L, settings.guidance_schedule)
            logits = guided_logits(logits[:B], logits[B:], weight)
        token = sample_tokens(logits, noise, settings.top_k, settings.top_p, settings.temperature)  # (B, 1)
        ids[:, i] = token[:, 0]
        if return_logits:
            steps.append(logits)
        if i < L - 1:
            x = network.token_embeddings(token.repeat(2, 1) if guided else token)
    return (ids, torch.cat(steps, dim=1)) if return_logits else ids


@torch.no_grad()
def sample_next_token(network, tokenizer, labels: torch.Tensor, settings: NextTokenSamplerConfig,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """labels (B,) -> the tokenizer's latent (B, C, h, w) of the sampled token grid (the pipeline decodes it)."""
    if tuple(network.scales) != tuple(tokenizer.scales):
        raise ValueError(f"the generator's token grid {network.scales} differs from the tokenizer's scales {tokenizer.scales}")
    ids = generate_tokens(network, labels, settings, generator)
    return tokenizer.latent_from_indices([ids])
