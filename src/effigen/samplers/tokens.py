"""Sampling discrete tokens from logits, shared by every token generator (VAR, HMAR, raster AR).

- `filter_logits`: top-k then top-p (nucleus) filtering with the semantics of VAR's `sample_with_top_k_top_p_`
  (top-p keeps the smallest set whose probability mass reaches `top_p`; 0 disables either filter).
- `SampleNoise`: one random stream per sample (seeded from the caller's generator, in order), so a sample does
  not depend on the batch it was drawn in; drawn on the CPU, so CPU and GPU runs share the same draws.
- `sample_tokens`: Gumbel-max sampling (argmax of logits / temperature + Gumbel noise) = exact sampling from the
  softmax, on any device, reproducible; `top_k=1` is greedy.
- `gumbel_soft_codes`: VAR's `more_smooth` Gumbel-softmax mixture of code vectors (visualisation only).
- `guided_logits`: classifier-free guidance in VAR's convention, (1 + w) cond - w uncond, where w ramps
  linearly over the steps (`schedule="linear"`: w = cfg * i / (n - 1), VAR/HMAR) or stays constant (`"constant"`:
  w = cfg - 1 gives LlamaGen's uncond + cfg (cond - uncond)).
"""

from __future__ import annotations

import torch

from ..config import check_range
from ..nn import cpu_kernels
from .guidance import check_guidance


def check_token_sampling(cfg_scale: float, top_k: int, top_p: float, temperature: float) -> None:
    """Validate the settings every token sampler shares (for a sampler config's `__post_init__`): out-of-range
    top_k / top_p used to mean "no filter" silently; now a ValueError names the setting and its valid range."""
    check_guidance(cfg_scale)
    check_range("top_k", top_k, 0, meaning="0 keeps every token, 1 is greedy, k keeps the k most likely")
    check_range("top_p", top_p, 0, 1, meaning="the nucleus probability mass; 0 or 1 keeps every token")
    check_range("temperature", temperature, 0, meaning="1 samples the model's distribution, towards 0 greedy")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """(..., V) logits with the filtered entries set to -inf (a new tensor).

    With both filters, top-p only ever sees the survivors of top-k, so it sorts and sums those (the values of
    `topk(sorted=True)`) instead of sorting all V: the same kept set as `filter_logits_reference` (the filtered
    entries add exactly 0 to the softmax's sum and to every cumulative sum), at a fraction of the cost for VAR's
    k = 900 of V = 4096. Values tied with the k-th largest survive top-k in both (one topk of k plus a margin finds
    them; a second one of the batch's largest survivor count only where they run past the margin); where top-p's cut falls inside a group of equal values, which of them go is up to
    the sort order in both (torch's sort is not stable either)."""
    V = logits.shape[-1]
    if 0 < top_k < V and 0 < top_p < 1:
        # one topk a little wider than k: bf16 logits often tie at the k-th value, and every tie survives top-k
        wide = min(V, top_k + max(16, top_k // 8))
        values, indices = logits.topk(wide, dim=-1, largest=True, sorted=True)  # (..., wide), descending
        kth = values[..., top_k - 1:top_k]
        survivors = int((values >= kth).sum(dim=-1).max())  # > k where the k-th value is tied
        if survivors == wide < V:  # the ties run past the margin: count them in the whole row
            survivors = int((logits >= kth).sum(dim=-1).max())
            values, indices = logits.topk(survivors, dim=-1, largest=True, sorted=True)
        values, indices = values[..., :survivors], indices[..., :survivors]
        if survivors > top_k:
            values = values.masked_fill(values < kth, float("-inf"))  # rows with fewer ties: beyond their survivors
        ascending = values.flip(-1)
        remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        kept = ascending.masked_fill(remove, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter_(-1, indices.flip(-1), kept)
    return filter_logits_reference(logits, top_k, top_p)


def filter_logits_reference(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """`filter_logits` as VAR's `sample_with_top_k_top_p_` computes it: top-k masks all but the k largest, then top-p
    sorts all V logits (the numerical reference of the top-k-first path)."""
    logits = logits.clone()
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


class SampleNoise:
    """Per-sample uniform noise streams: `SampleNoise(generator, B)` draws B seeds from `generator`, then
    `uniform(shape)` returns (B, *shape) where row i comes from stream i alone."""

    def __init__(self, generator: torch.Generator | None, batch_size: int, device: torch.device | str = "cpu"):
        generator = generator if generator is not None else torch.Generator().manual_seed(torch.seed())
        seeds = torch.randint(0, 2**62, (batch_size,), generator=generator).tolist()
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.device = torch.device(device)

    def uniform(self, *shape: int) -> torch.Tensor:
        out = torch.empty(len(self.generators), *shape)
        for row, g in zip(out, self.generators):  # written in place: no stacked copy of (B, *shape)
            torch.rand(*shape, generator=g, out=row)
        return out.to(self.device)

    def normal(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.randn(*shape, generator=g) for g in self.generators]).to(self.device)

    def gumbel(self, *shape: int) -> torch.Tensor:
        u = self.uniform(*shape).clamp_(1e-20, 1.0 - 1e-7)
        return -torch.log(-torch.log(u))


def draw_tokens(filtered: torch.Tensor, noise: SampleNoise, greedy: bool = False,
                temperature: float = 1.0) -> torch.Tensor:
    """Token ids (B, l) from already filtered logits (B, l, V): argmax when `greedy`, else Gumbel-max sampling."""
    if greedy:
        return filtered.argmax(dim=-1)
    B, l, V = filtered.shape
    return (filtered / max(temperature, 1e-6) + noise.gumbel(l, V)).argmax(dim=-1)


def sample_tokens(logits: torch.Tensor, noise: SampleNoise, top_k: int = 0, top_p: float = 0.0,
                  temperature: float = 1.0, uncond: torch.Tensor | None = None, weight: float = 0.0) -> torch.Tensor:
    """logits (B, l, V) -> token ids (B, l); with `uncond` (B, l, V), guided first: (1 + weight) logits - weight uncond
    (`guided_logits`)."""
    return _sample(logits, noise, top_k, top_p, temperature, uncond, weight, False)[0]


def sample_tokens_scored(logits: torch.Tensor, noise: SampleNoise, top_k: int = 0, top_p: float = 0.0,
                         temperature: float = 1.0, uncond: torch.Tensor | None = None,
                         weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_tokens` and each drawn token's probability under softmax(filtered logits / temperature), (B, l): the
    confidence by which HMAR re-masks."""
    return _sample(logits, noise, top_k, top_p, temperature, uncond, weight, True)


def _sample(logits: torch.Tensor, noise: SampleNoise, top_k: int, top_p: float, temperature: float,
            uncond: torch.Tensor | None, weight: float, scored: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One draw: the fused CPU kernel (`nn.cpu_kernels.sample_tokens`: one pass per row) where it applies, else the
    eager chain guided_logits -> filter_logits -> draw_tokens it follows. Both consume the same noise (one uniform
    (l, V) per sample unless greedy) and give the same tokens but where an ulp of a sum or a log decides a cut or an
    argmax."""
    B, l, V = logits.shape
    greedy = top_k == 1
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and (uncond is None or uncond.dtype == torch.float32)
            and cpu_kernels.active()):
        uniform = None if greedy else noise.uniform(l, V)
        fused = cpu_kernels.sample_tokens(logits, uniform, top_k, top_p, temperature, greedy, uncond, weight, scored)
        if fused is not None:
            tokens, confidence = fused
            return tokens.to(logits.device), confidence
        gumbel = None if greedy else -torch.log(-torch.log(uniform.clamp_(1e-20, 1.0 - 1e-7)))
    else:
        gumbel = None
    if uncond is not None:
        logits = guided_logits(logits, uncond, weight)
    if torch.isnan(logits).any():
        raise ValueError("the logits to sample tokens from contain NaN: the network's output diverged (check the "
                         "weights, the precision, or lower the guidance scale)")
    filtered = filter_logits(logits.float(), top_k, top_p)
    if greedy:
        tokens = filtered.argmax(dim=-1)
    else:
        if gumbel is None:
            gumbel = noise.gumbel(l, V)
        tokens = (filtered / max(temperature, 1e-6) + gumbel.to(filtered.device)).argmax(dim=-1)
    if not scored:
        return tokens, None
    scaled = filtered if temperature == 1.0 else filtered / max(temperature, 1e-6)
    return tokens, scaled.softmax(dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def gumbel_soft_codes(logits: torch.Tensor, codebook: torch.Tensor, tau: float, noise: SampleNoise) -> torch.Tensor:
    """Soft mixture of code vectors, softmax((logits + Gumbel) / tau) @ codebook, (B, l, C)."""
    B, l, V = logits.shape
    weights = ((logits.float() + noise.gumbel(l, V)) / tau).softmax(dim=-1)
    return weights @ codebook.float()


def guidance_weight(cfg: float, step: int, num_steps: int, schedule: str = "linear") -> float:
    if schedule == "linear":
        return cfg * step / max(num_steps - 1, 1)
    if schedule == "constant":
        return cfg
    raise ValueError(f"unknown guidance schedule {schedule!r}; use 'linear' (VAR's ramp) or 'constant'")


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    return (1 + weight) * cond - weight * uncond
