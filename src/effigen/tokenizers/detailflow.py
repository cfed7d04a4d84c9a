"""DetailFlow's 1D coarse-to-fine tokenizer (Liu et al., "DetailFlow: 1D Coarse-to-Fine Autoregressive Image
Generation via Next-Detail Prediction", arXiv 2505.21473; code ByteFlow-AI/DetailFlow @c5f06cd).

What the paper does: a ViT encoder (SigLIP2) reads the image patches plus N learned latent query tokens; the latent
queries attend to every patch and causally to one another, so token t only summarises what tokens < t left out. A
VQ layer quantises each latent (l2-normalised codebook). A ViT decoder reads a PREFIX of the first t tokens next
to a grid of mask tokens and paints an image at a resolution that grows with t ("next-detail prediction"):
training targets are progressively degraded images, so the first tokens carry the coarse layout and later tokens
the detail. Self-correction: a token of the prefix is swapped for a random near code and the rest are re-encoded
conditioned on that noisy prefix, so later tokens learn to correct earlier mistakes (the AR model is then trained
on (noisy input, corrected target) pairs).

What this module follows from the official code (`modelling/tokenizer.py`, `modules/siglip2_vit.py`,
`detail_token.py`, `quantizers/vq.py`):
- SigLIP2 vision blocks: pre-LayerNorm (eps 1e-6), multi-head attention with biases, GELU(tanh) MLP, a final
  `post_layernorm` over the whole [patches, latents] sequence; patches enter through a linear patch embedding of
  channels-last (py, px, c) patches; the learned S x S position table is resized to the patch grid with bilinear,
  antialiased interpolation (`align_corners=False`), as SigLIP2's NaFlex does.
- Encoder attention (`causal_encoder=True`): patches see patches only; latents see every patch, the first
  `causal_num` latents are strictly causal and later ones see their own group of `group_size` and every earlier
  latent. That is a block-causal pattern over blocks [patches | 1 | 1 | ... | g | g | ...], computed with
  `nn.attention.BlockMask` (no dense mask is built).
- `quant_conv` (Linear D -> code dim), VQ with l2-normalised latents and codebook rows (nearest by squared
  distance), `post_quant_conv` (code dim -> decoder D), `refine_conv` (code dim -> encoder D) for self-correction.
- Decoder (`causal_decoder=False`): [mask_token + resized positions for every output patch,
  post_quant_conv(codes[:t]) + latent_pos_embed[:t]], full attention, `to_pixel` linear head, unpatchified
  channels-last. Its output is not clamped (the official scripts clamp when saving).
- The resolution map (`token_res_map_func`, `ResolutionDegradation`): a prefix of t tokens maps to
  R(t) = clamp(int(R - b (N - t)^p), 1, R) with b = (R - 1) / (N - 1)^p, p = `degradation_power`; the allowed
  prefix lengths are 1..causal_num and then multiples of group_size; the decoder paints R(t) rounded UP to a
  multiple of its patch size (at least one patch). Degraded targets: area down-sampling to R(t), then resizing
  (bicubic up) to the decoder resolution (`resize_imgs`).
- Self-correction triple (`encode_image` with `noise_idx`): noise at one token inside the causal prefix, else at a
  whole group; each noisy token is a uniformly chosen code among the 50 nearest; clean codes before it, the noisy
  codes feed `refine_conv` in place of the first latent queries, `refined_tokens` fill the rest, and the codes after
  the noise are re-encoded.
Not implemented: the pretrained SigLIP2 initialisation, LPIPS / DINO-discriminator losses (the trainer's perceptual
and patch-GAN terms stand in), the global-token (REPA) loss, dynamic input resolution, a causal decoder.
Parameter names are ours; `convert/detailflow_official.py` maps the official checkpoint onto them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import BlockMask, SelfAttention
from ..nn.layers import Mlp
from .base import TokenizerOutput, TokenSpace


@dataclass
class DetailFlowConfig:
    in_channels: int = 3
    resolution: int = 256  # R, the full image side (max_image_size)
    num_tokens: int = 128  # N latent tokens (num_latent_tokens)
    group_size: int = 8  # tokens the AR model predicts in parallel after the causal prefix
    causal_num: int | None = None  # strictly causal prefix; None: group_size (the official default)
    vocab_size: int = 8192  # codebook_size
    code_dim: int = 8  # codebook_embed_dim
    codebook_l2_norm: bool = True
    beta: float = 0.25  # commitment weight
    encoder_width: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    encoder_mlp: int = 3072  # SigLIP2 intermediate_size
    encoder_patch: int = 16
    encoder_positions: int = 16  # side S of the learned S x S position table (sqrt(num_patches))
    decoder_width: int = 768
    decoder_depth: int = 12
    decoder_heads: int = 12
    decoder_mlp: int = 3072
    decoder_patch: int = 16
    decoder_positions: int = 16
    layer_norm_eps: float = 1e-6
    degradation_power: float = 1.5  # p of the resolution map
    degradation_prob: float = 0.2  # share of batches trained on a prefix and its degraded target
    correction_training: bool = True  # self-correction (re-encode after a noisy token)
    correction_top_k: int = 50  # noisy tokens: a random code among this many nearest

    def __post_init__(self):
        if self.causal_num is None:
            self.causal_num = self.group_size
        N, g, c = self.num_tokens, self.group_size, self.causal_num
        if g < 1 or N % g or c % g or not g <= c <= N:
            raise ValueError(f"num_tokens {N}, group_size {g}, causal_num {c}: need group_size >= 1 dividing both, "
                             "and group_size <= causal_num <= num_tokens")
        for side in ("encoder", "decoder"):
            patch = getattr(self, f"{side}_patch")
            if self.resolution % patch:
                raise ValueError(f"resolution {self.resolution} is not a multiple of the {side} patch size {patch}")
        if self.encoder_patch > self.decoder_patch:
            raise ValueError("the encoder patch must not exceed the decoder patch (as the official code asserts)")
        if N < 2:
            raise ValueError("num_tokens must be at least 2")


# Tokenizer sizes for `effigen train --network_preset=...` (method `detailflow-tokenizer`).
_SIGLIP2_BASE = {"encoder_width": 768, "encoder_depth": 12, "encoder_heads": 12, "encoder_mlp": 3072,
                 "decoder_width": 768, "decoder_depth": 12, "decoder_heads": 12, "decoder_mlp": 3072}
_RELEASED = {"resolution": 256, "group_size": 8, "vocab_size": 8192, "code_dim": 8, "encoder_patch": 16,
             "decoder_patch": 16, "encoder_positions": 16, "decoder_positions": 16}
DETAILFLOW_PRESETS: dict[str, dict] = {
    # the released tokenizers DetailFlow-16/32/64 (configs/vq_8k_siglip_b_res_p02_pw15_enc.yaml): encoder = the first
    # 12 layers of SigLIP2-so400m (1152 wide, 16 heads, MLP 4304, 16x16 positions), decoder = a SigLIP2-base-sized ViT
    **{f"DetailFlow-{n // 8}": {**_RELEASED, **_SIGLIP2_BASE, "num_tokens": n, "encoder_width": 1152,
                                "encoder_heads": 16, "encoder_mlp": 4304} for n in (128, 256, 512)},
    # built-in data at 32 px: 4 px patches (8x8 grid), 32 (or 64) tokens in groups of 4, 512 codes of dim 8; 3-layer
    # ViTs of width 128 (1.24M parameters: 1.5x the steps per minute of width 192 / depth 4 on one core)
    **{name: {"resolution": 32, "num_tokens": n, "group_size": 4, "vocab_size": 512, "code_dim": 8,
              "encoder_width": 128, "encoder_depth": 3, "encoder_heads": 4, "encoder_mlp": 512, "encoder_patch": 4,
              "encoder_positions": 8, "decoder_width": 128, "decoder_depth": 3, "decoder_heads": 4, "decoder_mlp": 512,
              "decoder_patch": 4, "decoder_positions": 8}
       for name, n in (("DetailFlow-S", 32), ("DetailFlow-S-64", 64))},
    "DetailFlow-Test": {"resolution": 16, "num_tokens": 8, "group_size": 2, "vocab_size": 16, "code_dim": 4,
                        "encoder_width": 16, "encoder_depth": 1, "encoder_heads": 2, "encoder_mlp": 32,
                        "encoder_patch": 4, "encoder_positions": 4, "decoder_width": 16, "decoder_depth": 1,
                        "decoder_heads": 2, "decoder_mlp": 32, "decoder_patch": 4, "decoder_positions": 4},
}


# ---------------------------------------------------------------------------------------------- resolution map
def token_resolution(t: int, num_tokens: int, resolution: int, power: float) -> int:
    """R(t) = clamp(int(R - b (N - t)^p), 1, R), b = (R - 1) / (N - 1)^p: the side a prefix of t tokens describes."""
    b = (resolution - 1) / math.pow(num_tokens - 1, power)
    return max(1, min(resolution, int(resolution - b * math.pow(num_tokens - t, power))))


def round_up_to_patch(side: int, patch: int) -> int:
    """The official `custom_smart_resize` for a square side: up to a multiple of the patch, at least one patch."""
    return max(patch, math.ceil(side / patch) * patch)


def allowed_prefixes(num_tokens: int, group_size: int, causal_num: int) -> list[int]:
    """Prefix lengths a decoder may read: every length inside the causal prefix, then whole groups."""
    return list(range(1, causal_num + 1)) + list(range(causal_num + group_size, num_tokens + 1, group_size))


def latent_blocks(num_latents: int, group_size: int, causal_num: int) -> tuple[int, ...]:
    """Block sizes of the group-causal pattern over latents: causal_num single tokens, then groups."""
    if num_latents <= causal_num:
        return (1,) * num_latents
    if (num_latents - causal_num) % group_size:
        raise ValueError(f"{num_latents} tokens do not end on a group boundary (causal prefix {causal_num}, "
                         f"groups of {group_size})")
    return (1,) * causal_num + (group_size,) * ((num_latents - causal_num) // group_size)


def resize_images(images: torch.Tensor, side: int) -> torch.Tensor:
    """Area down-sampling, bicubic up-sampling (the official `resize_imgs`)."""
    H = images.shape[-1]
    if H == side:
        return images
    if H > side:
        return F.interpolate(images, size=(side, side), mode="area")
    return F.interpolate(images, size=(side, side), mode="bicubic", align_corners=False)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C), patches in raster order, each (py, px, c) channels last."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(x: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(B, h*h, p*p*C) channels-last patches -> (B, C, h*p, h*p)."""
    B, L, _ = x.shape
    h = math.isqrt(L)
    x = x.reshape(B, h, h, patch, patch, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, h * patch, h * patch)


# ---------------------------------------------------------------------------------------------- network pieces
class SiglipBlock(nn.Module):
    """SigLIP2 encoder layer: x + attn(LN(x)); x + MLP(LN(x)) (GELU tanh), attention with an optional mask."""

    def __init__(self, dim: int, num_heads: int, mlp: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp)

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)  # (B, L, D)
        return x + self.mlp(self.norm2(x))


class LatentViT(nn.Module):
    """The part the encoder and decoder share: resized position table, latent positions, blocks, final norm."""

    def __init__(self, width: int, depth: int, heads: int, mlp: int, positions: int, num_tokens: int, eps: float):
        super().__init__()
        self.positions = positions
        self.pos_embed = nn.Parameter(torch.randn(positions * positions, width) * 0.02)  # (S*S, D)
        self.latent_pos_embed = nn.Parameter(torch.randn(1, num_tokens, width) * 0.02)
        self.blocks = nn.ModuleList([SiglipBlock(width, heads, mlp, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=eps)

    @property
    def last_layer(self) -> torch.Tensor:  # the decoder's pixel head (the GAN's adaptive weight balances it)
        return self.to_pixel.weight

    def grid_positions(self, side: int) -> torch.Tensor:
        """The S x S table resized to side x side (bilinear, antialiased), (side*side, D)."""
        S, D = self.positions, self.pos_embed.shape[1]
        table = self.pos_embed.reshape(S, S, D).permute(2, 0, 1).unsqueeze(0)
        table = F.interpolate(table, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        return table.reshape(D, side * side).T

    def run(self, patches: torch.Tensor, latents: torch.Tensor, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """patches (B, P, D) (positions added), latents (B, n, D) -> both after the blocks and the final norm."""
        P = patches.shape[1]
        x = torch.cat((patches, latents + self.latent_pos_embed[:, : latents.shape[1]]), dim=1)  # (B, P + n, D)
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        return x[:, :P], x[:, P:]


class Quantizer(nn.Module):
    """Single-codebook VQ; with `l2_norm`, latents and rows are l2-normalised before the nearest-row search."""

    def __init__(self, vocab_size: int, dim: int, l2_norm: bool, beta: float):
        super().__init__()
        self.l2_norm, self.beta = l2_norm, beta
        self.embedding = nn.Embedding(vocab_size, dim)
        self.register_buffer("hit_ema", torch.zeros(vocab_size), persistent=False)  # code usage (logs, restarts)
        self.restart_pool: torch.Tensor | None = None  # latents of the last training batch
        with torch.no_grad():  # the official init: U(-1/V, 1/V), then normalised
            self.embedding.weight.uniform_(-1.0 / vocab_size, 1.0 / vocab_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1) if self.l2_norm else z

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, n, C) already prepared -> squared distances (B, n, V)."""
        e = self.codebook()
        return z.square().sum(-1, keepdim=True) + e.square().sum(-1) - 2 * torch.einsum("bnc,vc->bnv", z, e)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Ids (B, n) of the nearest codes to raw latents z (B, n, C)."""
        return self.distances(self.prepare(z.float())).argmin(-1)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.codebook())

    def forward(self, z: torch.Tensor, loss_from: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, n, C) -> (straight-through codes, VQ loss over positions >= loss_from, indices (B, n))."""
        z = self.prepare(z.float())
        indices = self.distances(z).argmin(-1)
        z_q = self.embed(indices)
        zs, qs = z[:, loss_from:], z_q[:, loss_from:]
        if zs.numel():  # codebook term + beta * commitment
            loss = (qs - zs.detach()).square().mean() + self.beta * (qs.detach() - zs).square().mean()
        else:
            loss = z.sum() * 0
        if self.training:
            with torch.no_grad():
                hits = indices.flatten().bincount(minlength=self.hit_ema.numel()).float()
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(hits)
                self.restart_pool = z.reshape(-1, z.shape[-1]).detach()  # restart candidates: every latent
                if self.hit_ema.sum() > 0:  # a short memory (about 10 batches), so unused codes restart soon
                    self.hit_ema.mul_(0.9).add_(hits, alpha=0.1)
                else:
                    self.hit_ema.copy_(hits)
        return z + (z_q - z).detach(), loss, indices

    @torch.no_grad()
    def restart_dead_codes(self, threshold: float, generator: torch.Generator) -> int:
        """Move codes whose hit EMA is below `threshold` onto latents of the last training batch (gathered over
        processes, so every process restarts alike). Ours, not the official code's: without it the codebook of a
        from-scratch tokenizer collapses to a handful of codes on MNIST. Returns how many moved."""
        pool = self.restart_pool
        if pool is None:
            return 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [torch.empty_like(pool) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, pool)
            pool = torch.cat(gathered)
        dead = (self.hit_ema < threshold).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        choice = torch.randint(pool.shape[0], (dead.numel(),), generator=generator).to(pool.device)
        self.embedding.weight[dead] = pool[choice].to(self.embedding.weight.dtype)
        self.hit_ema[dead] = self.hit_ema.mean()
        return int(dead.numel())

    def usage(self) -> list[float]:
        """% of codes whose hit EMA exceeds 8% of a uniform share (one entry: a single codebook)."""
        total = float(self.hit_ema.sum())
        return [100.0 * float((self.hit_ema > total / self.hit_ema.numel() * 0.08).float().mean()) if total else 0.0]


# ---------------------------------------------------------------------------------------------- the tokenizer
class DetailFlowTokenizer(TokenizerOutput, nn.Module):
    """Encoder (ViT + N latent queries) -> quant_conv -> VQ -> post_quant_conv -> prefix decoder (ViT).

    Tokenizer contract: `indices_from_images(images) -> (B, N)`, `latent_from_indices(ids) -> codes (B, n, C)`,
    `encode(images) -> codes (B, N, C)`, `decode(codes) -> images` in [-1, 1] (a prefix of n codes decodes at the
    resolution the map gives n; `decode_prefix` names the prefix explicitly)."""

    config_class = DetailFlowConfig

    @classmethod
    def output_of(cls, config: DetailFlowConfig) -> TokenSpace:
        return TokenSpace(config.vocab_size, "sequence", config.resolution, length=config.num_tokens,
                          embed_dim=config.code_dim, image_channels=config.in_channels, group_size=config.group_size,
                          causal_num=config.causal_num)

    def __init__(self, config: DetailFlowConfig):
        super().__init__()
        self.config = config
        c, N = config, config.num_tokens
        self.encoder = LatentViT(c.encoder_width, c.encoder_depth, c.encoder_heads, c.encoder_mlp, c.encoder_positions,
                                 N, c.layer_norm_eps)
        self.encoder.patch_embed = nn.Linear(c.in_channels * c.encoder_patch**2, c.encoder_width)
        self.encoder.latent_tokens = nn.Parameter(torch.randn(1, N, c.encoder_width) * 0.02)
        self.encoder.refined_tokens = nn.Parameter(torch.randn(1, N, c.encoder_width) * 0.02)
        self.decoder = LatentViT(c.decoder_width, c.decoder_depth, c.decoder_heads, c.decoder_mlp, c.decoder_positions,
                                 N, c.layer_norm_eps)
        self.decoder.mask_token = nn.Parameter(torch.randn(1, 1, c.decoder_width) * 0.02)
        self.decoder.to_pixel = nn.Linear(c.decoder_width, c.in_channels * c.decoder_patch**2)
        self.quant_conv = nn.Linear(c.encoder_width, c.code_dim)
        self.post_quant_conv = nn.Linear(c.code_dim, c.decoder_width)
        self.refine_conv = nn.Linear(c.code_dim, c.encoder_width)
        self.quantize = Quantizer(c.vocab_size, c.code_dim, c.codebook_l2_norm, c.beta)

    # ------------------------------------------------------------------ the resolution map
    @cached_property
    def prefixes(self) -> list[int]:
        c = self.config
        return allowed_prefixes(c.num_tokens, c.group_size, c.causal_num)

    def check_prefix(self, t: int) -> int:
        if t not in self.prefixes:
            raise ValueError(f"this DetailFlow tokenizer (num_tokens={self.config.num_tokens}, causal prefix "
                             f"{self.config.causal_num}, groups of {self.config.group_size}) decodes prefixes of "
                             f"{self.prefixes} tokens; {t} is not one of them")
        return t

    def target_resolution(self, t: int) -> int:
        """R(t), the side of the degraded target a prefix of t tokens is trained to reconstruct."""
        c = self.config
        return token_resolution(self.check_prefix(t), c.num_tokens, c.resolution, c.degradation_power)

    def decoder_resolution(self, t: int) -> int:
        """The side the decoder paints for t tokens: R(t) rounded up to the decoder's patch size."""
        return round_up_to_patch(self.target_resolution(t), self.config.decoder_patch)

    def best_prefix(self) -> dict[int, int]:
        """Decoder resolution -> the prefix whose R(t) is closest to it (ties: the longer prefix)."""
        best, gap = {}, {}
        for t in self.prefixes:
            r, d = self.target_resolution(t), self.decoder_resolution(t)
            if abs(r - d) <= gap.get(d, self.config.resolution):
                best[d], gap[d] = t, abs(r - d)
        return best

    def degraded_target(self, images: torch.Tensor, t: int) -> torch.Tensor:
        """The image a t-token prefix should decode to: area-down to R(t), then resized to the decoder side."""
        return resize_images(resize_images(images, self.target_resolution(t)), self.decoder_resolution(t))

    # ------------------------------------------------------------------ encoder
    def check_images(self, images: torch.Tensor) -> None:
        c, r = self.config.in_channels, self.config.resolution
        if images.ndim != 4 or images.shape[1] != c or tuple(images.shape[-2:]) != (r, r):
            raise ValueError(f"expected images (B, {c}, {r}, {r}) in [-1, 1], got {tuple(images.shape)}")

    def latents(self, images: torch.Tensor, prefix_codes: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, C, R, R) -> pre-quantisation latents (B, N, code_dim). `prefix_codes` (B, k, code_dim): the
        self-correction re-encode, refine_conv(prefix_codes) replacing the first k latent queries."""
        self.check_images(images)
        c, enc = self.config, self.encoder
        patches = enc.patch_embed(patchify(images, c.encoder_patch))  # (B, P, D)
        patches = patches + enc.grid_positions(c.resolution // c.encoder_patch)
        B, N = images.shape[0], c.num_tokens
        if prefix_codes is None:
            queries = enc.latent_tokens.expand(B, -1, -1)
        else:
            k = prefix_codes.shape[1]
            queries = torch.cat((self.refine_conv(prefix_codes), enc.refined_tokens[:, k:N].expand(B, -1, -1)), dim=1)
        mask = BlockMask((patches.shape[1],) + latent_blocks(N, c.group_size, c.causal_num), "block_causal")
        _, z = enc.run(patches, queries, mask)
        return self.quant_conv(z)  # (B, N, code_dim)

    @torch.no_grad()
    def indices_from_images(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N) int64, coarse to fine."""
        return self.quantize.nearest(self.latents(images))

    def latent_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """ids (B, n) -> code vectors (B, n, code_dim) (normalised codebook rows)."""
        if indices.ndim != 2 or indices.shape[1] > self.config.num_tokens:
            raise ValueError(f"expected token ids (B, n) with n <= {self.config.num_tokens}, "
                             f"got {tuple(indices.shape)}")
        return self.quantize.embed(indices)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.latent_from_indices(self.indices_from_images(images))

    # ------------------------------------------------------------------ self-correction
    def noise_span(self, noise_idx: int) -> int:
        """Where the noise ends: one token inside the causal prefix, else the whole group starting at noise_idx."""
        c = self.config
        if noise_idx < c.causal_num:
            return noise_idx + 1
        if (noise_idx - c.causal_num) % c.group_size or noise_idx + c.group_size > c.num_tokens:
            raise ValueError(f"noise_idx {noise_idx} must be < causal_num {c.causal_num} or start a group")
        return noise_idx + c.group_size

    def near_codes(self, latents: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """A code among the `correction_top_k` nearest to each latent, picked by `choice` (uniform [0, 1), same
        shape as latents[..., 0])."""
        d = self.quantize.distances(self.quantize.prepare(latents.float()))
        k = min(self.config.correction_top_k, d.shape[-1])
        nearest = d.topk(k, dim=-1, largest=False).indices  # (B, n, k)
        pick = (choice * k).long().clamp_(max=k - 1)
        return nearest.gather(-1, pick.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def correction_codes(self, images: torch.Tensor, noise_idx: int, choice: torch.Tensor | None = None,
                         noisy: torch.Tensor | None = None) -> torch.Tensor:
        """The self-correction triple (B, N, 3): [clean, noisy input, corrected target] ids. The noisy ids at
        noise_idx..noise_end-1 are `noisy` (B, span) if given, else random near codes (`choice` uniform numbers,
        (B, span)); the corrected target keeps the clean ids before noise_end and re-encodes the rest."""
        end = self.noise_span(noise_idx)
        z = self.latents(images)
        clean = self.quantize.nearest(z)
        if noisy is None:
            if choice is None:
                choice = torch.rand(z.shape[0], end - noise_idx)
            noisy = self.near_codes(z[:, noise_idx:end], choice.to(z.device))
        noisy_input = torch.cat((clean[:, :noise_idx], noisy), dim=1)  # (B, end)
        refined = self.latents(images, self.quantize.embed(noisy_input))
        again = self.quantize.nearest(refined)
        noisy_stream = torch.cat((noisy_input, again[:, end:]), dim=1)
        corrected = torch.cat((clean[:, :end], again[:, end:]), dim=1)
        return torch.stack((clean, noisy_stream, corrected), dim=-1)  # (B, N, 3)

    # ------------------------------------------------------------------ decoder
    def decode_codes(self, codes: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
        """codes (B, t, code_dim) of an allowed prefix -> images (B, C, side, side), NOT clamped; side defaults to
        the prefix's decoder resolution."""
        c, dec = self.config, self.decoder
        t = self.check_prefix(codes.shape[1])
        side = self.decoder_resolution(t) if resolution is None else resolution
        if side % c.decoder_patch:
            raise ValueError(f"resolution {side} is not a multiple of the decoder patch size {c.decoder_patch}")
        grid = side // c.decoder_patch
        B = codes.shape[0]
        patches = dec.mask_token.expand(B, grid * grid, -1) + dec.grid_positions(grid)  # (B, P, D)
        out, _ = dec.run(patches, self.post_quant_conv(codes))
        return unpatchify(dec.to_pixel(out), c.decoder_patch, c.in_channels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """codes (B, n, code_dim) -> images in [-1, 1] at the prefix's resolution (the full one for all N codes)."""
        return self.decode_codes(latents.float()).clamp(-1, 1)

    @torch.no_grad()
    def decode_prefix(self, indices: torch.Tensor, t: int, resolution: int | None = None) -> torch.Tensor:
        """The first t ids of (B, N) decoded at their own resolution (or `resolution`), not clamped."""
        self.check_prefix(t)
        return self.decode_codes(self.latent_from_indices(indices[:, :t]), resolution)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    # ------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor, t: int | None = None, noise_idx: int | None = None,
                choice: torch.Tensor | None = None,
                quantize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass (the official `VQModel.forward`): encode all N tokens, decode the first t (default N) at
        the decoder resolution of t. With `noise_idx`, the batch doubles: [clean reconstructions; reconstructions
        from the noisy prefix + re-encoded rest], and the VQ loss mixes the clean and the re-encoded terms by their
        token counts. `quantize=False` (ours: a continuous warm-up) decodes the normalised latents themselves and
        keeps only the codebook term of the VQ loss, so the encoder learns image-dependent latents before the codes
        take over (from scratch, they otherwise collapse onto one code). Returns (reconstructions (unclamped), VQ loss,
        indices (B, N) of the clean pass)."""
        N = self.config.num_tokens
        t = N if t is None else self.check_prefix(t)
        z = self.latents(images)
        codes, vq_loss, indices = self.quantize(z)
        if not quantize:
            if noise_idx is not None:
                raise ValueError("self-correction needs the codes: no noise_idx with quantize=False")
            continuous = self.quantize.prepare(z.float())
            vq_loss = (self.quantize.embed(indices) - continuous.detach()).square().mean()
            unused = (self.refine_conv.weight, self.refine_conv.bias, self.encoder.refined_tokens)
            vq_loss = vq_loss + sum(p.sum() for p in unused) * 0.0
            return self.decode_codes(continuous[:, :t]), vq_loss, indices
        if noise_idx is not None:
            end = self.noise_span(noise_idx)
            if choice is None:
                choice = torch.rand(z.shape[0], end - noise_idx)
            noisy = self.near_codes(z[:, noise_idx:end].detach(), choice.to(z.device))
            prefix = torch.cat((codes[:, :noise_idx], self.quantize.embed(noisy)), dim=1).detach()
            refined, refined_loss, _ = self.quantize(self.latents(images, prefix), loss_from=end)
            total = 2 * N - end
            vq_loss = vq_loss * N / total + refined_loss * (N - end) / total
            codes = torch.cat((codes, torch.cat((prefix, refined[:, end:]), dim=1)), dim=0)
        elif self.training:  # the re-encoder sits out this batch: keep it in the graph (DDP wants every gradient)
            unused = (self.refine_conv.weight, self.refine_conv.bias, self.encoder.refined_tokens)
            vq_loss = vq_loss + sum(p.sum() for p in unused) * 0.0
        return self.decode_codes(codes[:, :t]), vq_loss, indices
