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


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
@pytest.mark.parametrize("groups", [None, 2])
def test_chunked_equals_loop(chunk, groups):
    args = _inputs(groups=groups)
    ref = selective_scan_loop(*args, delta_softplus=True)
    out = selective_scan_chunked(*args, delta_softplus=True, chunk=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(selective_scan(*args, delta_softplus=True), out if chunk == 32 else
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
