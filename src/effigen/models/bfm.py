"""BFM: Blockwise Flow Matching (Park et al., NeurIPS 2025, arXiv 2510.21167; code mlvlab/Blockwise-Flow-Matching).

What the paper does. The generative trajectory t in [0, 1] (t = 1 noise, t = 0 data) is cut into K equal time
segments, segment k covering t in [1 - (k + 1) / K, 1 - k / K] (segment 0 is the noisiest). Each segment has its own
small stack of transformer "velocity blocks"; a step inside segment k runs only that stack, so a network with K x
`segment_depth` velocity blocks costs `segment_depth` blocks per step. Two additions make the small stacks work:

- Semantic Feature Guidance (SemFeat): a shared "feature alignment" trunk (`representation_blocks`, its own patch
  embedding) runs on x_t with the usual condition c = t_emb + y_emb. Its output tokens f (B, L, D) are (a) projected
  by a REPA-style MLP (`linear_projection`) and aligned to a frozen vision encoder's patch features by a cosine loss
  (the objective's job: objectives/bfm.py), and (b) concatenated per token with c into c_repre = [c, f] (B, L, 2D),
  the PER-TOKEN adaLN condition of the segment's velocity blocks and of the final layer.
- Feature Residual Approximation (FRA, the code's "FRN"): a second training stage freezes everything and trains a
  few extra blocks (`frn_blocks`) so that inside a segment [t_e, t_s]
      f(x_t, t) ~ f(x_{t_s}, t_s) + coeff * FRN(embed(x_t), c_t),     coeff = (t_s - t) / (t_s - t_e)
  (0 at the segment start, 1 at its end). The sampler then runs the full trunk once per segment and the cheap FRN
  at the segment's other steps.

Choices the code follows (official `src/model/bfm.py`, `modules.py`, `rope.py`; conversion: convert/bfm_official.py):
- Blocks: affine-free LayerNorm (eps 1e-6), attention with a fused qkv (bias), q/k RMSNorm with a gain, 2-D RoPE
  (EVA-02 interleaved pairs, rows in the first half of each head, columns in the second; no absolute positions),
  timm's Mlp with the TANH GELU, adaLN-Zero with shift/scale/gate for both sub-blocks.
- adaLN "lora": trunk blocks SiLU -> Linear(D, r) -> Linear(r, 6D) of c plus one shared global SiLU -> Linear(D, 6D)
  of c (`global_adaLN_modulation`); velocity blocks the same from c_repre (2D wide, per token) with the shared
  `global_adaLN_modulation2`; the final layer SiLU -> Linear(2D, 2D) of c_repre (shift, scale). FRN blocks use
  plain ("normal") adaLN SiLU -> Linear(D, 6D) of c, no global term. The FRN input is the trunk's patch embedding of
  x_t (`representation_x_embedder`), not the trunk's output.
- Patches are flattened by a Linear over the (c, p1, p2)-ordered patch vector (not DiT's conv / (p1, p2, c)).
- Time: the sinusoidal embedding sees t itself (`time_scale` 1; DiT scales by 1000). Null class = `num_classes`.
- The projector is part of the network (as in the official state dict), with hidden width `projector_hidden`
  (2048 hard-coded in the official code) to `projection_dim` (the teacher's width); `projection_dim = 0` builds no
  projector (a teacher-free model). `frn_depth = 0` builds no FRN (an official stage-1 model).
- Initialisation as the official `initialize_weights`: Xavier linears, normal(0.02) label table and time MLP, zero
  adaLN of the trunk and velocity blocks, the globals and the final layer, zero output linear. The official code
  leaves the FRN blocks' adaLN at Xavier; so does this one.

Deviation: the official training forward takes contiguous per-segment splits; here `forward` takes any per-sample
segment index tensor (grouped internally), which is the same computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn.attention import SelfAttention
from ..nn.embeddings import LabelEmbedder, TimestepEmbedder
from ..nn.layers import Mlp
from ..nn.norms import make_norm
from ..nn.rope import VisionRoPE2D


@dataclass
class BFMConfig:
    input_size: int = 32  # H = W of the pixel or latent grid
    patch_size: int = 4
    in_channels: int = 3
    hidden_size: int = 192
    num_heads: int = 3
    mlp_ratio: float = 4.0
    num_classes: int = 10
    segments: int = 3  # K equal time segments, each with its own velocity blocks
    segment_depth: int = 2  # velocity blocks per segment
    feature_alignment_depth: int = 3  # blocks of the shared SemFeat trunk
    frn_depth: int = 1  # blocks of the feature residual approximation network; 0 = none (stage-1 only model)
    adaln_lora_dim: int = 48  # rank of the per-block adaLN ("lora" type)
    projector_hidden: int = 2048  # the trunk projector's hidden width (official: 2048)
    projection_dim: int = 128  # the teacher's feature width; 0 = no projector (teacher-free)
    time_scale: float = 1.0  # the time embedding sees time_scale * t (official: t itself)
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}; "
                             f"pick a resolution divisible by {self.patch_size}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must give a head width "
                             "divisible by 4 (2-D RoPE)")
        for name in ("segments", "segment_depth", "feature_alignment_depth", "adaln_lora_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.frn_depth < 0 or self.projection_dim < 0 or self.projector_hidden < 1:
            raise ValueError("frn_depth and projection_dim must be >= 0 (0 = none) and projector_hidden >= 1")

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


BFM_PRESETS: dict[str, dict] = {
    # the released configuration (configs/train/BFM_XL.yaml): SD-VAE 32x32x4 latents, 6 segments x 5 blocks, a
    # 20-block trunk aligned to DINOv2-B (768), FRN of 4 blocks
    "BFM-XL/2": dict(input_size=32, in_channels=4, patch_size=2, hidden_size=1152, num_heads=16, segments=6,
                     segment_depth=5, feature_alignment_depth=20, frn_depth=4, adaln_lora_dim=288,
                     projector_hidden=2048, projection_dim=768, num_classes=1000),
    # CPU scale (next_wave.md §3): 32 px MNIST, patch 4 (64 tokens), the mnist-vit teacher's width 128. A step runs
    # 3 trunk + 2 velocity blocks (FRA: 1 + 2); 4.93M parameters, as the DiT recipes' width 256 x depth 4 (5.02M)
    "BFM-Ti/4": dict(patch_size=4, hidden_size=168, num_heads=3, segments=3, segment_depth=2,
                     feature_alignment_depth=3, frn_depth=1, adaln_lora_dim=42, projector_hidden=256,
                     projection_dim=128),
    "BFM-Test": dict(patch_size=4, hidden_size=64, num_heads=2, segments=2, segment_depth=1,
                     feature_alignment_depth=1, frn_depth=1, adaln_lora_dim=16, projector_hidden=64,
                     projection_dim=128),
}


def segment_edges(segments: int) -> torch.Tensor:
    """The K + 1 segment edges linspace(1, 0, K + 1) in float32 (the official scheduler's `sigmas`); segment k covers
    t in [edges[k + 1], edges[k]]."""
    return torch.linspace(1.0, 0.0, segments + 1)


def segment_of(t: torch.Tensor, segments: int) -> torch.Tensor:
    """The segment index of each time (B,): the segment whose noisier edge is at or above t and whose cleaner edge is
    below it. A time on an inner edge belongs to the segment it STARTS (the sampler evaluates segment k at its first
    time edges[k], never at edges[k + 1]); t = 1 is segment 0 and t = 0 the last one. Compared against the float32
    edges themselves, so the sampler's own grid points route exactly."""
    inner = segment_edges(segments)[1:-1].to(t.device)  # (K - 1,)
    return (inner[None, :] >= t.float()[:, None]).sum(dim=1)


class PatchEmbedder(nn.Module):
    """(B, L, C p p) -> (B, L, D): the official Linear patch embedding (`proj`)."""

    def __init__(self, patch_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(patch_dim, hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


class BFMBlock(nn.Module):
    """adaLN-Zero transformer block whose condition is (B, cond_dim) or per token (B, L, cond_dim). `lora_dim` > 0:
    SiLU -> Linear(cond_dim, r) -> Linear(r, 6D) (plus a global modulation passed in); 0: SiLU -> Linear(cond_dim, 6D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, cond_dim: int, lora_dim: int):
        super().__init__()
        D = hidden_size
        self.norm1 = make_norm("layernorm", D, affine=False)
        self.attn = SelfAttention(D, num_heads, qkv_bias=True, qk_norm=True, norm="rmsnorm")
        self.norm2 = make_norm("layernorm", D, affine=False)
        self.mlp = Mlp(D, int(D * mlp_ratio))
        if lora_dim > 0:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, lora_dim), nn.Linear(lora_dim, 6 * D))
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * D))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: nn.Module, global_modulation=None) -> torch.Tensor:
        modulation = self.adaLN_modulation(c)  # (B, 6D) or (B, L, 6D)
        if global_modulation is not None:
            modulation = modulation + global_modulation
        if modulation.dim() == 2:
            modulation = modulation.unsqueeze(1)  # (B, 1, 6D): the same for every token
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.to(x.dtype).chunk(6, dim=-1)
        out = self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa, rope=rope)
        x = x + gate_msa * out.to(x.dtype)  # (B, L, D)
        out = self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x + gate_mlp * out.to(x.dtype)  # (B, L, D)


class BFMFinalLayer(nn.Module):
    """LayerNorm modulated per token by c_repre (shift, scale; no gate) -> Linear(D, p p C)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = make_norm("layernorm", hidden_size, affine=False)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(2 * hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c_repre: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_repre).to(x.dtype).chunk(2, dim=-1)  # (B, L, D) each
        return self.linear(self.norm_final(x) * (1 + scale) + shift)  # (B, L, p p C)


class BFM(nn.Module):
    config_class = BFMConfig

    def __init__(self, config: BFMConfig):
        super().__init__()
        self.config = config
        D, p, C = config.hidden_size, config.patch_size, config.in_channels
        block = dict(hidden_size=D, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        self.rope = VisionRoPE2D(D // config.num_heads, config.input_size // p, config.rope_theta, persistent=False)
        # SemFeat trunk and its projector
        self.representation_x_embedder = PatchEmbedder(C * p * p, D)
        self.representation_blocks = nn.ModuleList(
            BFMBlock(**block, cond_dim=D, lora_dim=config.adaln_lora_dim) for _ in range(config.feature_alignment_depth))
        self.linear_projection = None
        if config.projection_dim > 0:
            H = config.projector_hidden
            self.linear_projection = nn.Sequential(nn.Linear(D, H), nn.SiLU(), nn.Linear(H, H), nn.SiLU(),
                                                   nn.Linear(H, config.projection_dim))
        # per-segment velocity networks, conditioned per token on c_repre = [c, trunk features]
        self.x_embedder = PatchEmbedder(C * p * p, D)
        self.velocity_blocks = nn.ModuleList(
            nn.ModuleList(BFMBlock(**block, cond_dim=2 * D, lora_dim=config.adaln_lora_dim)
                          for _ in range(config.segment_depth))
            for _ in range(config.segments))
        self.global_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.global_adaLN_modulation2 = nn.Sequential(nn.SiLU(), nn.Linear(2 * D, 6 * D))
        self.final_layer = BFMFinalLayer(D, p, C)
        # feature residual approximation (stage 2)
        self.frn_blocks = nn.ModuleList(BFMBlock(**block, cond_dim=D, lora_dim=0) for _ in range(config.frn_depth))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Every linear: Xavier-uniform weight, zero bias (patch embeddings are linears already).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Label table and timestep MLP: small normal.
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: trunk and velocity blocks, both global modulations and the final layer start at zero, so every
        # block starts as the identity; the FRN blocks keep Xavier (as the official code).
        zero = [b.adaLN_modulation[-1] for b in self.representation_blocks]
        zero += [b.adaLN_modulation[-1] for stack in self.velocity_blocks for b in stack]
        zero += [self.global_adaLN_modulation[-1], self.global_adaLN_modulation2[-1],
                 self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    # ---------------------------------------------------------------- layout
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, C p p), the patch vector ordered (c, p1, p2), tokens row-major."""
        c = self.config
        expected = (c.in_channels, c.input_size, c.input_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"BFM expects inputs of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        p, g = c.patch_size, c.input_size // c.patch_size
        x = x.reshape(x.shape[0], c.in_channels, g, p, g, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], g * g, -1)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C p p) -> (B, C, H, W)."""
        c = self.config
        p, g = c.patch_size, c.input_size // c.patch_size
        x = x.reshape(x.shape[0], g, g, c.in_channels, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(x.shape[0], c.in_channels, g * p, g * p)

    # ---------------------------------------------------------------- parts
    def condition(self, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """c = t_emb + y_emb, (B, D)."""
        return self.t_embedder(self.config.time_scale * t) + self.y_embedder(labels)

    def trunk(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The SemFeat trunk's output tokens f(x_t, t, y), (B, L, D)."""
        c = self.condition(t, labels)
        return self._trunk(self.patchify(x), c)

    def _trunk(self, patches: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        global_modulation = self.global_adaLN_modulation(c)  # (B, 6D), shared by the trunk blocks
        h = self.representation_x_embedder(patches)  # (B, L, D)
        for block in self.representation_blocks:
            h = block(h, c, self.rope, global_modulation)
        return h

    def residual_approximation(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """FRN(embed(x_t), c_t), (B, L, D): the approximated feature change across a segment."""
        return self._residual(self.patchify(x), self.condition(t, labels))

    def _residual(self, patches: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if not len(self.frn_blocks):
            raise ValueError("this BFM has no feature residual approximation network (frn_depth = 0): sample with "
                             "fra = false, or build it with frn_depth >= 1 and train the FRA stage")
        h = self.representation_x_embedder(patches)  # (B, L, D)
        for block in self.frn_blocks:
            h = block(h, c, self.rope)
        return h

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The SemFeat projector: (B, L, D) -> (B, L, projection_dim), aligned to the teacher."""
        if self.linear_projection is None:
            raise ValueError("this BFM has no projector (projection_dim = 0, a teacher-free model): set "
                             "network.projection_dim to the teacher's width to align its trunk")
        return self.linear_projection(features)

    def _velocity(self, patches: torch.Tensor, c: torch.Tensor, features: torch.Tensor, segment: int) -> torch.Tensor:
        c_repre = torch.cat([c.unsqueeze(1).expand(-1, features.shape[1], -1).to(features.dtype), features], dim=-1)
        global_modulation = self.global_adaLN_modulation2(c_repre)  # (B, L, 6D), per token
        h = self.x_embedder(patches)  # (B, L, D)
        for block in self.velocity_blocks[segment]:
            h = block(h, c_repre, self.rope, global_modulation)
        return self.final_layer(h, c_repre)  # (B, L, p p C)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, segment: int | torch.Tensor | None = None,
                start_features: torch.Tensor | None = None, coeff: torch.Tensor | float | None = None,
                return_features: bool = False, return_projection: bool = False, features_only: bool = False):
        """Velocity v(x_t, t, y) = dx_t/dt through the velocity blocks of `segment` (an int for the whole batch, a
        (B,) tensor per sample, or None: the segment of each t, `segment_of`).

        x: (B, C, H, W); t: (B,) in [0, 1], 1 = noise; labels: (B,), `num_classes` = null class. The trunk features
        come from the full trunk, or, with `start_features` (B, L, D) (the trunk's output at the segment start) and
        `coeff` ((B,) or a number: (t_start - t) / (t_start - t_end)), from the FRA: start + coeff * FRN(x_t).
        Returns the velocity (B, C, H, W), then with `return_features` the features used (B, L, D), then with
        `return_projection` their projection (B, L, projection_dim); `features_only`: the features alone (no velocity
        blocks run). Everything goes through this one forward, so a DDP-wrapped network sees every use."""
        K = self.config.segments
        if segment is None:
            segment = segment_of(t, K)
        patches = self.patchify(x)  # (B, L, C p p)
        c = self.condition(t, labels)  # (B, D)
        if start_features is None:
            features = self._trunk(patches, c)
        else:
            if coeff is None:
                raise ValueError("start_features needs coeff = (t_start - t) / (t_start - t_end)")
            coeff = torch.as_tensor(coeff, device=x.device, dtype=start_features.dtype).reshape(-1, 1, 1)
            features = start_features + coeff * self._residual(patches, c).to(start_features.dtype)
        if features_only:
            return features
        if isinstance(segment, int):
            if not 0 <= segment < K:
                raise ValueError(f"segment {segment} out of range: this BFM has segments 0..{K - 1}")
            out = self._velocity(patches, c, features, segment)
        else:
            segment = segment.to(x.device).long().reshape(-1)
            if segment.numel() != x.shape[0] or bool(((segment < 0) | (segment >= K)).any()):
                raise ValueError(f"segment must be one index in 0..{K - 1} per sample, got {segment.tolist()}")
            out = None
            for k in segment.unique().tolist():
                rows = (segment == k).nonzero().flatten()
                part = self._velocity(patches[rows], c[rows], features[rows], k)
                out = part.new_zeros(x.shape[0], *part.shape[1:]) if out is None else out
                out = out.index_copy(0, rows, part)
        velocity = self.unpatchify(out)  # (B, C, H, W)
        outputs = (velocity,) + ((features,) if return_features else ()) + \
            ((self.project(features),) if return_projection else ())
        return outputs if len(outputs) > 1 else velocity
