"""LaMamba-Diff (arXiv 2408.02615; official code yunxiangfu2001/LaMamba-Diff): a U-Net of blocks that each run a
global 2-D selective scan (SS2D, VMamba v2), a local Swin window attention and an MLP, adaLN-gated as DiT.

This module holds the scan paths, the window attention, the SS2D block, the `LaMamba` network (`LaMambaConfig`,
`LAMAMBA_PRESETS`) with official parameter names. The selective scan itself is effigen.nn.selective_scan (CPU:
the sequential recurrence with a hand-written backward; CUDA: mamba_ssm's kernel when installed). Parity with the
official code: tests/parity/test_lamamba_parity.py.

Scan paths (the official code's `CONTINUOUS_SCAN: true`, /work/shared/reference/next_wave.md §4): two
left-right boustrophedon paths, starting at the top-left (0, 0) and at the bottom-left (H-1, 0), and two
top-bottom boustrophedon paths, starting at the bottom-left (H-1, 0) and at the bottom-right (H-1, W-1).
Consecutive positions on each path are grid neighbours (no jump at row ends). The raster alternative is VMamba's
cross-scan: row-major, column-major and the two reverses. Each path is a permutation of the H*W token indices;
`merge` applies the inverse permutation and sums the K=4 directions, as VMamba's CrossMerge does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.embeddings import TimestepEmbedder, sincos_2d_positions
from ..nn.selective_scan import selective_scan
from ..nn.taps import Features, Taps, record_taps

SCAN_MODES = ("snake", "raster")


def _snake_rows(H: int, W: int, start_bottom: bool) -> list[int]:
    rows = range(H - 1, -1, -1) if start_bottom else range(H)
    order = []
    for i, r in enumerate(rows):
        cols = range(W) if i % 2 == 0 else range(W - 1, -1, -1)
        order += [r * W + c for c in cols]
    return order


def _snake_cols(H: int, W: int, start_right: bool) -> list[int]:
    cols = range(W - 1, -1, -1) if start_right else range(W)
    order = []
    for i, c in enumerate(cols):  # both top-bottom paths start at the bottom row
        rows = range(H - 1, -1, -1) if i % 2 == 0 else range(H)
        order += [r * W + c for r in rows]
    return order


def scan_paths(H: int, W: int, mode: str = "snake") -> torch.Tensor:
    """(4, H*W) long tensor: path k visits token `paths[k, i]` (row-major index) at step i."""
    if mode not in SCAN_MODES:
        raise ValueError(f"scan mode must be one of {SCAN_MODES}; got {mode!r}")
    if mode == "snake":
        if H % 2 or W % 2:
            raise ValueError(f"snake scan paths need an even grid (the official code assumes it); got {H}x{W}. "
                             "Use an even latent size or scan='raster'")
        p = [_snake_rows(H, W, False), _snake_rows(H, W, True), _snake_cols(H, W, False), _snake_cols(H, W, True)]
        return torch.tensor(p, dtype=torch.long)
    row = torch.arange(H * W)
    col = row.view(H, W).t().reshape(-1)
    return torch.stack([row, col, row.flip(0), col.flip(0)])


def cross_scan(x: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, K, C, L): the tokens in the order of each path."""
    b, c, h, w = x.shape
    flat = x.reshape(b, 1, c, h * w).expand(b, paths.shape[0], c, h * w)
    return flat.gather(3, paths.to(x.device)[None, :, None, :].expand(b, -1, c, -1))


def cross_merge(y: torch.Tensor, paths: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, K, C, L) -> (B, C, H, W): undo each path's permutation and sum the K directions."""
    b, k, c, L = y.shape
    inv = torch.argsort(paths.to(y.device), dim=1)
    back = y.gather(3, inv[None, :, None, :].expand(b, -1, c, -1))
    return back.sum(1).view(b, c, H, W)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window*window, C)."""
    b, h, w, c = x.shape
    if h % window or w % window:
        raise ValueError(f"window attention needs H and W divisible by the window size {window}; got {h}x{w}. "
                         f"Allowed sizes are multiples of {window}")
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(x: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """(B * nW, window*window, C) -> (B, H, W, C)."""
    c = x.shape[-1]
    b = x.shape[0] // ((H // window) * (W // window))
    x = x.view(b, H // window, W // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, H, W, c)


def shifted_window_mask(H: int, W: int, window: int, shift: int, device=None) -> torch.Tensor | None:
    """Swin's additive mask (nW, N, N) for a cyclic shift of `shift`: -inf between tokens that were not neighbours
    before the roll (different regions), 0 elsewhere; None when shift == 0."""
    if shift == 0:
        return None
    region = torch.zeros(1, H, W, 1, device=device)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[:, hs, ws, :] = cnt
            cnt += 1
    ids = window_partition(region, window).squeeze(-1)  # (nW, N)
    same = ids[:, :, None] == ids[:, None, :]
    return torch.zeros(same.shape, device=device).masked_fill(~same, float("-inf"))


def window_attention(q, k, v, H: int, W: int, window: int, shift: int = 0, bias: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None):
    """Multi-head attention inside (shifted) windows. q, k, v: (B, heads, H*W, d) in row-major token order;
    `bias` (heads, N, N) is the relative position bias; `mask` a precomputed `shifted_window_mask(H, W, window,
    shift)` (computed here when None). Returns (B, heads, H*W, d)."""
    if not 0 <= shift < window:
        raise ValueError(f"window shift must be in [0, window={window}); got {shift}")
    b, nh, L, d = q.shape

    def part(t):
        t = t.transpose(1, 2).reshape(b, H, W, nh * d)
        if shift:
            t = torch.roll(t, shifts=(-shift, -shift), dims=(1, 2))
        return window_partition(t, window).view(-1, window * window, nh, d).transpose(1, 2)

    qw, kw, vw = part(q), part(k), part(v)  # (B*nW, heads, N, d)
    if mask is None:
        mask = shifted_window_mask(H, W, window, shift, q.device)
    attn_bias = None
    if mask is not None:
        nw = mask.shape[0]
        attn_bias = mask[None, :, None].expand(b, -1, nh, -1, -1).reshape(b * nw, nh, *mask.shape[1:])
    if bias is not None:
        attn_bias = bias[None] if attn_bias is None else attn_bias + bias[None]
    if attn_bias is not None:
        attn_bias = attn_bias.to(qw.dtype)
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=attn_bias)
    out = window_reverse(out.transpose(1, 2).reshape(-1, window * window, nh * d), window, H, W)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out.reshape(b, L, nh, d).transpose(1, 2)


# ------------------------------------------------------------------------------------------------------------------
# The LaMamba-Diff network
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class LaMambaConfig:
    input_size: int = 32  # grid side (pixels, or latent cells); the position table is learned at this size
    in_channels: int = 3
    patch_size: int = 1
    embed_dim: int = 32  # widths per level: e, 2e, 4e, ... doubling, the last level repeating the one before
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # encoder blocks per level
    bottleneck_depth: int = 2
    decoder_extra_block: bool = True  # official SD_UNET_DECODER_DESIGN: each decoder level has one block more
    num_heads: list[int] | int = 4  # per encoder level (the decoder uses them reversed)
    window_size: int = 8
    mlp_ratio: float = 4.0
    d_state: int = 1
    ssm_ratio: float = 2.0
    dt_rank: int | str = "auto"  # "auto" = ceil(width / 16)
    d_conv: int = 3
    conv_bias: bool = False
    scan: str = "snake"  # "snake" (official CONTINUOUS_SCAN) or "raster" (VMamba's cross-scan)
    scan_impl: str = "auto"  # effigen.nn.selective_scan implementations
    num_classes: int = 10
    learn_sigma: bool = False
    time_scale: float = 1000.0

    def __post_init__(self):
        self.depths = list(self.depths)
        n = len(self.depths)
        if n < 2:
            raise ValueError(f"LaMamba needs at least 2 levels (depths lists one block count per level); "
                             f"got {self.depths}")
        heads = [self.num_heads] * n if isinstance(self.num_heads, int) else list(self.num_heads)
        if len(heads) != n:
            raise ValueError(f"num_heads lists one head count per level ({n}); got {self.num_heads}")
        self.num_heads = heads
        if self.scan not in SCAN_MODES:
            raise ValueError(f"scan must be one of {SCAN_MODES}; got {self.scan!r}")
        for width, h in zip(self.dims, heads):
            if width % h:
                raise ValueError(f"level width {width} is not divisible by its {h} heads; widths are {self.dims}")
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim must be divisible by 4 (2-D sin-cos position init); got {self.embed_dim}")
        bad = self._size_problem(self.input_size)
        if bad:
            raise ValueError(f"LaMamba cannot take input_size {self.input_size}: {bad}. Allowed sizes with this "
                             f"configuration: {', '.join(map(str, self.allowed_sizes()))}, ...")

    @property
    def dims(self) -> list[int]:
        n = len(self.depths)
        d = [self.embed_dim * 2 ** i for i in range(n - 1)]
        return d + [d[-1]]

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def condition_dim(self) -> int:
        return self.dims[-1]

    @property
    def num_downsamples(self) -> int:  # the official U-Net merges patches after all but the last two levels
        return len(self.depths) - 2

    def encoder_resolutions(self, grid: int | None = None) -> list[int]:
        g = self.input_size // self.patch_size if grid is None else grid
        return [g // 2 ** min(i, self.num_downsamples) for i in range(len(self.depths))]

    def _size_problem(self, size: int) -> str | None:
        if size < 1 or size % self.patch_size:
            return f"it must be a positive multiple of patch_size {self.patch_size}"
        grid = size // self.patch_size
        if grid % 2 ** self.num_downsamples:
            return (f"the {self.num_downsamples} patch mergings need the grid ({grid}) divisible by "
                    f"{2 ** self.num_downsamples}")
        for r in sorted(set(self.encoder_resolutions(grid))):
            if r > self.window_size and r % self.window_size:
                return f"level resolution {r} is neither <= nor a multiple of window_size {self.window_size}"
            if self.scan == "snake" and r % 2:
                return f"the snake scan needs even level resolutions, and one level is {r}x{r} (or use scan='raster')"
        return None

    def allowed_sizes(self, count: int = 8) -> list[int]:
        out, size = [], self.patch_size
        while len(out) < count and size <= 4096:
            if self._size_problem(size) is None:
                out.append(size)
            size += self.patch_size
        return out


# Official: configs/LaMamba-DIff-XL.yaml (the only released size) with train_lamamba.sh's --window-size 8
# --num-heads 16; 32x32x4 SD-VAE latents at 256 px. Small sizes for CPU work are not official.
LAMAMBA_PRESETS: dict[str, dict] = {
    "LaMamba-XL": dict(embed_dim=320, depths=[2, 2, 2, 2], bottleneck_depth=2, num_heads=16, window_size=8),
    # CPU sizes (not official), ~5M parameters at 32 px as DiT-Ti/4 (5.0M) and DiCo-Ti (4.98M) in the MNIST recipes.
    # Ti/4 (5.16M): patch 4, an 8x8 grid as DiT-Ti/4, three levels (8, 4, 4; widths 64, 128, 128; window 4, shifted at
    # level 0); the first width must hold a 4x4x3 patch (48 values): at width 32 the patch embedding loses a third of
    # them and the eps loss stalls near 0.4 (docs/lamamba.md). Ti/2 (4.81M): patch 2, a 16x16 grid, four levels (16, 8,
    # 4, 4; widths 32, 64, 128, 128; window 8), ~8x costlier per step on this CPU
    "LaMamba-Ti/4": dict(embed_dim=64, depths=[2, 2, 1], bottleneck_depth=1, num_heads=4, window_size=4,
                         patch_size=4),
    "LaMamba-Ti/2": dict(embed_dim=32, depths=[2, 2, 1, 1], bottleneck_depth=2, num_heads=4, window_size=8,
                         patch_size=2),
    "LaMamba-Test": dict(embed_dim=8, depths=[1, 1, 1, 1], bottleneck_depth=1, num_heads=2, window_size=4),
}


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class SS2D(nn.Module):
    """VMamba's 2-D selective scan, forward type v2 (official parameter names). Channels-last (B, H, W, C)."""

    def __init__(self, width: int, d_state: int = 1, ssm_ratio: float = 2.0, dt_rank: int | str = "auto",
                 d_conv: int = 3, conv_bias: bool = False, scan: str = "snake", scan_impl: str = "auto"):
        super().__init__()
        inner = int(ssm_ratio * width)
        rank = math.ceil(width / 16) if dt_rank == "auto" else int(dt_rank)
        self.inner, self.rank, self.d_state, self.scan, self.scan_impl = inner, rank, d_state, scan, scan_impl
        K = 4
        self.in_proj = nn.Linear(width, 2 * inner, bias=False)
        self.conv2d = nn.Conv2d(inner, inner, d_conv, padding=(d_conv - 1) // 2, groups=inner, bias=conv_bias)
        self.x_proj_weight = nn.Parameter(torch.empty(K, rank + 2 * d_state, inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, inner, rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, inner))
        self.A_logs = nn.Parameter(torch.empty(K * inner, d_state))
        self.Ds = nn.Parameter(torch.empty(K * inner))
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, width, bias=False)
        self._paths: dict[tuple, torch.Tensor] = {}
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """VMamba's "v0" initialisation: x_proj like nn.Linear, dt_proj uniform(+-rank^-0.5), dt bias the inverse
        softplus of log-uniform steps in [dt_min, dt_max], A = -(1..N) (S4D-real), D = 1."""
        bound = self.inner ** -0.5
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        nn.init.uniform_(self.dt_projs_weight, -self.rank ** -0.5, self.rank ** -0.5)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_logs.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def paths(self, H: int, W: int, device) -> torch.Tensor:
        key = (H, W, self.scan, str(device))
        if key not in self._paths:
            self._paths[key] = scan_paths(H, W, self.scan).to(device)
        return self._paths[key]

    def scan_flops(self, x: torch.Tensor) -> int:
        """FLOPs of the selective scans for input x (B, H, W, C), by the formula of Mamba's / VMamba's FLOP helper
        (flops_selective_scan_fn: 9 B L D N, plus B D L for the D skip; D = 4 directions x inner channels); FLOP
        counters do not see the scan, an elementwise recurrence."""
        B, H, W, _ = x.shape
        D, L = 4 * self.inner, H * W
        return 9 * B * L * D * self.d_state + B * D * L

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        z = F.silu(z)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))  # (B, inner, H, W)
        paths = self.paths(H, W, x.device)
        xs = cross_scan(x, paths)  # (B, K, inner, L)
        K, L = xs.shape[1], H * W
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight.to(xs.dtype))
        dts, Bs, Cs = torch.split(x_dbl, [self.rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight.to(dts.dtype))
        y = selective_scan(xs.reshape(B, K * self.inner, L).float(), dts.reshape(B, K * self.inner, L).float(),
                           -torch.exp(self.A_logs.float()), Bs.float(), Cs.float(), self.Ds.float(),
                           delta_bias=self.dt_projs_bias.float().view(-1), delta_softplus=True, impl=self.scan_impl)
        y = cross_merge(y.view(B, K, self.inner, L), paths, H, W).permute(0, 2, 3, 1)  # (B, H, W, inner)
        y = self.out_norm(y.to(z.dtype)) * z
        return self.out_proj(y)


class WindowAttention(nn.Module):
    """Swin (shifted) window attention with a relative position bias (official parameter names)."""

    def __init__(self, width: int, window: int, heads: int, shift: int):
        super().__init__()
        self.window, self.heads, self.shift = window, heads, shift
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2)
        # derived buffers, rebuilt at construction (not stored in folders)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        N = self.window ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        mask = None
        if self.shift:
            if self.mask is None or self.mask.shape[0] != (H // self.window) * (W // self.window) \
                    or self.mask.device != x.device:
                self.mask = shifted_window_mask(H, W, self.window, self.shift, x.device)
            mask = self.mask
        out = window_attention(q, k, v, H, W, self.window, self.shift, bias.permute(2, 0, 1), mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, H, W, C))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as the official nn.GELU()


class LaMambaBlock(nn.Module):
    """x += gate_vss * SS2D(mod(LN x)); x += gate_attn * WindowAttention(mod(LN x)); x += gate_mlp * MLP(mod(LN x)),
    the 9 modulation vectors regressed from the condition projected to this width (official
    `LaMambaBlock_conditioned`; the projection is absent where the widths agree, except in the decoder)."""

    def __init__(self, width: int, cond_dim: int, resolution: int, heads: int, shift: bool,
                 config: LaMambaConfig, project_condition: bool):
        super().__init__()
        window = min(config.window_size, resolution)
        # official: the window covers the whole map at small resolutions, and then nothing is shifted
        shift_size = config.window_size // 2 if (shift and resolution > config.window_size) else 0
        self.condition_projection = nn.Linear(cond_dim, width) if (project_condition or cond_dim != width) \
            else nn.Identity()
        self.norm = nn.LayerNorm(width)
        self.op = SS2D(width, config.d_state, config.ssm_ratio, config.dt_rank, config.d_conv, config.conv_bias,
                       config.scan, config.scan_impl)
        self.norm_swin = nn.LayerNorm(width)
        self.attn = WindowAttention(width, window, heads, shift_size)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * config.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 9 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mods = self.adaLN_modulation(self.condition_projection(c))[:, None, None, :].chunk(9, dim=-1)
        s1, m1, g1, s2, m2, g2, s3, m3, g3 = mods
        x = x + g1 * self.op(_modulate(self.norm(x), s1, m1))
        x = x + g2 * self.attn(_modulate(self.norm_swin(x), s2, m2))
        return x + g3 * self.mlp(_modulate(self.norm2(x), s3, m3))


class _Stage(nn.Module):
    def __init__(self, blocks: list[LaMambaBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class PatchMerging2D(nn.Module):
    """2x2 neighbours concatenated as [(0,0), (1,0), (0,1), (1,1)] -> LayerNorm(4C) -> Linear(4C, C_out)."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * width)
        self.reduction = nn.Linear(4 * width, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpanding2D(nn.Module):
    """Linear(C, s^2 C / s) -> each cell becomes an s x s block of channels C / s ('(p1 p2 c)') -> LayerNorm;
    `keep_width` (the final expand) keeps C channels: Linear(C, s^2 C)."""

    def __init__(self, width: int, scale: int = 2, keep_width: bool = False):
        super().__init__()
        self.scale = scale
        self.out = width if keep_width else width // scale
        self.expand = nn.Linear(width, scale * scale * self.out, bias=False)
        self.norm = nn.LayerNorm(self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        s = self.scale
        x = self.expand(x).view(B, H, W, s, s, self.out).permute(0, 1, 3, 2, 4, 5).reshape(B, H * s, W * s, self.out)
        return self.norm(x)


class _PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class _Labels(nn.Module):
    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)


class LaMamba(nn.Module):
    """LaMamba-Diff (arXiv 2408.02615): a U-Net of LaMamba blocks (SS2D global scan + Swin local attention + MLP).

    Encoder levels i = 0..n-1 (widths e, 2e, 4e, ..., the last repeating; patch merging after all but the last
    two); bottleneck x = x + blocks(x); decoder levels at the widths reversed, patch expanding before all but the
    first two, the encoder level's output ADDED (official SKIP_CONCAT false), one block more per level than the
    encoder (SD_UNET_DECODER_DESIGN); a final patch expand, adaLN (shift, scale) and a linear head. The interface is
    DiT's: `forward(x, t, labels)`, t in [0, 1] (the embedding sees `time_scale * t`), null class = num_classes.
    Parameter names follow the official `model/lamamba.py` / `vmamba.py`."""

    config_class = LaMambaConfig

    def __init__(self, config: LaMambaConfig):
        super().__init__()
        self.config = config
        dims, n, cond = config.dims, len(config.depths), config.condition_dim
        grid = config.input_size // config.patch_size
        res = config.encoder_resolutions()
        self.patch_embed = _PatchEmbed(config.in_channels, dims[0], config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dims[0]))
        self.t_embedder = TimestepEmbedder(cond)
        self.y_embedder = _Labels(config.num_classes, cond)

        def blocks(width, count, r, heads, decoder=False):
            return [LaMambaBlock(width, cond, r, heads, j % 2 == 1, config, decoder) for j in range(count)]

        self.layers = nn.ModuleList()
        for i in range(n):
            stage = _Stage(blocks(dims[i], config.depths[i], res[i], config.num_heads[i]))
            stage.downsample = PatchMerging2D(dims[i], dims[i + 1]) if i < config.num_downsamples else nn.Identity()
            self.layers.append(stage)
        self.mid_layer = _Stage(blocks(dims[-1], config.bottleneck_depth, res[-1], config.num_heads[-1]))
        dec_dims, dec_res, dec_heads = dims[::-1], res[::-1], config.num_heads[::-1]
        self.layers_up = nn.ModuleList()
        for i in range(n):
            # official: one extra block per decoder level, except a first level mirroring an empty last level
            extra = config.decoder_extra_block and not (i == 0 and config.depths[-1] == 0)
            depth = config.depths[n - 1 - i] + int(extra)
            stage = _Stage(blocks(dec_dims[i], depth, dec_res[i], dec_heads[i], decoder=True))
            stage.upsample = PatchExpanding2D(dec_dims[i - 1]) if i >= 2 else nn.Identity()
            self.layers_up.append(stage)
        self.final_up = PatchExpanding2D(dims[0], config.patch_size, keep_width=True)
        self.final_condition_projection = nn.Linear(cond, dims[0])
        self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dims[0], 2 * dims[0]))
        self.final_linear = nn.Linear(dims[0], config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official `_init_weights`: xavier Linear weights, zero biases, sin-cos positions, N(0, 0.02) label
        table and timestep MLP, zero adaLN projections (adaLN-zero: every block starts as the identity) and final
        modulation. The final linear is NOT zeroed officially (its zeroing loop targets the stages, a no-op); here
        it is zeroed as well, so that a fresh network predicts exactly zero, as DiT/DiCo do."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, SS2D):
                module.reset_ssm_parameters()
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        grid = self.pos_embed.shape[1]
        pos = sincos_2d_positions(self.pos_embed.shape[-1], grid).reshape(1, grid, grid, -1)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float())
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks():
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_adaLN_modulation[-1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def blocks(self) -> list[LaMambaBlock]:
        """All blocks in forward order (the indices `taps` refers to)."""
        out = [b for stage in self.layers for b in stage.blocks] + list(self.mid_layer.blocks)
        return out + [b for stage in self.layers_up for b in stage.blocks]

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: torch.Tensor | None = None,
                taps: Taps | None = None) -> torch.Tensor | tuple[torch.Tensor, Features]:
        """x: (B, C, S, S) with S = input_size; t: (B,) in [0, 1]; labels: (B,) ints, `num_classes` = null class.
        With `taps`, also returns block outputs as (B, L, C_level) tokens in raster order (no attention logits)."""
        cfg = self.config
        if guidance is not None:
            raise ValueError("LaMamba has no guidance embedding: pass guidance=None (use classifier-free guidance)")
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] != cfg.input_size or x.shape[3] != cfg.input_size:
            raise ValueError(f"LaMamba expects (B, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}) inputs (its "
                             f"position table is learned at input_size {cfg.input_size}); got {tuple(x.shape)}. Build "
                             f"the network with input_size set to the data's size (allowed: "
                             f"{', '.join(map(str, cfg.allowed_sizes()))}, ...)")
        if taps is not None and getattr(taps, "attention", ()):
            raise ValueError("LaMamba's window attention logits are not tapped: request only Taps(blocks=...)")
        recorder = record_taps(taps, len(self.blocks()), "this LaMamba")
        i = 0

        def run(stage, h, c):
            nonlocal i
            for block in stage.blocks:
                h = block(h, c)
                recorder.block_output(i, h.flatten(1, 2))
                i += 1
            return h

        c = self.t_embedder(cfg.time_scale * t) + self.y_embedder.embedding_table(labels)
        h = self.patch_embed(x) + self.pos_embed
        skips = []
        for stage in self.layers:
            h = run(stage, h, c)
            skips.append(h)
            h = stage.downsample(h)
        h = h + run(self.mid_layer, h, c)
        for j, stage in enumerate(self.layers_up):
            h = run(stage, stage.upsample(h) + skips[-(j + 1)], c)
        shift, scale = self.final_adaLN_modulation(self.final_condition_projection(c))[:, None, None, :].chunk(2, -1)
        h = _modulate(F.layer_norm(self.final_up(h), (h.shape[-1],), eps=1e-6), shift, scale)
        return recorder.result(self.final_linear(h).permute(0, 3, 1, 2))
