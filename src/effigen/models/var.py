"""VAR: Visual Autoregressive Modeling, next-scale prediction (Tian et al., arXiv 2404.02905).

The image is a pyramid of token maps r_1..r_K (side lengths `scales`, from `tokenizers.msvq`). One transformer
predicts every token of scale k at once, conditioned on the class and on all coarser scales:
p(r_1..r_K) = prod_k p(r_k | r_<k, class). Its input for scale k is the tokenizer's accumulated latent f_hat
after scales 1..k-1, area-downsampled to side s_k (`word_embed` of those C-dim vectors); the first scale's input
is the class embedding (the start token) plus `pos_start`. Attention is block-causal: a token sees its own scale
and all coarser ones (computed block by block, `effigen.nn.attention.BlockMask`, no L x L mask). Every token gets
a learned absolute position (`pos_1LC`) and a level embedding per scale.

Blocks follow the official `AdaLNSelfAttn`: LayerNorm without affine, modulated by the class embedding through
adaLN (6 vectors: 2 gates, 2 scales, 2 shifts; per block, or one shared projection + per-block offsets
`ada_gss` with `shared_aln`), attention with a fused `mat_qkv` and separate q/v biases, and (`attn_l2_norm`)
l2-normalised q and k with a learned per-head scale exp(min(s, log 100)) initialised to 4 and softmax scale 1;
a GELU(tanh) MLP. A final adaLN (`head_nm`) and a linear head give logits over the codebook.

The depth dial: width = 64 x depth, heads = depth (`embed_dim=0`, `num_heads=0` resolve to those), presets
VAR-d16/d20/d24/d30 (256 px) and VAR-d36 (512 px, shared adaLN). Parameter names are the official ones, so the
converter (`effigen.convert.var_official`) only drops three constant buffers.

The network only maps inputs to logits; the next-scale loop with its KV cache, guidance and sampling lives in
`effigen.samplers.next_scale`, and the loss (cross-entropy over all scales, label dropout) in
`effigen.objectives.next_scale`. The null class id is `num_classes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import BlockMask, LayerKVCache, attention, attention_logits  # LayerKVCache re-exported
from ..nn import cpu_kernels
from ..nn.layers import DropPath, Linear, Mlp, fused_dtype, fused_linear
from ..nn.taps import NO_TAPS, Features, TapRecorder, Taps, record_taps
from ..tokenizers.msvq import VAR_SCALES


@dataclass
class VARConfig:
    depth: int = 16
    embed_dim: int = 0  # 0 -> 64 * depth
    num_heads: int = 0  # 0 -> depth
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    vocab_size: int = 4096
    latent_channels: int = 32  # the tokenizer's code dimension (Cvae)
    scales: tuple[int, ...] = VAR_SCALES[256]
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    drop_path_rate: float = 0.0  # official: 0.1 * depth / 24
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-3  # README: 1e-3 for d16/d20, 1e-4 d24, 1e-5 d30
    init_head: float = 0.02

    def __post_init__(self):
        self.scales = tuple(int(s) for s in self.scales)
        if self.embed_dim == 0:
            self.embed_dim = 64 * self.depth
        if self.num_heads == 0:
            self.num_heads = self.depth
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def num_tokens(self) -> int:
        return sum(s * s for s in self.scales)


VAR_PRESETS: dict[str, dict] = {
    # official sizes (256 px: 680 tokens; d36 at 512 px with shared adaLN); drop path 0.1 * depth / 24
    "VAR-d16": {"depth": 16, "drop_path_rate": 0.1 * 16 / 24, "init_adaln_gamma": 1e-3},
    "VAR-d20": {"depth": 20, "drop_path_rate": 0.1 * 20 / 24, "init_adaln_gamma": 1e-3},
    "VAR-d24": {"depth": 24, "drop_path_rate": 0.1, "init_adaln_gamma": 1e-4},
    "VAR-d30": {"depth": 30, "drop_path_rate": 0.1 * 30 / 24, "init_adaln_gamma": 1e-5},
    "VAR-d36": {"depth": 36, "drop_path_rate": 0.15, "shared_aln": True, "scales": VAR_SCALES[512], "init_adaln_gamma": 5e-6},
    # small ones for built-in data on a CPU
    "VAR-d4": {"depth": 4},
    "VAR-d6": {"depth": 6},
    "VAR-Test": {"depth": 2, "embed_dim": 32, "num_heads": 2},
}


def block_causal_mask(scales: tuple[int, ...], device=None) -> torch.Tensor:
    """(L, L) boolean, True where query's scale >= key's scale (the dense reference of `scale_blocks(..., "block_causal")`)."""
    levels = torch.cat([torch.full((s * s,), i) for i, s in enumerate(scales)]).to(device)
    return levels[:, None] >= levels[None, :]


def scale_blocks(scales: tuple[int, ...], pattern: str) -> BlockMask:
    """The block-sparse attention pattern over a scale schedule's token maps (one block of s^2 tokens per scale)."""
    return BlockMask(tuple(s * s for s in scales), pattern)


@torch.no_grad()
def init_next_scale_weights(model: nn.Module, config: VARConfig, blocks, heads, init_std: float) -> None:
    """The official `init_weights` of VAR (and HMAR's transformers): every Linear/Embedding of `model` trunc-normal
    with init_std = sqrt(1 / 3C) (biases 0), the position embeddings too; each (head_nm, head) pair: head x init_head,
    its adaLN x init_adaln; each block: residual projections / sqrt(2 depth), adaLN weights x init_adaln and their
    gates x init_adaln_gamma."""
    C = config.embed_dim
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=init_std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=init_std)
    for p in (model.pos_start, model.pos_1LC):
        nn.init.trunc_normal_(p, std=init_std)
    for head_nm, head in heads:
        head.weight.mul_(config.init_head)
        head.bias.zero_()
        head_nm.ada_lin[-1].weight.mul_(config.init_adaln)
        head_nm.ada_lin[-1].bias.zero_()
    for block in blocks:
        block.attn.proj.weight.div_(math.sqrt(2 * config.depth))
        block.ffn.fc2.weight.div_(math.sqrt(2 * config.depth))
        if config.shared_aln:
            block.ada_gss[:, :, 2:].mul_(config.init_adaln)
            block.ada_gss[:, :, :2].mul_(config.init_adaln_gamma)
        else:
            block.ada_lin[-1].weight[2 * C :].mul_(config.init_adaln)
            block.ada_lin[-1].weight[: 2 * C].mul_(config.init_adaln_gamma)
            block.ada_lin[-1].bias.zero_()


class VARAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.l2_norm = l2_norm
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: LayerKVCache | None = None,
                logits_tap=None) -> torch.Tensor:
        """`logits_tap`: a callback given this layer's `attention_logits` over its keys (cached ones too), or None."""
        B, L, D = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        dtype = fused_dtype(x, self)
        if dtype is not None:  # bf16 CPU inference: the weight held in bf16, the bias in the GEMM's epilogue
            qkv = fused_linear(x, self.mat_qkv, dtype, bias=bias)
        else:
            qkv = F.linear(x, self.mat_qkv.weight, bias)
        qkv = qkv.view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_dim)
        normalized = None
        if self.l2_norm and dtype is not None:  # bf16 CPU inference: q and k normalised (and q scaled) in one pass
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            normalized = cpu_kernels.l2norm_qk(qkv, scale_mul)
        if normalized is not None:
            q, k = normalized[0], normalized[1]
            scale = 1.0
        elif self.l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            if q.dtype == torch.float32:  # the official arithmetic: normalize, then scale
                q = F.normalize(q, dim=-1) * scale_mul
                k = F.normalize(k, dim=-1)
            else:  # bf16/fp16 inference: one multiply by a (B, heads, L, 1) factor computed in fp32, q and k stay in
                # their dtype (F.normalize then the fp32 scale would take 4 passes and promote q to fp32 and back)
                q = q * (scale_mul / _l2_norm(q)).to(q.dtype)
                k = k * (1.0 / _l2_norm(k)).to(k.dtype)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(self.head_dim)
        if cache is not None:
            k, v = cache.append(k, v)
        q, k, v = q.to(v.dtype), k.to(v.dtype), v
        if logits_tap is not None:
            logits_tap(attention_logits(q, k, scale))  # (B, heads, L, L_keys)
        out = attention(q, k, v, mask, scale=scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


def _l2_norm(x: torch.Tensor) -> torch.Tensor:
    """max(||x||_2, 1e-12) over the last dim, in fp32, (..., 1) (F.normalize's denominator)."""
    # the reduction accumulates in fp32 inside the kernel and rounds only its result to x's dtype: 5x faster on
    # VAR-d16's bf16 q/k views than `dtype=torch.float32` or `x.float()`, which materialise an fp32 copy first
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).float().clamp_min(1e-12)


def inference_dtype(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype when `module` runs inference under autocast, else x unchanged. Sampling then keeps the
    residual stream in bf16 (norm statistics still accumulate in fp32 inside the kernels), so norms, modulations and
    residual adds move half the bytes and no linear layer re-casts its input; training keeps the official fp32 stream."""
    if module.training or not torch.is_autocast_enabled(x.device.type) or x.dtype != torch.float32:
        return x
    return x.to(torch.get_autocast_dtype(x.device.type))


class AdaLNSelfAttn(nn.Module):
    def __init__(self, config: VARConfig, drop_path: float):
        super().__init__()
        C = config.embed_dim
        self.attn = VARAttention(C, config.num_heads, config.attn_l2_norm)
        self.ffn = Mlp(C, round(C * config.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=config.norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path)
        self.shared_aln = config.shared_aln
        if config.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), Linear(C, 6 * C))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask=None, cache: LayerKVCache | None = None,
                logits_tap=None) -> torch.Tensor:
        C = x.shape[-1]
        x = inference_dtype(self, x)
        if self.shared_aln:
            ada = self.ada_gss + cond  # cond: (B, 1, 6, C) from the shared projection
        else:
            ada = self.ada_lin(cond).view(-1, 1, 6, C)
        ada = ada.to(x.dtype)  # every (B, L, C) op below in one dtype
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
        if x.dtype != torch.float32 and not self.training:
            # low-precision inference: modulation and gated residual as fused multiply-adds (one pass each instead of
            # two, one rounding; 1.4-2x faster in bf16 on a CPU); fp32 keeps the official arithmetic below
            x = torch.addcmul(x, self.attn(self._norm_modulate(x, shift1, scale1), mask, cache, logits_tap), gamma1)
            return torch.addcmul(x, self.ffn(self._norm_modulate(x, shift2, scale2)), gamma2)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x) * (1 + scale1) + shift1, mask, cache, logits_tap) * gamma1)
        x = x + self.drop_path(self.ffn(self.ln_wo_grad(x) * (1 + scale2) + shift2) * gamma2)
        return x

    def _norm_modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Low-precision inference's `ln_wo_grad(x) * (1 + scale) + shift`: on a CPU in bf16 one pass of the C kernel
        `cpu_kernels.norm_modulate`, else the norm and one fused multiply-add."""
        if fused_dtype(x, self) is not None:
            out = cpu_kernels.norm_modulate(x, shift, scale, "layernorm", self.ln_wo_grad.eps)
            if out is not None:
                return out
        return torch.addcmul(shift, self.ln_wo_grad(x), 1 + scale)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), Linear(C, 2 * C))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return self.ln_wo_grad(x) * (1 + scale) + shift


class SharedAdaLin(Linear):
    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


class ScalePyramidInputs:
    """The class, level and position inputs shared by next-scale networks (VAR, HMAR): the class embedding as the
    condition and start token, and the learned level + position embedding of each scale's tokens
    (`add_pyramid_inputs` registers them)."""

    config: VARConfig

    def add_pyramid_inputs(self, config: VARConfig) -> None:
        """Registers, in the official order (which fixes the seeded initialisation), `class_emb` (the last row is the
        null class), `pos_start`, `pos_1LC`, `lvl_embed` and `shared_ada_lin`, plus the constants `first_l`,
        `begin_ends` (each scale's token range) and the `lvl_1L` buffer (each token's scale)."""
        C, scales = config.embed_dim, config.scales
        self.first_l = scales[0] ** 2
        self.begin_ends = []
        start = 0
        for s in scales:
            self.begin_ends.append((start, start + s * s))
            start += s * s
        self.class_emb = nn.Embedding(config.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, start, C))
        self.lvl_embed = nn.Embedding(len(scales), C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if config.shared_aln else nn.Identity()
        levels = torch.cat([torch.full((s * s,), i) for i, s in enumerate(scales)]).view(1, start)
        self.register_buffer("lvl_1L", levels, persistent=False)

    @property
    def scales(self) -> tuple[int, ...]:
        return self.config.scales

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def class_condition(self, labels: torch.Tensor) -> torch.Tensor:
        return self.class_emb(labels)

    def level_position(self, si: int) -> torch.Tensor:
        b, e = self.begin_ends[si]
        return self.lvl_embed(self.lvl_1L[:, b:e]) + self.pos_1LC[:, b:e]

    def first_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """The first scale's input: start token (class embedding) + pos_start + level/position."""
        B = cond.shape[0]
        return cond.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start + self.level_position(0)

    def check_teacher_input(self, name: str, tensor: torch.Tensor) -> None:
        """A teacher-forced input must hold the Cvae-dim features of every token after the first scale."""
        L = self.pos_1LC.shape[1]
        if tensor.shape[1:] != (L - self.first_l, self.config.latent_channels):
            raise ValueError(f"{name} must be (B, {L - self.first_l}, {self.config.latent_channels}), got "
                             f"{tuple(tensor.shape)}: is the tokenizer's scale schedule {self.scales}?")


class VAR(ScalePyramidInputs, nn.Module):
    config_class = VARConfig

    def __init__(self, config: VARConfig):
        super().__init__()
        self.config = config
        C = config.embed_dim
        self.word_embed = nn.Linear(config.latent_channels, C)
        self.add_pyramid_inputs(config)
        rates = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        self.blocks = nn.ModuleList([AdaLNSelfAttn(config, rates[i]) for i in range(config.depth)])
        self.head_nm = AdaLNBeforeHead(C, config.norm_eps)
        self.head = Linear(C, config.vocab_size)
        # block-causal attention, computed block by block (effigen.nn.attention.BlockMask): no L x L mask
        self.attention_blocks = scale_blocks(config.scales, "block_causal")
        self.init_weights(math.sqrt(1 / C / 3))

    def init_weights(self, init_std: float) -> None:
        """The official `init_weights` (`init_next_scale_weights`)."""
        init_next_scale_weights(self, self.config, self.blocks, [(self.head_nm, self.head)], init_std)

    # ------------------------------------------------------------------ pieces the sampler uses
    def scale_tokens(self, si: int, features: torch.Tensor) -> torch.Tensor:
        """Input of scale si >= 1 from the tokenizer's downsampled f_hat (B, s_si^2, Cvae)."""
        return self.word_embed(features.float()) + self.level_position(si)

    def new_cache(self) -> list[LayerKVCache]:
        return [LayerKVCache(self.config.num_tokens) for _ in self.blocks]  # preallocated for the whole pyramid

    def trunk(self, x: torch.Tensor, cond: torch.Tensor, mask=None, cache: list[LayerKVCache] | None = None,
              recorder: TapRecorder = NO_TAPS) -> torch.Tensor:
        ada = self.shared_ada_lin(cond)
        for i, block in enumerate(self.blocks):
            x = block(x, ada, mask, None if cache is None else cache[i], recorder.logits_tap(i))
            recorder.block_output(i, x)
        return x

    def logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond)).float()

    # ------------------------------------------------------------------ teacher-forced pass
    def forward(self, labels: torch.Tensor, teacher_input: torch.Tensor,
                taps: Taps | None = None) -> torch.Tensor | tuple[torch.Tensor, Features]:
        """labels (B,) (null class = num_classes), teacher_input (B, L - s_1^2, Cvae) -> logits (B, L, V). With `taps`
        (`effigen.nn.taps`), returns (logits, features): the (B, L, D) output tokens of the requested blocks (scales
        concatenated coarse to fine) and their (B, heads, L, L) attention logits (block-causal mask not applied)."""
        recorder = record_taps(taps, len(self.blocks), "this VAR")
        self.check_teacher_input("teacher input", teacher_input)
        cond = self.class_condition(labels)
        B = labels.shape[0]
        sos = cond.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start
        x = torch.cat((sos, self.word_embed(teacher_input.float())), dim=1)
        x = x + self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        h = self.trunk(x, cond, self.attention_blocks, recorder=recorder)
        return recorder.result(self.logits(h, cond))
