"""The vision transformer behind every ViT teacher: DINOv2's architecture (Oquab et al., "DINOv2: Learning Robust
Visual Features without Supervision", arXiv 2304.07193; registers: Darcet et al., "Vision Transformers Need
Registers", arXiv 2309.16588), written for effigen, and `ViTTeacher`, the `Teacher` around it.

Architecture (facebookresearch/dinov2 `DinoVisionTransformer`, inference path):

    tokens = [cls, patches] + interpolated position table;  registers inserted after cls (they get no position)
    block:   x = x + ls1 * attn(norm1(x));   x = x + ls2 * ffn(norm2(x))     (LayerNorm eps 1e-6, layer scale ls*)
    ffn:     fc1 - GELU (exact) - fc2, or SwiGLU w3(silu(x W1) * x W2) with W1, W2 fused as `w12` (ViT-g)
    output:  final LayerNorm; x_norm_patchtokens = normed tokens without cls and registers

Parameter names are the official state dict's (`cls_token`, `pos_embed`, `register_tokens`, `mask_token`,
`patch_embed.proj`, `blocks.<i>.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1|w12, mlp.fc2|w3, ls2.gamma}`,
`norm`), so a released `dinov2_vit*14[_reg4]_pretrain.pth` loads without renaming (`teachers/dinov2.py` maps the
transformers layout onto it).

Position interpolation (`position_table`) is the official `interpolate_pos_encoding`: the table is used as is for its
own square grid, else its patch part is resized in float32 with `F.interpolate(mode="bicubic")`, either to an explicit
`size` (`interpolate_offset == 0`, the *_reg hub models, with `antialias=True`) or by `scale_factor = (side + offset) /
M` (the historical 0.1 "kludge" of the non-register hub models, `antialias=False`), which moves the sampling grid, so
both settings are part of the config. Non-square grids work the same way (sizes are (height, width)).

Deviations: no stochastic depth, dropout, masking or nested-tensor paths (teachers only run inference; `mask_token`
is kept so state dicts round-trip); attention runs through effigen's one backend (`nn/attention.py`, SDPA by default,
as the official fallback without xFormers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import SelfAttention
from ..nn.embeddings import PatchEmbed
from ..nn.layers import SwiGLU
from ..nn.taps import Taps, record_taps
from .base import Teacher, TeacherError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FFN_KINDS = ("mlp", "swiglu")
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # MLP activation -> nn.GELU(approximate=...)


@dataclass
class ViTConfig:
    """Every hyperparameter of a `VisionTransformer` (DINOv2 hub values in `teachers/dinov2.py`)."""

    image_size: int = 224  # the position table covers (image_size // patch_size)^2 patches
    patch_size: int = 14
    in_channels: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn: str = "mlp"  # "mlp" (fc1-GELU-fc2) or "swiglu" (w12 / w3)
    ffn_hidden_dim: int = 3072  # mlp: int(D * mlp_ratio); swiglu: (int(D * mlp_ratio * 2/3) + 7) // 8 * 8
    activation: str = "gelu"  # the mlp's GELU: "gelu" (exact, erf) or "gelu_tanh"
    qkv_bias: bool = True
    layer_scale: bool = True  # ls1 / ls2 per-channel gammas (DINOv2 init 1.0, hub init_values)
    layer_scale_init: float = 1.0
    num_register_tokens: int = 0
    layer_norm_eps: float = 1e-6
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1

    def __post_init__(self):
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ViTConfig.ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ViTConfig.activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def table_grid(self) -> int:
        """Side of the stored position table (37 for the hub's 518 px at patch 14)."""
        return self.image_size // self.patch_size


def swiglu_hidden_dim(embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """DINOv2's `SwiGLUFFNFused` width: two thirds of the MLP's, rounded up to a multiple of 8 (4096 for ViT-g)."""
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class Mlp(nn.Module):
    """fc1 - GELU - fc2 (official `Mlp` names)."""

    def __init__(self, dim: int, hidden_dim: int, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with layer scale (official `Block` names)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        D = config.embed_dim
        self.norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.attn = SelfAttention(D, config.num_heads, qkv_bias=config.qkv_bias)
        self.ls1 = LayerScale(D, config.layer_scale_init) if config.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        if config.ffn == "swiglu":
            self.mlp = SwiGLU(D, config.ffn_hidden_dim)
        else:
            self.mlp = Mlp(D, config.ffn_hidden_dim, ACTIVATIONS[config.activation])
        self.ls2 = LayerScale(D, config.layer_scale_init) if config.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, logits_tap=None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), logits_tap=logits_tap))  # (B, L, D)
        return x + self.ls2(self.mlp(self.norm2(x)))  # (B, L, D)


class VisionTransformer(nn.Module):
    """DINOv2's ViT (see the module docstring). `forward(x)` returns the last block's tokens before the final norm,
    (B, 1 + R + h*w, D) in the order cls, registers, patches (row-major); with `taps` it returns `(tokens, features)`
    like every effigen transformer (`nn/taps.py`)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        D, M = config.embed_dim, config.table_grid
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channels, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + M * M, D))
        self.register_tokens = (nn.Parameter(torch.zeros(1, config.num_register_tokens, D))
                                if config.num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, D))  # unused at inference; kept so state dicts round-trip
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # the official init: timm's truncated normal for linears, near-zero cls / register tokens
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def num_prefix_tokens(self) -> int:
        """cls + registers: the tokens before the patches."""
        return 1 + self.config.num_register_tokens

    def grid_of(self, x: torch.Tensor) -> tuple[int, int]:
        H, W = x.shape[-2:]
        p = self.config.patch_size
        if H % p or W % p:
            raise TeacherError(f"a ViT with patch {p} needs image sides that are multiples of {p}, got {H}x{W}")
        return H // p, W // p

    def position_table(self, height: int, width: int) -> torch.Tensor:
        """(1, 1 + height*width, D): the cls position and the patch table for a height x width token grid, exactly
        as the official `interpolate_pos_encoding` (module docstring)."""
        M, table = self.config.table_grid, self.pos_embed
        if (height, width) == (M, M):
            return table
        D = table.shape[-1]
        patches = table[:, 1:].float().reshape(1, M, M, D).permute(0, 3, 1, 2)  # (1, D, M, M)
        offset = self.config.interpolate_offset
        if offset:  # the historical kludge: the scale factor, not the size, places the samples
            kwargs = {"scale_factor": ((height + offset) / M, (width + offset) / M)}
        else:
            kwargs = {"size": (height, width)}
        patches = F.interpolate(patches, mode="bicubic", antialias=self.config.interpolate_antialias, **kwargs)
        if tuple(patches.shape[-2:]) != (height, width):
            raise TeacherError(f"position interpolation gave a {tuple(patches.shape[-2:])} grid, not {(height, width)}")
        patches = patches.permute(0, 2, 3, 1).reshape(1, height * width, D)
        return torch.cat((table[:, :1].float(), patches), dim=1).to(table.dtype)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, 1 + R + h*w, D) block inputs."""
        h, w = self.grid_of(x)
        tokens = self.patch_embed(x)  # (B, h*w, D)
        tokens = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)  # (B, 1 + h*w, D)
        tokens = tokens + self.position_table(h, w)
        if self.register_tokens is not None:  # registers go after cls, with no position
            tokens = torch.cat((tokens[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), tokens[:, 1:]), dim=1)
        return tokens

    def forward(self, x: torch.Tensor, taps: Taps | None = None, stop_after: int | None = None):
        """Tokens after the last block (or after block `stop_after`, to save the later blocks), before the final
        norm; `taps` as in `nn/taps.py` (block outputs, pre-softmax attention logits over all tokens)."""
        recorder = record_taps(taps, len(self.blocks), "the ViT")
        tokens = self.prepare_tokens(x)
        last = len(self.blocks) - 1 if stop_after is None else stop_after
        for index, block in enumerate(self.blocks[: last + 1]):
            tokens = block(tokens, logits_tap=recorder.logits_tap(index))  # (B, L, D)
            recorder.block_output(index, tokens)
        return recorder.result(tokens)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The official `forward_features`: normed cls, register and patch tokens, and the pre-norm tokens."""
        prenorm = self(x)
        normed = self.norm(prenorm)
        R = self.config.num_register_tokens
        return {"x_norm_clstoken": normed[:, 0], "x_norm_regtokens": normed[:, 1: R + 1],
                "x_norm_patchtokens": normed[:, R + 1:], "x_prenorm": prenorm}

    def get_intermediate_layers(self, x: torch.Tensor, n: int | list[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True):
        """The official `get_intermediate_layers`: the outputs of the last `n` blocks or of the listed 0-based
        blocks (in block order), final-normed unless `norm=False`, cls and registers dropped, optionally reshaped
        to (B, D, h, w) and paired with their cls token."""
        depth = len(self.blocks)
        indices = list(range(depth - n, depth)) if isinstance(n, int) else sorted(set(int(i) for i in n))
        _, features = self(x, taps=Taps(blocks=indices), stop_after=max(indices))
        outputs = [features.blocks[i] for i in indices]
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, self.num_prefix_tokens:] for out in outputs]
        if reshape:
            h, w = self.grid_of(x)
            outputs = [out.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        return tuple(zip(outputs, class_tokens)) if return_class_token else tuple(outputs)

    def hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """transformers' `output_hidden_states`: [block inputs, output of block 0, ..., of the last block], pre-norm."""
        depth = len(self.blocks)
        _, features = self(x, taps=Taps(blocks=range(depth)))
        return [self.prepare_tokens(x)] + [features.blocks[i] for i in range(depth)]


class ViTTeacher(Teacher):
    """A frozen `VisionTransformer` as a teacher: images in [-1, 1] -> `(images + 1) / 2`, normalised by `mean` /
    `std` (ImageNet's for DINOv2), resized to `grid * patch_size` pixels (bicubic; antialiased unless
    `resize_antialias=False`, which is what REPA's `preprocess_raw_image` does) -> the ViT.

    `features` are the final-normed patch tokens (DINOv2's `x_norm_patchtokens`); `attention_logits` the pre-softmax
    q k^T / sqrt(d) of the asked blocks between patch tokens (cls and register rows and columns removed, HASTE's
    modified DINOv2). `patch_tokens` / `patch_attention_logits` do the same on already normalised pixels."""

    interpolates = True

    def __init__(self, model: VisionTransformer, name: str, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 resize_antialias: bool = True):
        super().__init__()
        config = model.config
        self.model = model
        self.name = name
        self.patch_size, self.embed_dim = config.patch_size, config.embed_dim
        self.num_heads, self.depth = config.num_heads, config.depth
        self.native_grid = config.table_grid
        self.resize_antialias = resize_antialias
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.frozen()

    def preprocess(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        """[-1, 1] images -> the normalised (B, 3, grid*p, grid*p) pixels the ViT sees."""
        x = ((images.to(self.mean.device, torch.float32) + 1) / 2 - self.mean) / self.std
        size = grid * self.patch_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                              antialias=self.resize_antialias)
        return x.to(self.model.pos_embed.dtype)

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, H, W) -> final-normed patch tokens (B, h*w, D)."""
        return self.model.norm(self.model(pixels))[:, self.model.num_prefix_tokens:]

    def patch_attention_logits(self, pixels: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        """Normalised pixels -> {block: (B, heads, h*w, h*w)} pre-softmax logits between patch tokens."""
        _, features = self.model(pixels, taps=Taps(attention=layers), stop_after=max(layers))
        P = self.model.num_prefix_tokens
        return {i: features.attention[i][:, :, P:, P:] for i in layers}

    def _features(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        return self.patch_tokens(self.preprocess(images, grid))

    def _attention_logits(self, images: torch.Tensor, layers: list[int], grid: int) -> dict[int, torch.Tensor]:
        return self.patch_attention_logits(self.preprocess(images, grid), layers)
