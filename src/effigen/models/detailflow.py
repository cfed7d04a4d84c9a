"""DetailFlow's next-detail AR model (arXiv 2505.21473; ByteFlow-AI/DetailFlow `autoregressive/models/gpt.py`):
a LlamaGen-style class-conditional GPT over the tokenizer's 1D coarse-to-fine token sequence that predicts the
first `causal_num` tokens one at a time and then `group_size` tokens per step in parallel.

What the official model does, and this class follows (it reuses effigen's LlamaGen blocks, `models.gpt`):
- the teacher-forced input of N tokens t_0..t_{N-1} is [class, t_0..t_{c-1}, q_1..q_{g-1}, t_c..t_{N-g-1}] (N positions;
  c = causal_num, g = group_size): after the causal prefix, g - 1 learned placeholder embeddings
  (`spe_tok_embeddings.special_embeddings`) pad the sequence so that the logits at position p predict t_p and a
  whole group of g tokens comes out of one forward (PAR-style parallel decoding);
- the group-causal mask (`create_group_causal_mask`) over those positions: the first c positions are strictly
  causal, later ones see their own group (position // g) and all earlier positions. It is a block-causal pattern over
  blocks [1] * c + [g] * ((N - c) / g), computed with `nn.attention.BlockMask`;
- 2-D RoPE on an (N / g) x g grid (`precompute_freqs_cis_2d_nonsquare`): sequence position s >= 1 rotates with row
  (s - 1) // g and column (s - 1) % g; the class position's table is zero (LlamaGen's quirk, kept);
- RMSNorm, bias-free fused qkv, SwiGLU, token / residual / FFN dropout, N(0, 0.02) init with a zeroed head (the
  placeholder embeddings keep PyTorch's N(0, 1) default: the official model creates them after its init).
Left out: text conditioning and grouped-query attention, as in `models.gpt`.

The sampling loop is `samplers.detailflow.sample_next_detail` (with a KV cache: the official loop re-runs the whole
prefix every step; both give the same tokens, tested); the loss, with self-correction, is `objectives.detailflow`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn.attention import BlockMask
from ..nn.rope import VisionRoPE2D
from ..nn.taps import Taps, record_taps
from ..tokenizers.detailflow import latent_blocks
from .gpt import GPT, GPTConfig


@dataclass
class DetailFlowGPTConfig(GPTConfig):
    num_tokens: int = 128  # from the tokenizer: the 1D sequence length N
    group_size: int = 8  # tokens predicted per step after the causal prefix (the tokenizer's group size)
    causal_num: int | None = None  # None: group_size (the official default)
    scales: tuple[int, ...] = ()  # unused (GPT's raster grid)

    def __post_init__(self):
        if self.causal_num is None:
            self.causal_num = self.group_size
        N, g, c = self.num_tokens, self.group_size, self.causal_num
        if g < 1 or N % g or c % g or not g <= c < N:
            raise ValueError(f"num_tokens {N}, group_size {g}, causal_num {c}: need group_size dividing both and "
                             "group_size <= causal_num < num_tokens")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 4:
            raise ValueError(f"dim {self.dim} / num_heads {self.num_heads} must give a head dimension divisible by 4")

    @property
    def grid_size(self) -> int:  # the RoPE grid's width; GPT's square tables are replaced in DetailFlowGPT
        return self.group_size


DETAILFLOW_GPT_PRESETS: dict[str, dict] = {
    # the released AR models DetailFlow-16/32/64-GPT-L (configs/ar_l.yaml): LlamaGen's GPT-L, dropouts 0.1
    "GPT-L": {"depth": 24, "dim": 1024, "num_heads": 16},
    "GPT-B": {"depth": 12, "dim": 768, "num_heads": 12},
    "GPT-XL": {"depth": 36, "dim": 1280, "num_heads": 20},
    # built-in data on a CPU: ~5.05M parameters on DetailFlow-S (512 codes, 32 tokens, 10 classes), the report's
    # target (VAR-d4); width 256 and 4 heads as GPT-S, no dropout
    "DetailFlow-GPT-S": {"depth": 6, "dim": 256, "num_heads": 4, "multiple_of": 64,
                         "token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0},
    "DetailFlow-GPT-Test": {"depth": 2, "dim": 32, "num_heads": 2, "multiple_of": 8,
                            "token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0},
}


class PlaceholderEmbeddings(nn.Module):
    """The g - 1 learned placeholder rows that stand in for a group's not-yet-known tokens."""

    def __init__(self, count: int, dim: int):
        super().__init__()
        self.special_embeddings = nn.Embedding(count, dim)

    def forward(self) -> torch.Tensor:
        return self.special_embeddings.weight  # (g - 1, D)


class DetailFlowGPT(GPT):
    config_class = DetailFlowGPTConfig

    def __init__(self, config: DetailFlowGPTConfig):
        super().__init__(config)
        N, g = config.num_tokens, config.group_size
        # rotary tables for positions 0..N: 0 = the class token (zero), s >= 1 = cell (s - 1) of an (N/g) x g grid
        grid = VisionRoPE2D(config.dim // config.num_heads, g, config.rope_base, rows=N // g)
        zero = torch.zeros(1, grid.freqs_cos.shape[1])
        self.rope_cos = torch.cat((zero, grid.freqs_cos))
        self.rope_sin = torch.cat((zero, grid.freqs_sin))
        del self.causal_mask
        self.spe_tok_embeddings = PlaceholderEmbeddings(g - 1, config.dim)

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def scales(self) -> tuple[int, ...]:
        return ()

    def attention_mask(self, length: int) -> BlockMask:
        """The group-causal pattern over the first `length` input positions (class token included)."""
        c = self.config
        return BlockMask(latent_blocks(length, c.group_size, c.causal_num), "block_causal")

    def input_embeddings(self, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """labels (B,), known tokens (B, k) -> the input sequence (B, 1 + k [+ g - 1], D): with k >= causal_num the
        placeholders follow the causal prefix, so the last g positions predict the next group."""
        c = self.config.causal_num
        x = self.token_embeddings(tokens)  # (B, k, D)
        parts = [self.class_tokens(labels), x[:, :c]]
        if tokens.shape[1] >= c:
            parts += [self.spe_tok_embeddings().unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype), x[:, c:]]
        return torch.cat(parts, dim=1)

    def forward(self, labels: torch.Tensor, tokens: torch.Tensor,
                taps: Taps | None = None) -> torch.Tensor | tuple[torch.Tensor, object]:
        """labels (B,), tokens (B, N) (or a prefix ending on a group boundary) -> logits (B, l, V) with l = the
        number of input positions; logits[:, p] predicts tokens[:, p]. Only tokens[:, :l - g] are read (the last
        group is target only), as the official `idx=z[:, :-group_size]`."""
        recorder = record_taps(taps, len(self.layers), "this GPT")
        N, g, c = self.config.num_tokens, self.config.group_size, self.config.causal_num
        l = tokens.shape[1]
        if tokens.ndim != 2 or not c + g <= l <= N or (l - c) % g:
            raise ValueError(f"tokens must be (B, l) with l in {list(range(c + g, N + 1, g))} (causal prefix {c}, "
                             f"groups of {g}), got {tuple(tokens.shape)}: is this the model's tokenizer?")
        x = self.input_embeddings(labels, tokens[:, : l - g])  # (B, l, D)
        return recorder.result(self.logits(self.trunk(x, 0, self.attention_mask(l), recorder=recorder)))
