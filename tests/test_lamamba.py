"""LaMamba-Diff building blocks: the CPU selective scan (loop reference vs chunked default)."""

import math

import pytest
import torch
import torch.nn.functional as F

from effigen.nn.selective_scan import selective_scan, selective_scan_chunked, selective_scan_loop


def _inputs(b=2, d=6, n=3, L=37, groups=None, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g)
    delta = torch.randn(b, d, L, generator=g)
    A = -torch.exp(torch.randn(d, n, generator=g))
    shape = (b, n, L) if groups is None else (b, groups, n, L)
    B = torch.randn(*shape, generator=g)
    C = torch.randn(*shape, generator=g)
    D = torch.randn(d, generator=g)
    bias = torch.randn(d, generator=g)
    ts = [u, delta, A, B, C, D, bias]
    if grad:
        ts = [t.requires_grad_() for t in ts]
    return ts


def test_loop_matches_hand_recurrence_two_steps():
    u, delta, A, B, C, D, bias = _inputs(b=1, d=1, n=1, L=2)
    y = selective_scan_loop(u, delta, A, B, C, D, bias, delta_softplus=True)
    dt = F.softplus(delta[0, 0] + bias[0])
    a = A[0, 0]
    h1 = dt[0] * B[0, 0, 0] * u[0, 0, 0]
    h2 = math.exp(dt[1] * a) * h1 + dt[1] * B[0, 0, 1] * u[0, 0, 1]
    want = torch.stack([C[0, 0, 0] * h1, C[0, 0, 1] * h2]) + D[0] * u[0, 0]
    torch.testing.assert_close(y[0, 0], want)


@pytest.mark.parametrize("chunk", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("groups", [None, 2])
def test_chunked_equals_loop(chunk, groups):
    args = _inputs(groups=groups)
    ref = selective_scan_loop(*args, delta_softplus=True)
    out = selective_scan_chunked(*args, delta_softplus=True, chunk=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(selective_scan(*args, delta_softplus=True), out if chunk == 8 else
                       selective_scan_chunked(*args, delta_softplus=True))


def test_chunked_equals_loop_gradients():
    a1 = _inputs(L=21, groups=3, grad=True)
    a2 = [t.detach().clone().requires_grad_() for t in a1]
    w = torch.randn(2, 6, 21, generator=torch.Generator().manual_seed(5))
    (selective_scan_loop(*a1, delta_softplus=True) * w).sum().backward()
    (selective_scan_chunked(*a2, delta_softplus=True, chunk=8) * w).sum().backward()
    for t1, t2 in zip(a1, a2):
        torch.testing.assert_close(t2.grad, t1.grad, rtol=1e-4, atol=1e-5)


def test_scan_is_causal():
    u, delta, A, B, C, D, bias = _inputs(L=20)
    y = selective_scan_chunked(u, delta, A, B, C, D, bias, chunk=8)
    u2 = u.clone()
    u2[..., 12:] += 1.0
    y2 = selective_scan_chunked(u2, delta, A, B, C, D, bias, chunk=8)
    assert torch.equal(y[..., :12], y2[..., :12])
    assert not torch.allclose(y[..., 12:], y2[..., 12:])


def test_scan_clear_errors():
    u, delta, A, B, C, D, bias = _inputs()
    with pytest.raises(ValueError, match="impl must be one of"):
        selective_scan(u, delta, A, B, C, impl="fast")
    with pytest.raises(ValueError, match="G dividing"):
        selective_scan(u, delta, A, torch.randn(2, 4, 3, 37), C)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(u, delta, A[:3], B, C)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="mamba_ssm"):
            selective_scan(u, delta, A, B, C, impl="cuda")


# ---- scan paths and window attention (effigen.models.lamamba) ----
from effigen.models.lamamba import cross_merge, cross_scan, scan_paths, window_attention  # noqa: E402


@pytest.mark.parametrize("mode", ["snake", "raster"])
def test_scan_paths_are_permutations_and_merge_inverts(mode):
    H, W = 4, 6
    paths = scan_paths(H, W, mode)
    assert paths.shape == (4, H * W)
    for p in paths:
        assert torch.equal(p.sort().values, torch.arange(H * W))
    x = torch.randn(2, 3, H, W)
    seq = cross_scan(x, paths)
    assert torch.equal(seq[:, 0, :, 0], x[:, :, 0, 0])  # both modes' first path starts at the top-left token
    assert torch.equal(seq[:, 2, :, -1], x[:, :, paths[2, -1] // W, paths[2, -1] % W])
    torch.testing.assert_close(cross_merge(seq, paths, H, W), 4 * x)


def test_snake_paths_are_continuous_and_start_where_documented():
    H, W = 6, 4
    paths = scan_paths(H, W, "snake")
    r, c = paths // W, paths % W
    steps = (r[:, 1:] - r[:, :-1]).abs() + (c[:, 1:] - c[:, :-1]).abs()
    assert torch.all(steps == 1)  # every step moves to a grid neighbour
    starts = [(int(r[k, 0]), int(c[k, 0])) for k in range(4)]
    assert starts == [(0, 0), (H - 1, 0), (H - 1, 0), (H - 1, W - 1)]
    assert int(r[0, 1]) == 0 and int(r[2, 1]) == H - 2  # the first two are row-wise, the last two column-wise
    raster = scan_paths(H, W, "raster")
    rr = raster // W
    assert (rr[0, 1:] - rr[0, :-1]).abs().max() == 1 and ((raster[0] % W)[W] == 0)  # raster jumps at row ends


def test_snake_paths_need_even_grid():
    with pytest.raises(ValueError, match="even grid"):
        scan_paths(5, 4, "snake")
    with pytest.raises(ValueError, match="scan mode"):
        scan_paths(4, 4, "zigzag")


@pytest.mark.parametrize("shift", [0, 2])
def test_window_attention_equals_dense_masked_attention(shift):
    H = W = 8
    win, nh, d = 4, 2, 5
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, nh, H * W, d, generator=g) for _ in range(3))
    out = window_attention(q, k, v, H, W, win, shift)
    # dense reference: token i sees j iff both fall in the same window of the rolled grid and were not split by
    # the cyclic roll (their original rows and columns lie less than a window apart)
    idx = torch.arange(H * W)
    r, c = idx // W, idx % W
    wr, wc = ((r - shift) % H) // win, ((c - shift) % W) // win
    same = (wr[:, None] == wr[None]) & (wc[:, None] == wc[None])
    near = ((r[:, None] - r[None]).abs() < win) & ((c[:, None] - c[None]).abs() < win)
    mask = torch.zeros(H * W, H * W).masked_fill(~(same & near), float("-inf"))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if shift:
        assert not torch.allclose(out, window_attention(q, k, v, H, W, win, 0))


def test_window_attention_clear_errors():
    q = torch.randn(1, 1, 36, 4)
    with pytest.raises(ValueError, match="divisible by the window size 4"):
        window_attention(q, q, q, 6, 6, 4)
    with pytest.raises(ValueError, match="window shift"):
        window_attention(q, q, q, 6, 6, 3, 3)


def test_snake_paths_literal_4x4():
    # the orders of the official model/continuous_scan.py for N=4, written out by hand
    want = [[0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],
            [12, 13, 14, 15, 11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],
            [12, 8, 4, 0, 1, 5, 9, 13, 14, 10, 6, 2, 3, 7, 11, 15],
            [15, 11, 7, 3, 2, 6, 10, 14, 13, 9, 5, 1, 0, 4, 8, 12]]
    assert scan_paths(4, 4, "snake").tolist() == want
