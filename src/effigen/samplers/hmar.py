"""HMAR sampling: Markovian next-scale prediction with masked multi-step refinement inside a scale
(Kumbong et al., arXiv 2506.04421; the official `HMAR.generate`).

For each scale k = 1..K:

1. next-scale pass: the network sees scale k's s_k^2 input tokens only (the accumulated latent f_hat of the coarser
   scales, downsampled; no KV cache, nothing grows with k); guidance (1 + w_k) cond - w_k uncond with VAR's ramp
   w_k = (cfg_scale - 1) k / (K - 1); top-k/top-p; Gumbel-max sampling (top_k = 1: greedy);
2. masked refinement, when the scale's schedule entry has several steps [n_1, n_2, ..., n_m] (sum = s_k^2): keep the
   n_1 most confident sampled tokens, re-mask the others; then for each further step run the mask branch (input:
   the coarser f_hat plus the scale's current code map, masked positions replaced by the mask embedding), resample
   the masked tokens, and, unless it is the last step, re-mask the n_{j+1} + ... + n_m least confident of them;
3. add the scale's code map to f_hat (`quantize.next_input`).

The confidence of a token is its probability under the filtered (top-k/top-p, temperature) distribution it was
drawn from, as in the official code (which filters the logits in place before computing it; with top_k = 1 every
confidence is 1 and the re-mask order is the stable order of positions: `torch.argsort(stable=True)` reproduces
the official choices). Guidance on the mask steps: the official code hard-codes w = cfg * 1e-6 (effectively off, yet
it still runs the unconditional rows); `mask_guidance_ratio` keeps that factor (w_mask = (cfg_scale - 1) x ratio),
0 skips the unconditional rows, None uses the scale's own ramped w.

The schedule (`mask_schedule`, one list of step sizes per scale) is a sampler setting, so any schedule can be used
at inference without retraining; None (or "default") is the official default pattern (`default_mask_schedule`: a 2x2
scale in steps [1, 3], a 3x3 scale in [1, 1, 2, 5], every other scale in one step), "off" one step per scale.
`validate_mask_schedule` explains a wrong one.

Zero-shot editing (`EditSpec`): the given image's tokens are forced where the keep-mask holds after every draw and
are never re-masked, so they survive refinement and the mask branch fills the rest around them.

The network provides `class_condition`, `first_tokens`, `scale_tokens`, `mask_tokens`, `next_scale_logits`,
`mask_logits` and `null_class` (`effigen.models.hmar.HMAR`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import ConfigError, check_range
from .next_scale import EditSpec
from .tokens import SampleNoise, check_token_sampling, guidance_weight, sample_tokens, sample_tokens_scored


@dataclass
class HMARSamplerConfig:
    # effigen's guidance scale s: uncond + s (cond - uncond), 1 = off; HMAR's own `cfg` w is s - 1 (ramped like VAR's)
    cfg_scale: float = 2.5
    guidance_schedule: Literal["linear", "constant"] = "linear"
    top_k: int = 900  # 0 disables; >= vocabulary size disables
    top_p: float = 0.96  # 0 disables
    temperature: float = 1.0
    # per scale, the number of tokens committed at each step (sums to s_k^2); "default" (or None) =
    # default_mask_schedule(scales); "off" = one step per scale (no refinement, e.g. a stage-1 model)
    mask_schedule: list[list[int]] | str | None = None
    # guidance on the mask steps: w = (cfg_scale - 1) x this (official: 1e-6); 0 = unguided (half the work);
    # None = the scale's own ramped weight
    mask_guidance_ratio: float | None = 1e-6

    def __post_init__(self):
        check_token_sampling(self.cfg_scale, self.top_k, self.top_p, self.temperature)
        check_range("mask_guidance_ratio", self.mask_guidance_ratio, 0,
                    meaning="mask-step guidance w = (cfg_scale - 1) x this; 0 = unguided, null = the scale's own")


def default_mask_schedule(scales: tuple[int, ...]) -> list[list[int]]:
    """The official default pattern (utils/sampling_arg_util.py for 256 px: [[1], [1, 3], [1, 1, 2, 5], [16], ...])."""
    out = []
    for side in scales:
        out.append([1, 3] if side == 2 else [1, 1, 2, 5] if side == 3 else [side * side])
    if len(out[0]) > 1:  # the first scale is never refined
        out[0] = [scales[0] ** 2]
    return out


def single_step_schedule(scales: tuple[int, ...]) -> list[list[int]]:
    """No refinement: every scale in one next-scale step."""
    return [[side * side] for side in scales]


def validate_mask_schedule(schedule: list[list[int]] | None, scales: tuple[int, ...]) -> list[list[int]]:
    """The schedule to use for `scales` (None -> the default), or a ConfigError that says what is wrong."""
    example = json.dumps(default_mask_schedule(scales)).replace(" ", "")
    if schedule is None or schedule == "default":
        return default_mask_schedule(scales)
    if schedule == "off":
        return single_step_schedule(scales)
    if isinstance(schedule, str):
        raise ConfigError(f"mask_schedule {schedule!r}: use a list of step lists (e.g. {example}), 'default' or 'off'")
    if not isinstance(schedule, (list, tuple)) or len(schedule) != len(scales):
        count = len(schedule) if isinstance(schedule, (list, tuple)) else "no"
        raise ConfigError(f"mask_schedule has {count} entries but the model has {len(scales)} scales {tuple(scales)}: "
                          f"give one list of step sizes per scale, e.g. {example}")
    out = []
    for si, (steps, side) in enumerate(zip(schedule, scales)):
        if not isinstance(steps, (list, tuple)) or not steps or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in steps):
            raise ConfigError(f"mask_schedule[{si}] = {steps!r}: a scale's entry is a non-empty list of positive token "
                              f"counts, one per step (e.g. [1, 3] for a 2x2 scale)")
        if sum(steps) != side * side:
            raise ConfigError(f"mask_schedule[{si}] = {list(steps)} sums to {sum(steps)}, but scale {si} ({side}x{side}) "
                              f"has {side * side} tokens: the steps of a scale must add up to its token count")
        if si == 0 and len(steps) > 1:
            raise ConfigError(f"mask_schedule[0] = {list(steps)}: the first scale cannot be refined (its input is the "
                              f"class token, which the mask branch is never trained on); use [{side * side}]")
        out.append([int(n) for n in steps])
    return out


def parse_mask_schedule(text: str) -> list[list[int]] | str:
    """A schedule from the command line: JSON `[[1],[1,3],[1,1,2,5],[16]]`, the compact `1/1,3/1,1,2,5/16` (scales
    separated by `/`, steps by `,`), `default` or `off` (one step per scale)."""
    text = text.strip()
    if text in ("default", "off"):
        return text
    try:
        if text.startswith("["):
            value = json.loads(text)
        else:
            value = [[int(n) for n in part.split(",")] for part in text.split("/")]
    except ValueError:
        raise ConfigError(f"cannot read the schedule {text!r}: write it as JSON ([[1],[1,3],[1,1,2,5],[16]]), as "
                          "1/1,3/1,1,2,5/16 (scales separated by '/', steps by ','), default or off") from None
    if not isinstance(value, list) or not all(isinstance(v, list) for v in value):
        raise ConfigError(f"the schedule {text!r} must be a list of lists of token counts, e.g. [[1],[1,3],[9]]")
    return value


def evaluations(settings: HMARSamplerConfig, scales: tuple[int, ...]) -> int:
    """Network passes per sample (the conditional and unconditional rows of a guided pass count as two)."""
    schedule = validate_mask_schedule(settings.mask_schedule, scales)
    guided = settings.cfg_scale != 1
    mask_guided = guided and settings.mask_guidance_ratio != 0
    mask_steps = sum(len(steps) - 1 for steps in schedule)
    return len(scales) * (2 if guided else 1) + mask_steps * (2 if mask_guided else 1)


def _reorder(order: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Positions `order` (B, l) re-sorted by `key` (B, l, indexed by position), stable (ties keep their order)."""
    return order.gather(1, torch.argsort(key.gather(1, order), dim=1, stable=True))


@torch.no_grad()
def sample_hmar(network, tokenizer, labels: torch.Tensor, settings: HMARSamplerConfig,
                generator: torch.Generator | None = None, edit: EditSpec | None = None, return_indices: bool = False):
    """labels (B,) -> f_hat (B, C, s_K, s_K) (and the final token indices of every scale, [(B, s_k^2)])."""
    quant = tokenizer.quantize
    scales = tuple(network.scales)
    if scales != tuple(quant.scales):
        raise ValueError(f"the generator's scales {scales} differ from the tokenizer's {quant.scales}")
    schedule = validate_mask_schedule(settings.mask_schedule, scales)
    B, K = labels.shape[0], len(scales)
    device = labels.device
    guided = settings.cfg_scale != 1
    cond = network.class_condition(torch.cat((labels, torch.full_like(labels, network.null_class))) if guided else labels)
    x = network.first_tokens(cond)
    f_hat = torch.zeros(B, quant.config.latent_channels, scales[-1], scales[-1], device=device)
    previous = None  # the current scale's next-scale input features (downsampled f_hat of the coarser scales)
    noise = SampleNoise(generator, B, device)
    greedy = settings.top_k == 1

    def pick(logits: torch.Tensor, weight: float, scored: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (2B or B, l, V) -> (tokens, their probabilities under the guided, filtered logits if `scored`)."""
        uncond = None
        if logits.shape[0] != B:
            logits, uncond = logits[:B], logits[B:]
        args = (logits, noise, settings.top_k, settings.top_p, settings.temperature, uncond, weight)
        return sample_tokens_scored(*args) if scored else (sample_tokens(*args), None)

    all_indices = []
    for si, side in enumerate(scales):
        l = side * side
        weight = guidance_weight(settings.cfg_scale - 1, si, K, settings.guidance_schedule) if guided else 0.0
        steps = schedule[si]
        tokens, key = pick(network.next_scale_logits(x, cond), weight, len(steps) > 1)
        forced = None
        if edit is not None:
            forced = edit.keep[si].reshape(B, l)
            if edit.indices is not None:
                tokens = torch.where(forced, edit.indices[si].to(tokens.device), tokens)

        def code_map(tokens: torch.Tensor) -> torch.Tensor:
            h = quant.embed(tokens, side).float()
            return h if edit is None else torch.where(edit.keep[si], edit.codes[si].float(), h)

        if len(steps) > 1:
            free = torch.full((B,), l, device=device)
            if forced is not None:  # forced tokens are never re-masked
                key = key.masked_fill(forced, float("inf"))
                free = (~forced).sum(1)
            order = _reorder(torch.arange(l, device=device).expand(B, l), key)  # least confident first
            rank = torch.arange(l, device=device).expand(B, l)

            def mask_of(order: torch.Tensor, count: int) -> torch.Tensor:
                chosen = rank < free.clamp(max=count).unsqueeze(1)
                return torch.zeros(B, l, dtype=torch.bool, device=device).scatter(1, order, chosen)

            masked = mask_of(order, sum(steps[1:]))
            mask_weight = weight if settings.mask_guidance_ratio is None else (
                (settings.cfg_scale - 1) * settings.mask_guidance_ratio if guided else 0.0)
            for step in range(1, len(steps)):
                if not masked.any():  # everything forced (editing): draw the noise a sample would have used anyway
                    if not greedy:
                        noise.uniform(l, quant.config.vocab_size)
                    continue
                tokens_in = network.mask_tokens(si, previous, quant.scale_features(si, code_map(tokens)), masked)
                if mask_weight != 0:
                    logits = network.mask_logits(tokens_in.repeat(2, 1, 1), cond)
                else:
                    logits = network.mask_logits(tokens_in, cond[:B])
                last = step == len(steps) - 1
                new, key = pick(logits, mask_weight, not last)
                tokens = torch.where(masked, new, tokens)
                if not last:
                    key = key.masked_fill(~masked, float("inf"))
                    order = _reorder(order, key)  # the masked ones first, by confidence, ties in their previous order
                    masked = mask_of(order, sum(steps[step + 1 :]))
        all_indices.append(tokens)
        f_hat, next_features = quant.next_input(si, f_hat, code_map(tokens))
        if next_features is not None:
            previous = next_features
            x = network.scale_tokens(si + 1, next_features)
            if guided:
                x = x.repeat(2, 1, 1)
    return (f_hat, all_indices) if return_indices else f_hat
