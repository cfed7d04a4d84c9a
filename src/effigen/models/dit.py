"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, arXiv 2212.09748).

A ViT over an image or latent grid: patchify, fixed 2-D sin-cos positions, N blocks of
adaLN-Zero (the conditioning c = t_emb + y_emb regresses shift/scale/gate of both sub-blocks, zero
initialised so every block starts as the identity), and a final adaLN layer that unpatchifies.

The network is pure: `forward(x, t, labels) -> prediction`. It knows nothing of losses or sampling:
the objective decides what the output means (velocity for rectified flow; epsilon and variance for
DDPM) and the samplers integrate it. Label dropout for classifier-free guidance is done by the
objective, which passes the null class id `num_classes`.

Time: effigen's t is in [0, 1]; the sinusoidal embedding sees `t * time_scale` (default 1000) so that
the features equal those of official DiT checkpoints, which take integer DDPM steps 0..999.

Parameter names follow the official `models.py` (x_embedder.proj, t_embedder.mlp, y_embedder.embedding_table,
blocks.i.attn.qkv, ..., final_layer.linear), so official checkpoints load with no renaming.

LightningDiT (Yao et al. arXiv 2501.01423) is this backbone with options, not a copy: `norm="rmsnorm"`
(RMSNorm with a gain instead of affine-free LayerNorm, also in the final layer), `mlp="swiglu"` (hidden
int(2/3 * 4 * D), fused `w12`), `rope=True` (EVA-02 2-D RoPE on q and k, in addition to the absolute
sin-cos positions), `qk_norm`, and `adaln_shift=False` (its `wo_shift`). Parameter names follow
`models/lightningdit.py` (mlp.w12/w3, feat_rope.freqs_cos/sin, norm1.weight, final_layer.norm_final.weight).
`time_offset` + `time_scale` translate effigen's t into what a checkpoint's time embedding expects:
the embedding sees `time_offset + time_scale * t` (DiT: 0 + 1000 t; LightningDiT/SiT, which run time the
other way in [0, 1]: 1 - t).

DiT^DH (RAE, Zheng et al. arXiv 2510.11690, `src/stage2/models/DDT.py`) is this backbone with a wide, shallow DDT
head (`head_depth` > 0), again an option: the DiT blocks above form the encoder; then `head_depth` blocks of their
own width `head_hidden_size` and heads `head_num_heads` run on a fresh patch embedding of x_t (`head_embedder`, no
absolute positions; their own RoPE table `head_rope`), conditioned PER TOKEN on the encoder's output
    s = head_projector(SiLU(t_emb + h_enc))          (B, L, D_head); head_projector = Identity when widths agree
through the same adaLN-Zero block (its (B, L, k D) modulation replaces the (B, 1, k D) one), and the final layer
modulates per token from s too. With a head the global condition is RAE's c = SiLU(t_emb + y_emb) (the blocks'
adaLN applies its own SiLU on top, as the official code does). `time_embedding="fourier"` is RAE's Gaussian Fourier
time embedding (a frozen random W of 256 frequencies, features [sin 2 pi t W, cos 2 pi t W]; `t_embedder.W` in the
state dict). Official parameter names are mapped in `convert/rae_official.py` (s_embedder -> x_embedder, x_embedder
-> head_embedder, s_projector -> head_projector, blocks.{depth+i} -> head_blocks.i, enc/dec_feat_rope -> feat_rope /
head_rope).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from typing import Literal

from ..nn.attention import SelfAttention
from ..nn.embeddings import FourierTimeEmbedder, LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d_positions
from ..nn import cpu_kernels
from ..nn.layers import Linear, Mlp, SwiGLU, fused_dtype, modulate
from ..nn.norms import RMSNorm, make_norm
from ..nn.rope import VisionRoPE2D
from ..nn.taps import Features, Taps, record_taps


@dataclass
class DiTConfig:
    input_size: int = 32  # H = W of the input grid (pixels, or latent cells)
    patch_size: int = 2
    in_channels: int = 3
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 10
    learn_sigma: bool = False  # DDPM's learned variance doubles the output channels
    qk_norm: bool = False
    time_scale: float = 1000.0
    time_offset: float = 0.0
    # LightningDiT options
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    rope: bool = False
    adaln_shift: bool = True
    # any grid: inputs of any H = W divisible by patch_size; positions come from 2-D RoPE alone (tables built per grid,
    # no absolute sin-cos, which is tied to input_size). Used by LowDiff's one-network cascade (objectives/lowdiff.py)
    any_resolution: bool = False
    # guided-distillation student (post/distill.py): embed the guidance strength w and add it to the time embedding
    guidance_embed: bool = False
    guidance_scale: float = 1000.0  # the w embedding sees guidance_scale * w (diffusers' w * 1000)
    # time features: DiT's sinusoidal ones, or RAE's Gaussian Fourier features (frozen random frequencies)
    time_embedding: Literal["sinusoidal", "fourier"] = "sinusoidal"
    # DiT^DH's wide DDT head (module docstring); head_depth 0 = no head (plain DiT / LightningDiT)
    head_depth: int = 0
    head_hidden_size: int = 0  # 0 = hidden_size
    head_num_heads: int = 0  # 0 = num_heads
    # add the fixed sin-cos table to the patch tokens (DiT, LightningDiT); false: positions from RoPE alone (DDT.py's
    # use_pos_embed=False; the table stays in the state dict, unused)
    absolute_positions: bool = True

    def __post_init__(self):
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}; "
                f"pick a resolution divisible by {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.any_resolution and not self.rope:
            raise ValueError("any_resolution=True takes its positions from 2-D RoPE: set rope=True as well")
        if self.head_depth < 0:
            raise ValueError(f"head_depth must be >= 0 (0 = no DDT head), got {self.head_depth}")
        if self.head_depth:
            if self.head_width % self.head_heads:
                raise ValueError(f"head_hidden_size {self.head_width} is not divisible by head_num_heads "
                                 f"{self.head_heads}")
            if self.any_resolution or self.guidance_embed or self.learn_sigma:
                raise ValueError("the DDT head (head_depth > 0) works on one grid with a velocity output: set "
                                 "any_resolution, guidance_embed and learn_sigma to false, or head_depth=0")

    @property
    def head_width(self) -> int:
        return self.head_hidden_size or self.hidden_size

    @property
    def head_heads(self) -> int:
        return self.head_num_heads or self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels


# Official sizes (paper Table 1) plus small ones for CPU work. Input size and channels follow the data.
DIT_PRESETS: dict[str, dict] = {
    "DiT-S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "DiT-S/4": dict(depth=12, hidden_size=384, num_heads=6, patch_size=4),
    "DiT-B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "DiT-B/4": dict(depth=12, hidden_size=768, num_heads=12, patch_size=4),
    "DiT-L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "DiT-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "DiT-Ti/4": dict(depth=6, hidden_size=256, num_heads=4, patch_size=4),
    "DiT-Test": dict(depth=2, hidden_size=64, num_heads=2, patch_size=4),
}

# LightningDiT's released architecture: RMSNorm, SwiGLU, 2-D RoPE (qk-norm off), on the DiT backbone.
_LIGHTNING = dict(norm="rmsnorm", mlp="swiglu", rope=True)
DIT_PRESETS.update({
    "LightningDiT-B/1": dict(depth=12, hidden_size=768, num_heads=12, patch_size=1, **_LIGHTNING),
    "LightningDiT-B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2, **_LIGHTNING),
    "LightningDiT-L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2, **_LIGHTNING),
    "LightningDiT-XL/1": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=1, **_LIGHTNING),
    "LightningDiT-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, **_LIGHTNING),
    "LightningDiT-Ti/4": dict(depth=6, hidden_size=256, num_heads=4, patch_size=4, **_LIGHTNING),
    "LightningDiT-Test": dict(depth=2, hidden_size=64, num_heads=2, patch_size=4, **_LIGHTNING),
})

# DiT^DH (RAE): the LightningDiT backbone (with absolute positions and RoPE) plus a wide 2-block DDT head, Gaussian
# Fourier time features. XL and S are the paper's generator and autoguidance model; the small ones are for CPU work.
_DDT = dict(time_embedding="fourier", time_scale=1.0, **_LIGHTNING)
DIT_PRESETS.update({
    "DiTDH-XL": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=1, head_depth=2, head_hidden_size=2048,
                     head_num_heads=16, **_DDT),
    "DiTDH-B": dict(depth=12, hidden_size=768, num_heads=12, patch_size=1, head_depth=2, head_hidden_size=2048,
                    head_num_heads=16, **_DDT),
    "DiTDH-S": dict(depth=12, hidden_size=384, num_heads=6, patch_size=1, head_depth=2, head_hidden_size=2048,
                    head_num_heads=16, **_DDT),
    # built-in data: the 8x8x128 latent of the built-in mnist-vit teacher (5.03M parameters, the report's size); the
    # head is wider than the encoder and than the 128-dim tokens
    "DiTDH-Ti": dict(depth=4, hidden_size=192, num_heads=3, patch_size=1, head_depth=1, head_hidden_size=320,
                     head_num_heads=5, **_DDT),
    "DiTDH-Test": dict(depth=1, hidden_size=32, num_heads=2, patch_size=1, head_depth=1, head_hidden_size=48,
                       head_num_heads=2, **_DDT),
})


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig, hidden_size: int | None = None, num_heads: int | None = None):
        """`hidden_size` / `num_heads`: a DDT head block's own (default: the backbone's)."""
        super().__init__()
        D = hidden_size or config.hidden_size
        self.adaln_shift = config.adaln_shift
        self.norm1 = make_norm(config.norm, D, affine=False)
        self.attn = SelfAttention(D, num_heads or config.num_heads, qkv_bias=True, qk_norm=config.qk_norm,
                                  norm=config.norm)
        self.norm2 = make_norm(config.norm, D, affine=False)
        if config.mlp == "swiglu":
            self.mlp = SwiGLU(D, int(2 / 3 * config.mlp_ratio * D))
        else:
            self.mlp = Mlp(D, int(D * config.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(D, (6 if config.adaln_shift else 4) * D))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: nn.Module | None = None, logits_tap=None) -> torch.Tensor:
        # Speed (CPU, bf16 autocast): the small (B, 1, k*D) conditioning is cast once to the residual's dtype, so every
        # (B, L, D) element-wise op below has a single dtype (a mixed-dtype op first copies its low-precision operand),
        # and modulation and gated residual are fused multiply-adds (one pass each instead of two).
        modulation = self.adaLN_modulation(c).to(x.dtype)  # (B, k*D), or (B, L, k*D) per token in a DDT head
        modulation = modulation.unsqueeze(1) if modulation.dim() == 2 else modulation
        if self.adaln_shift:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        else:
            scale_msa, gate_msa, scale_mlp, gate_mlp = modulation.chunk(4, dim=-1)
            shift_msa = shift_mlp = None
        out = self.attn(_norm_modulate(self.norm1, x, shift_msa, scale_msa), rope=rope, logits_tap=logits_tap)
        x = _multiply_add(x, gate_msa, out.to(x.dtype))  # x + gate * attn, (B, L, D)
        out = self.mlp(_norm_modulate(self.norm2, x, shift_mlp, scale_mlp))
        return _multiply_add(x, gate_mlp, out.to(x.dtype))  # x + gate * mlp, (B, L, D)


def _norm_modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """`_modulate(norm(x), shift, scale)`. In bf16 CPU inference one pass of the C kernel `cpu_kernels.norm_modulate`
    (2.4x faster than the norm then the multiply-add at DiT-B/2's shapes); otherwise, in bf16 inference, an RMSNorm's
    gain is folded into the small (B, 1, D) factor (1 + scale) * gain, one pass over (B, L, D) fewer."""
    plain_layernorm = isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine
    if (plain_layernorm or isinstance(norm, RMSNorm)) and fused_dtype(x, norm) is not None:
        kind = "layernorm" if plain_layernorm else "rmsnorm"
        out = cpu_kernels.norm_modulate(x, shift, scale, kind, norm.eps, None if plain_layernorm else norm.weight)
        if out is not None:
            return out
    if isinstance(norm, RMSNorm):
        normalized = norm.normalize_without_gain(x)
        if normalized is not None:
            gain = (1 + scale) * norm.weight.to(scale.dtype)
            return normalized * gain if shift is None else _multiply_add(shift, normalized, gain)
    return _modulate(norm(x), shift, scale)


def _modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """`modulate` for (B, 1, D) (or per-token (B, L, D)) shift and scale, as one fused multiply-add: x * (1 + scale) + shift."""
    return x * (1 + scale) if shift is None else _multiply_add(shift, x, 1 + scale)


def _multiply_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a + b * c in one fused pass (one rounding; in bf16 on this CPU 1.4-2.1x faster than a multiply then an add, on
    one or two threads with the tuned allocator of effigen.runtime, at DiT-B/2 and VAR-d16 shapes)."""
    return torch.addcmul(a, b, c)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size, affine=False)
        self.linear = Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """c: (B, D), or (B, L, D) per token (DDT head)."""
        if c.dim() == 3:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # (B, L, D) each, no gate (as DDT)
            return self.linear(_modulate(self.norm_final(x), shift, scale))  # (B, L, p*p*C_out)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, L, p*p*C_out)


class DiT(nn.Module):
    config_class = DiTConfig

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = FourierTimeEmbedder(D) if config.time_embedding == "fourier" else TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        self.w_embedder = TimestepEmbedder(D) if config.guidance_embed else None
        grid = config.input_size // config.patch_size
        positions = torch.from_numpy(sincos_2d_positions(D, grid)).float().unsqueeze(0)
        self.register_buffer("pos_embed", positions)  # (1, L, D), fixed; kept in the state dict as in DiT
        self.feat_rope = VisionRoPE2D(D // config.num_heads, grid) if config.rope else None
        self._grid_ropes: dict[int, VisionRoPE2D] = {}  # any_resolution: RoPE tables of other grids (not saved)
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.depth)])
        out_width = D
        if config.head_depth:  # DiT^DH's DDT head (module docstring)
            Dh, heads = config.head_width, config.head_heads
            self.head_embedder = PatchEmbed(config.patch_size, config.in_channels, Dh)
            self.head_projector = nn.Linear(D, Dh) if Dh != D else nn.Identity()
            self.head_rope = VisionRoPE2D(Dh // heads, grid) if config.rope else None
            self.head_blocks = nn.ModuleList([DiTBlock(config, Dh, heads) for _ in range(config.head_depth)])
            out_width = Dh
        self.final_layer = FinalLayer(out_width, config.patch_size, config.out_channels, config.norm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Transformer layers: Xavier-uniform weights, zero biases.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Patch embedding: Xavier on the flattened conv kernel, like a linear layer.
        for embedder in (self.x_embedder, getattr(self, "head_embedder", None)):
            if embedder is not None:
                weight = embedder.proj.weight
                nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
                nn.init.zeros_(embedder.proj.bias)
        # Label table and timestep MLP: small normal.
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.w_embedder is not None:  # zero last layer: w changes nothing until trained
            nn.init.normal_(self.w_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.w_embedder.mlp[2].weight)
            nn.init.zeros_(self.w_embedder.mlp[2].bias)
        # adaLN-Zero: every block (DDT head blocks too) starts as the identity.
        for block in [*self.blocks, *getattr(self, "head_blocks", [])]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # Output layer zero: the initial prediction is 0.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        p, C = self.config.patch_size, self.config.out_channels
        grid = round(x.shape[1] ** 0.5)  # square grids (input_size // p unless any_resolution)
        x = x.reshape(x.shape[0], grid, grid, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], C, grid * p, grid * p)

    def _rope_for(self, x: torch.Tensor) -> VisionRoPE2D:
        """any_resolution: the RoPE tables of x's grid (built once per grid size)."""
        p, C = self.config.patch_size, self.config.in_channels
        if x.shape[1] != C or x.shape[2] != x.shape[3] or x.shape[2] % p:
            raise ValueError(f"this DiT takes (B, {C}, H, H) inputs with H a multiple of the patch size {p}, "
                             f"got {tuple(x.shape)}")
        grid = x.shape[2] // p
        if grid == self.config.input_size // p:
            return self.feat_rope
        if grid not in self._grid_ropes:
            head_dim = self.config.hidden_size // self.config.num_heads
            self._grid_ropes[grid] = VisionRoPE2D(head_dim, grid).to(self.feat_rope.freqs_cos.device)
        return self._grid_ropes[grid]

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: torch.Tensor | None = None,
                taps: Taps | None = None) -> torch.Tensor | tuple[torch.Tensor, Features]:
        """x: (B, C, H, W); t: (B,) in [0, 1]; labels: (B,) ints, `num_classes` = null class; guidance: (B,) the
        paper's w (cfg_scale - 1), required exactly when `guidance_embed`. With `taps` (`effigen.nn.taps`), returns
        (output, features): the (B, L, D) output tokens of the requested blocks, L = (H / p)(W / p) in raster order,
        and their (B, heads, L, L) attention logits."""
        recorder = record_taps(taps, len(self.blocks), "this DiT")
        rope = self.feat_rope
        if self.config.any_resolution:
            rope = self._rope_for(x)
            h = self.x_embedder(x)  # (B, L, D), positions from RoPE only
        else:
            expected = (self.config.in_channels, self.config.input_size, self.config.input_size)
            if tuple(x.shape[1:]) != expected:
                raise ValueError(f"DiT expects inputs of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
            h = self.x_embedder(x)  # (B, L, D)
            h = h + self.pos_embed if self.config.absolute_positions else h
        if not self.training and torch.is_autocast_enabled(h.device.type):
            # inference under autocast: the residual stream in the low-precision dtype too (as diffusers does; the fp32
            # position embedding would otherwise promote it), so norms, modulations and residual adds move half the
            # bytes; training keeps the fp32 residual stream of the official code
            h = h.to(torch.get_autocast_dtype(h.device.type))
        t_emb = self.t_embedder(self.config.time_offset + self.config.time_scale * t)  # (B, D)
        c = t_emb + self.y_embedder(labels)  # (B, D)
        if self.config.head_depth:
            return recorder.result(self._forward_ddt(x, h, t_emb, c, recorder))
        if self.w_embedder is not None:
            if guidance is None:
                raise ValueError("this DiT was built with guidance_embed=True (a guided-distillation student): pass "
                                 "guidance=w, the guidance strength (cfg_scale - 1), per sample")
            c = c + self.w_embedder(self.config.guidance_scale * guidance.expand(x.shape[0]))  # (B, D)
        elif guidance is not None:
            raise ValueError("guidance=w needs a DiT built with guidance_embed=True")
        for i, block in enumerate(self.blocks):
            h = block(h, c, rope, recorder.logits_tap(i))  # (B, L, D)
            recorder.block_output(i, h)
        return recorder.result(self.unpatchify(self.final_layer(h, c)))  # (B, C_out, H, W)

    def _forward_ddt(self, x: torch.Tensor, h: torch.Tensor, t_emb: torch.Tensor, c: torch.Tensor, recorder) -> torch.Tensor:
        """DiT^DH: encoder blocks on h with c = SiLU(t + y), then the DDT head on a fresh embedding of x, conditioned
        per token on s = head_projector(SiLU(t + h)) (module docstring). Taps index the encoder blocks."""
        c = torch.nn.functional.silu(c)  # (B, D)
        for i, block in enumerate(self.blocks):
            h = block(h, c, self.feat_rope, recorder.logits_tap(i))  # (B, L, D)
            recorder.block_output(i, h)
        s = self.head_projector(torch.nn.functional.silu(t_emb.unsqueeze(1).to(h.dtype) + h))  # (B, L, D_head)
        z = self.head_embedder(x).to(s.dtype)  # (B, L, D_head), no absolute positions
        for block in self.head_blocks:
            z = block(z, s, self.head_rope)  # (B, L, D_head)
        return self.unpatchify(self.final_layer(z, s))  # (B, C_out, H, W)
