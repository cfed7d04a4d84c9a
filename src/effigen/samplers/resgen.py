"""ResGen sampling: masked decoding over the position x depth grid of residual-VQ tokens (Kim et al., arXiv
2412.10208, the sampling procedure of Sec. 3 as transcribed in next_wave.md §2; no public code).

Start with every cell (position i, depth j) masked (or, for editing, the kept region's cells known). With N the
number of cells to generate and gamma(r) = cos(pi r / 2) (MaskGIT's schedule), step t = 1..T:

1. run the network on the known coarse prefixes (their summed code vectors and counts), classifier-free guidance
   on the mixture: logits and means as uncond + s (cond - uncond), scales from the conditional row;
2. at every position with masked depths, draw a component (Gumbel-max over the top-k/top-p filtered logits /
   temperature) and z = mu_k + temperature sigma_k eps: the sum of the masked depths' codes;
3. re-quantise z greedily against the codebooks of the masked depths (`ResidualQuantizer.requantize`), giving a
   token for every masked cell;
4. confidence of a position = log p(z) / Cvae under the (guided) mixture; a cell's score is its position's confidence
   plus Gumbel noise of scale `gumbel_temperature` x (1 - t / T) (annealed to 0); within a position the scores are
   sorted and handed out coarse to fine, so the kept cells always extend the coarse prefix;
5. keep the highest-scoring masked cells so that floor(N gamma(t / T)) stay masked (at least one cell revealed per
   step, all at t = T), and re-mask the rest (their tokens are drawn again at the next step).

T (`num_steps`) does not depend on the depth D: a deeper tokenizer costs no extra network passes.

Our choices where the paper is not specific: gamma; guidance on logits and means; the confidence (the mixture
log-density of the sampled z, one value per position); Gumbel scale and its linear annealing; top-k/top-p act on
the mixture components.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import check_range
from .tokens import SampleNoise, check_token_sampling, draw_tokens, filter_logits


@dataclass
class ResGenSamplerConfig:
    num_steps: int = 16  # network passes (x2 with guidance), independent of the RVQ depth
    cfg_scale: float = 2.0  # uncond + s (cond - uncond) on mixture logits and means; 1 = off
    top_k: int = 0  # over mixture components; 0 disables
    top_p: float = 0.0
    temperature: float = 1.0  # divides the mixture logits, multiplies the Gaussian noise
    gumbel_temperature: float = 1.0  # scale of the confidence noise at the first step, annealed linearly to 0

    def __post_init__(self):
        check_token_sampling(self.cfg_scale, self.top_k, self.top_p, self.temperature)
        check_range("num_steps", self.num_steps, 1, meaning="network passes per image")
        check_range("gumbel_temperature", self.gumbel_temperature, 0, meaning="0 keeps the most confident tokens")


@dataclass
class ResidualEditSpec:
    """Known tokens and where to keep them: indices (B, L, D), keep (B, L) bool (True = the position's tokens stay)."""

    indices: torch.Tensor
    keep: torch.Tensor


def masking_schedule(ratio: torch.Tensor) -> torch.Tensor:
    """gamma(r) = cos(pi r / 2): the fraction of cells masked at progress r in [0, 1] (1 at r = 0, 0 at r = 1)."""
    return torch.cos(math.pi / 2 * ratio)


def mixture_log_density(mixture, z: torch.Tensor) -> torch.Tensor:
    """Per-component log pi_k + log N(z; mu_k, sigma_k^2 I): mixture fields (..., K[, C]), z (..., C) -> (..., K)."""
    logits, means, log_std = mixture
    C = z.shape[-1]
    squared = ((z.unsqueeze(-2) - means) ** 2).sum(-1)  # (..., K)
    log_normal = -0.5 * squared * torch.exp(-2 * log_std) - C * log_std - 0.5 * C * math.log(2 * math.pi)
    return torch.log_softmax(logits, dim=-1) + log_normal


def evaluations(settings: ResGenSamplerConfig) -> int:
    return settings.num_steps * (2 if settings.cfg_scale != 1 else 1)


def prefix_scores(scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Reassign each position's cell scores (B, L, D) coarse to fine: the masked depths kept..D-1 get the position's
    masked-cell scores in descending order, known depths -inf. So any top-n selection extends coarse prefixes."""
    D = scores.shape[-1]
    depth = torch.arange(D, device=scores.device)
    masked = depth >= kept.unsqueeze(-1)  # (B, L, D)
    ordered = scores.masked_fill(~masked, float("-inf")).sort(dim=-1, descending=True, stable=True).values
    source = (depth - kept.unsqueeze(-1)).clamp(min=0)
    return ordered.gather(-1, source).masked_fill(~masked, float("-inf"))


@torch.no_grad()
def sample_resgen(network, tokenizer, labels: torch.Tensor, settings: ResGenSamplerConfig,
                  generator: torch.Generator | None = None, edit: ResidualEditSpec | None = None,
                  return_indices: bool = False):
    """labels (B,) -> f_hat (B, Cvae, side, side) (and the tokens (B, L, D) when `return_indices`)."""
    quant = tokenizer.quantize
    D, side = quant.depth, tokenizer.config.side
    if network.rvq_depth != D:
        raise ValueError(f"the generator predicts {network.rvq_depth} depths per position but the tokenizer was "
                         f"trained for depth {D}: use the tokenizer the generator was trained with")
    B, L, device = labels.shape[0], side * side, labels.device
    tokens = torch.zeros(B, L, D, dtype=torch.long, device=device)
    kept = torch.zeros(B, L, dtype=torch.long, device=device)
    if edit is not None:
        keep = edit.keep.to(device).expand(B, L)
        tokens = torch.where(keep.unsqueeze(-1), edit.indices.to(device).expand(B, L, D), tokens)
        kept = torch.where(keep, torch.full_like(kept, D), kept)
    total = (D - kept).sum(1)  # (B,) cells to generate
    guided = settings.cfg_scale != 1
    cond_labels = torch.cat((labels, torch.full_like(labels, network.null_class))) if guided else labels
    noise = SampleNoise(generator, B, device)
    depth = torch.arange(D, device=device)
    T = settings.num_steps
    for t in range(T):
        if bool((kept == D).all()):
            break
        known = depth < kept.unsqueeze(-1)  # (B, L, D)
        known_sum = (quant.embed(tokens).float() * known.unsqueeze(-1)).sum(-2)  # (B, L, Cvae)
        mixture = network(cond_labels, known_sum.repeat(2, 1, 1) if guided else known_sum,
                          kept.repeat(2, 1) if guided else kept)
        logits, means, log_std = (m.float() for m in mixture)
        if guided:
            s = settings.cfg_scale
            logits = logits[B:] + s * (logits[:B] - logits[B:])
            means = means[B:] + s * (means[:B] - means[B:])
            log_std = log_std[:B]
        filtered = filter_logits(logits, settings.top_k, settings.top_p)
        component = draw_tokens(filtered, noise, settings.top_k == 1, settings.temperature)  # (B, L)
        pick = component[..., None, None].expand(B, L, 1, means.shape[-1])
        mean = means.gather(2, pick).squeeze(2)  # (B, L, Cvae)
        sigma = log_std.gather(2, component.unsqueeze(-1)).exp()  # (B, L, 1)
        z = mean + settings.temperature * sigma * noise.normal(L, means.shape[-1])
        drawn, _ = quant.requantize(z.reshape(B * L, -1), kept.reshape(-1))
        drawn = drawn.view(B, L, D)
        confidence = torch.logsumexp(mixture_log_density((filtered.clamp(min=-1e9), means, log_std), z), -1)
        confidence = confidence / means.shape[-1]  # (B, L) nats per dimension
        masked_now = (D - kept).sum(1)  # (B,)
        remain = torch.floor(total * masking_schedule(torch.tensor((t + 1) / T))).long()
        remain = torch.minimum(remain, (masked_now - 1).clamp(min=0)) if t < T - 1 else torch.zeros_like(remain)
        reveal_count = masked_now - remain  # (B,)
        anneal = settings.gumbel_temperature * (1 - (t + 1) / T)
        scores = confidence.unsqueeze(-1).expand(B, L, D) + anneal * noise.gumbel(L, D)
        scores = prefix_scores(scores, kept).flatten(1)  # (B, L*D)
        rank = torch.argsort(torch.argsort(scores, dim=1, descending=True, stable=True), dim=1)
        reveal = ((rank < reveal_count.unsqueeze(1)) & torch.isfinite(scores)).view(B, L, D)
        tokens = torch.where(reveal, drawn, tokens)
        kept = kept + reveal.sum(-1)
    f_hat = quant.latent_from_indices(tokens, side)
    return (f_hat, tokens) if return_indices else f_hat
