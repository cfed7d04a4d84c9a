"""GPT: a LlamaGen-style class-conditional decoder over a single-scale VQ token grid (raster-scan next-token
prediction; Sun et al., "Autoregressive Model Beats Diffusion", arXiv 2406.06525, FoundationVision/LlamaGen).

The image is one h x w map of VQ token ids (a `MultiScaleVQ` with a single scale, `scales=(h,)`), read in raster
order t_0..t_{L-1}, L = h * w: p(t | class) = prod_i p(t_i | class, t_<i). The input sequence is
[class token, t_0, .., t_{L-2}] and the logits at position i predict t_i (LlamaGen's c2i training: `idx=z[:, :-1]`,
`targets=z`), so one teacher-forced pass under a causal mask gives all L predictions.

What follows LlamaGen's `autoregressive/models/gpt.py` (commit ce98ec4):
- the class token is a row of `cls_embedding.embedding_table` (num_classes + 1 rows; the last is the null class
  of classifier-free guidance; effigen's `LabelEmbedder`), one position (`cls_token_num=1`);
- token ids embed with `tok_embeddings`; blocks are pre-RMSNorm (`attention_norm`, `ffn_norm`, eps 1e-5) with a fused,
  bias-free `attention.wqkv` / `attention.wo` and a bias-free SwiGLU `feed_forward` w2(silu(w1 x) * w3 x) whose hidden
  size is int(2/3 * 4 dim) rounded up to `multiple_of`; a final `norm` and a bias-free linear head `output`;
- 2-D RoPE over the token grid (not 1-D): the first half of each head's channels rotate with the token's row, the
  second half with its column, adjacent channel pairs together at frequencies base^(-2i / (head_dim / 2)), i.e.
  `precompute_freqs_cis_2d`, which is exactly effigen's `nn.rope.VisionRoPE2D` table (reused here). Why 2-D: it is
  LlamaGen's choice for c2i, and the grid neighbours above a token (w positions back in raster order) then sit at a
  row distance of 1 instead of a 1-D distance of w. An input token t_j carries its own grid position j. As in
  LlamaGen, the class position's rotary table is zero (cos = sin = 0), so its query and key vanish: every query
  scores the class token 0, a fixed-logit attention sink that carries the class through its value;
- token dropout on the input embeddings, residual and FFN dropout (0.1 each in LlamaGen; 0 in the small presets here,
  as VAR-d4 has no drop path), optional drop path; init N(0, 0.02) for linear and embedding weights, head zeroed.
Left out: grouped-query attention (`n_kv_head`), text conditioning, attention dropout.

Parameter names are LlamaGen's (`tok_embeddings`, `cls_embedding.embedding_table`, `layers.N.attention.wqkv/wo`,
`layers.N.feed_forward.w1/w2/w3`, `layers.N.attention_norm/ffn_norm`, `norm`, `output`); the rotary tables are
non-persistent buffers, as LlamaGen's `freqs_cis` is not in its state dict.

The network maps inputs to logits and exposes the pieces of the KV-cached loop (`class_tokens`, `token_embeddings`,
`trunk(x, start, mask, cache)`, `logits`, `new_cache`, `null_class`, `num_tokens`); the loop itself is
`effigen.samplers.next_token.sample_next_token`, the loss `effigen.objectives.next_token`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import LayerKVCache, attention, attention_logits
from ..nn.embeddings import LabelEmbedder
from ..nn.layers import DropPath
from ..nn.norms import RMSNorm
from ..nn.rope import VisionRoPE2D, rotate_pairs
from ..nn.taps import NO_TAPS, Features, TapRecorder, Taps, record_taps


@dataclass
class GPTConfig:
    depth: int = 12  # LlamaGen n_layer
    dim: int = 768
    num_heads: int = 12  # head_dim = dim / num_heads must be divisible by 4 (2-D RoPE)
    multiple_of: int = 256  # SwiGLU hidden size int(2/3 * 4 dim) rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    initializer_range: float = 0.02
    token_dropout: float = 0.1  # LlamaGen token_dropout_p
    resid_dropout: float = 0.1  # resid_dropout_p (after attention.wo)
    ffn_dropout: float = 0.1  # ffn_dropout_p (after feed_forward.w2)
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    vocab_size: int = 16384  # from the tokenizer
    scales: tuple[int, ...] = (16,)  # from the tokenizer: one scale, the side of the token grid

    def __post_init__(self):
        self.scales = tuple(int(s) for s in self.scales)
        if len(self.scales) != 1:
            raise ValueError(f"GPT (raster-scan AR) models a single token grid, but the tokenizer has {len(self.scales)} "
                             f"scales {self.scales}; train a single-scale VQ tokenizer (scales=[h], e.g. the mnist-vq "
                             "preset) or use method var for multi-scale tokens")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if (self.dim // self.num_heads) % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got dim / num_heads = "
                             f"{self.dim // self.num_heads}")

    @property
    def grid_size(self) -> int:
        return self.scales[0]

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of


GPT_PRESETS: dict[str, dict] = {
    # LlamaGen's class-conditional sizes (16x16 or 24x24 tokens of a 16384-code VQ; dropouts 0.1)
    "GPT-B": {"depth": 12, "dim": 768, "num_heads": 12},  # 111M
    "GPT-L": {"depth": 24, "dim": 1024, "num_heads": 16},  # 343M
    "GPT-XL": {"depth": 36, "dim": 1280, "num_heads": 20},  # 775M
    "GPT-XXL": {"depth": 48, "dim": 1536, "num_heads": 24},  # 1.4B
    # built-in data on a CPU: 5.09M parameters on the mnist-vq tokenizer (512 codes, 8x8 grid, 10 classes), within 1%
    # of VAR-d4 on mnist-msvq (5.05M); width 256 and 4 heads of 64 as VAR-d4, depth 6 where VAR spends its
    # parameters on adaLN; no dropout, as VAR-d4 has no drop path
    "GPT-S": {"depth": 6, "dim": 256, "num_heads": 4, "multiple_of": 64,
              "token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0},
    "GPT-Test": {"depth": 2, "dim": 32, "num_heads": 2, "multiple_of": 8,
                 "token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0},
}


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, l, head_dim) rotated by tables (l, head_dim), in fp32, cast back (LlamaGen's `apply_rotary_emb`)."""
    xf = x.float()
    return (xf * cos + rotate_pairs(xf) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.dim // config.num_heads
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerKVCache | None = None, logits_tap=None) -> torch.Tensor:
        """`logits_tap`: a callback given this layer's `attention_logits` over its keys (cached ones too), or None."""
        B, l, D = x.shape
        q, k, v = self.wqkv(x).view(B, l, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        if logits_tap is not None:
            logits_tap(attention_logits(q, k))  # (B, heads, l, L_keys)
        out = attention(q.to(v.dtype), k.to(v.dtype), v, mask)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, l, D)))


class FeedForward(nn.Module):
    """LlamaGen's SwiGLU, w2(silu(w1 x) * w3 x), bias-free and unfused (effigen's `nn.layers.SwiGLU` is the
    LightningDiT layout: fused `w12`, biases)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.ffn_hidden
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig, drop_path: float):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None,
                cache: LayerKVCache | None = None, logits_tap=None) -> torch.Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), cos, sin, mask, cache, logits_tap))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


class GPT(nn.Module):
    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        D, L = config.dim, config.num_tokens
        self.cls_embedding = LabelEmbedder(config.num_classes, D)  # the last row is the null class
        self.tok_embeddings = nn.Embedding(config.vocab_size, D)
        self.tok_dropout = nn.Dropout(config.token_dropout)
        rates = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        self.layers = nn.ModuleList([TransformerBlock(config, rates[i]) for i in range(config.depth)])
        self.norm = RMSNorm(D, eps=config.norm_eps)
        self.output = nn.Linear(D, config.vocab_size, bias=False)
        # rotary tables for positions 0..L: 0 = the class token (zero, as LlamaGen), 1 + j = grid position j (raster)
        grid = VisionRoPE2D(D // config.num_heads, config.grid_size, config.rope_base)
        zero = torch.zeros(1, grid.freqs_cos.shape[1])
        self.register_buffer("rope_cos", torch.cat((zero, grid.freqs_cos)), persistent=False)
        self.register_buffer("rope_sin", torch.cat((zero, grid.freqs_sin)), persistent=False)
        self.register_buffer("causal_mask", torch.ones(L, L, dtype=torch.bool).tril(), persistent=False)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """LlamaGen's: N(0, initializer_range) for linear and embedding weights, the output head zeroed."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.config.initializer_range)
        nn.init.zeros_(self.output.weight)

    @property
    def scales(self) -> tuple[int, ...]:
        return self.config.scales

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # ------------------------------------------------------------------ pieces the sampler uses
    def class_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) (null class = num_classes) -> the first input position, (B, 1, D)."""
        return self.cls_embedding(labels).unsqueeze(1)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, l) -> (B, l, D)."""
        return self.tok_embeddings(ids)

    def new_cache(self) -> list[LayerKVCache]:
        return [LayerKVCache(self.rope_cos.shape[0]) for _ in self.layers]  # preallocated: 1 + num_tokens positions

    def trunk(self, x: torch.Tensor, start: int = 0, mask: torch.Tensor | None = None,
              cache: list[LayerKVCache] | None = None, recorder: TapRecorder = NO_TAPS) -> torch.Tensor:
        """Input embeddings x (B, l, D) at sequence positions start..start+l-1 (0 = class token) -> hidden states.
        With a cache, x attends to every cached position and to itself (a single new position needs no mask)."""
        end = start + x.shape[1]
        if end > self.rope_cos.shape[0]:
            raise ValueError(f"positions {start}..{end - 1} exceed the sequence of 1 + {self.num_tokens} positions")
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        h = self.tok_dropout(x)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, None if cache is None else cache[i], recorder.logits_tap(i))
            recorder.block_output(i, h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h)).float()

    # ------------------------------------------------------------------ teacher-forced pass
    def forward(self, labels: torch.Tensor, tokens: torch.Tensor,
                taps: Taps | None = None) -> torch.Tensor | tuple[torch.Tensor, Features]:
        """labels (B,), tokens (B, l) raster-order ids, l <= L -> logits (B, l, V); logits[:, i] predicts tokens[:, i]
        from the class and tokens[:, :i] (the last token is only a target). With `taps` (`effigen.nn.taps`), returns
        (logits, features): the (B, l, D) output tokens of the requested layers (position 0 is the class token) and
        their (B, heads, l, l) attention logits (causal mask not applied)."""
        recorder = record_taps(taps, len(self.layers), "this GPT")
        B, l = tokens.shape
        if not 1 <= l <= self.num_tokens:
            raise ValueError(f"tokens must be (B, l) with 1 <= l <= {self.num_tokens} (a {self.config.grid_size}x"
                             f"{self.config.grid_size} grid), got {tuple(tokens.shape)}: is this the model's tokenizer?")
        x = torch.cat((self.class_tokens(labels), self.token_embeddings(tokens[:, :-1])), dim=1)
        return recorder.result(self.logits(self.trunk(x, 0, self.causal_mask[:l, :l], recorder=recorder)))
