"""DetailFlow's group-parallel next-detail sampling (arXiv 2505.21473; ByteFlow-AI/DetailFlow
`autoregressive/models/generate.py::generate_group_par`).

Forward calls: token 0 from the class token alone, tokens 1..c-1 one per call (c = causal_num), then the remaining
(N - c) / g groups of g tokens, one call per group (the g - 1 placeholder embeddings stand in for the group's
unknown tokens; `models.detailflow`): c + (N - c) / g calls instead of N (8x fewer for 128 tokens in groups of 8).

Guidance is the official one, uncond + s (cond - uncond) with the conditional and null-class halves in one doubled
batch; s = `cfg_scale` on every call, or with `gradual_cfg` on the group calls i = c/g .. N/g - 1 it decays as
s * (N/g - i + 1) / (N/g + 1) (the causal-prefix calls keep s). Written in `tokens.guided_logits`' convention with
w = s - 1. Filtering and drawing are `tokens.sample_tokens` (top-k, top-p, temperature, Gumbel-max with one noise
stream per sample); top_k = 1 is greedy. The official FID setting: top-k off, top-p off, temperature 1,
s = 1.45 / 1.5 / 1.32 for 128 / 256 / 512 tokens.

KV cache (`kv_cache=True`, the default here; the official loop has none and re-runs the whole prefix every call):
under the group-causal mask no position sees a later one, so the keys and values of earlier positions never change,
and each call only needs the positions whose inputs became known: the previous call's tokens (plus the placeholders
on the first group call). Both paths give the same tokens (tested).

The network provides `class_tokens`, `token_embeddings`, `input_embeddings`, `spe_tok_embeddings`,
`attention_mask`, `trunk`, `logits`, `new_cache`, `null_class` and its config's `num_tokens`, `group_size`,
`causal_num` (`effigen.models.detailflow.DetailFlowGPT`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokens import SampleNoise, check_token_sampling, guided_logits, sample_tokens


@dataclass
class NextDetailSamplerConfig:
    cfg_scale: float = 1.45  # the official s for 128 tokens; 1 = no guidance
    gradual_cfg: bool = False  # the official gradual_cfg: s decays over the group calls
    top_k: int = 0  # 0 disables; 1 is greedy
    top_p: float = 0.0  # 0 disables (the official top_p = 1.0)
    temperature: float = 1.0
    kv_cache: bool = True

    def __post_init__(self):
        check_token_sampling(self.cfg_scale, self.top_k, self.top_p, self.temperature)

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


def detail_schedule(num_tokens: int, group_size: int, causal_num: int) -> list[tuple[int, int]]:
    """[(first token, tokens)] predicted per forward call: 1 each over the causal prefix, then whole groups."""
    return [(i, 1) for i in range(causal_num)] + [(i, group_size) for i in range(causal_num, num_tokens, group_size)]


def guidance_scale(settings: NextDetailSamplerConfig, first: int, num_tokens: int, group_size: int,
                   causal_num: int) -> float:
    """s of the call predicting from token `first` on (the official constant or gradual schedule)."""
    if not settings.gradual_cfg or first < causal_num:
        return settings.cfg_scale
    groups, i = num_tokens // group_size, first // group_size
    return settings.cfg_scale * (groups - i + 1) / (groups + 1)


@torch.no_grad()
def generate_details(network, labels: torch.Tensor, settings: NextDetailSamplerConfig,
                     generator: torch.Generator | None = None,
                     return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """labels (B,) -> token ids (B, N) coarse to fine (and the guided logits each was drawn from, (B, N, V))."""
    config = network.config
    N, g, c = config.num_tokens, config.group_size, config.causal_num
    B, guided = labels.shape[0], settings.guided
    all_labels = torch.cat((labels, torch.full_like(labels, network.null_class))) if guided else labels
    noise = SampleNoise(generator, B, labels.device)
    ids = torch.zeros(B, N, dtype=torch.long, device=labels.device)
    cache = network.new_cache() if settings.kv_cache else None
    steps = []
    for first, count in detail_schedule(N, g, c):
        known = ids[:, :first].repeat(2, 1) if guided else ids[:, :first]
        if cache is None:  # the official path: the whole prefix again
            x = network.input_embeddings(all_labels, known)
            h = network.trunk(x, 0, network.attention_mask(x.shape[1]))[:, -count:]
        else:  # only the positions whose inputs are new
            if first == 0:
                x, start = network.class_tokens(all_labels), 0
            elif first < c:
                x, start = network.token_embeddings(known[:, -1:]), first
            elif first == c:
                last = network.token_embeddings(known[:, -1:])  # (2B, 1, D)
                placeholders = network.spe_tok_embeddings().unsqueeze(0).expand(last.shape[0], -1, -1)
                x, start = torch.cat((last, placeholders.to(last.dtype)), dim=1), c
            else:
                x, start = network.token_embeddings(known[:, -g:]), first
            h = network.trunk(x, start, None, cache)
        logits = network.logits(h)  # (B or 2B, count, V)
        if guided:
            weight = guidance_scale(settings, first, N, g, c) - 1.0
            logits = guided_logits(logits[:B], logits[B:], weight)
        ids[:, first:first + count] = sample_tokens(logits, noise, settings.top_k, settings.top_p, settings.temperature)
        if return_logits:
            steps.append(logits)
    return (ids, torch.cat(steps, dim=1)) if return_logits else ids


@torch.no_grad()
def sample_next_detail(network, tokenizer, labels: torch.Tensor, settings: NextDetailSamplerConfig,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """labels (B,) -> the tokenizer's code vectors (B, N, C) of the sampled sequence (the pipeline decodes them)."""
    if tokenizer.config.num_tokens != network.config.num_tokens:
        raise ValueError(f"the generator models {network.config.num_tokens} tokens, the tokenizer makes "
                         f"{tokenizer.config.num_tokens}")
    return tokenizer.latent_from_indices(generate_details(network, labels, settings, generator))
