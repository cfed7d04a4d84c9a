"""LaMamba-Diff (arXiv 2408.02615) building blocks: the four continuous (snake) scan paths of SS2D and the
Swin-style (shifted) window attention.

Status: this module holds the scan-path and window pieces with their tests; the LaMamba network itself (SS2D
block, U-Net with patch merging/expanding and skip concatenation, adaLN gating), its presets, the
`lamamba-ddpm` method and the official-checkpoint converter are not written yet (see docs/status.md).

Scan paths (the official code's `CONTINUOUS_SCAN: true`, /work/shared/reference/next_wave.md §4): two
left-right boustrophedon paths, starting at the top-left (0, 0) and at the bottom-left (H-1, 0), and two
top-bottom boustrophedon paths, starting at the bottom-left (H-1, 0) and at the bottom-right (H-1, W-1).
Consecutive positions on each path are grid neighbours (no jump at row ends). The raster alternative is VMamba's
cross-scan: row-major, column-major and the two reverses. Each path is a permutation of the H*W token indices;
`merge` applies the inverse permutation and sums the K=4 directions, as VMamba's CrossMerge does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def window_attention(q, k, v, H: int, W: int, window: int, shift: int = 0, bias: torch.Tensor | None = None):
    """Multi-head attention inside (shifted) windows. q, k, v: (B, heads, H*W, d) in row-major token order;
    `bias` (heads, N, N) is the relative position bias. Returns (B, heads, H*W, d)."""
    if not 0 <= shift < window:
        raise ValueError(f"window shift must be in [0, window={window}); got {shift}")
    b, nh, L, d = q.shape

    def part(t):
        t = t.transpose(1, 2).reshape(b, H, W, nh * d)
        if shift:
            t = torch.roll(t, shifts=(-shift, -shift), dims=(1, 2))
        return window_partition(t, window).view(-1, window * window, nh, d).transpose(1, 2)

    qw, kw, vw = part(q), part(k), part(v)  # (B*nW, heads, N, d)
    mask = shifted_window_mask(H, W, window, shift, q.device)
    attn_bias = None
    if mask is not None:
        nw = mask.shape[0]
        attn_bias = mask[None, :, None].expand(b, -1, nh, -1, -1).reshape(b * nw, nh, *mask.shape[1:])
    if bias is not None:
        attn_bias = bias[None] if attn_bias is None else attn_bias + bias[None]
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=attn_bias)
    out = window_reverse(out.transpose(1, 2).reshape(-1, window * window, nh * d), window, H, W)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out.reshape(b, L, nh, d).transpose(1, 2)
