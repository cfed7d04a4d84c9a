"""Selective scan (Mamba's S6 recurrence, arXiv 2312.00752 Alg. 2 / eq. 2a-2b) that runs on CPU.

The recurrence, per channel d and state index n, over positions t = 1..L:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <C_t, h_t> + D * u_t

with `delta = softplus(delta + delta_bias)` when asked (the argument convention of
`mamba_ssm.ops.selective_scan_interface.selective_scan_fn`, so callers can switch implementations):

    u, delta: (batch, channels, L); A: (channels, N); B, C: (batch, N, L) or grouped (batch, G, N, L) where the
    channels split into G equal groups (VMamba's K scan directions); D, delta_bias: (channels,) or None.

Implementations (`impl`):
  * "loop": the sequential recurrence, one position at a time; the ground truth in tests.
  * "recurrent" (the CPU default): the loop's recurrence h_t = a_t h_{t-1} + b_t, vectorised over batch,
    channels and state, inside one autograd Function whose backward is the reverse recurrence (written by hand), so
    the backward costs about two forwards instead of an L-node autograd graph (benchmarks/scan_speed.py at a 16x16
    grid, B=32, 256 channels, N=1: forward+backward 108 ms vs chunked-8 530 ms and loop 1497 ms).
  * "chunked": positions split into chunks of `chunk` steps (default 8: in benchmarks/scan_speed.py on
    this CPU, chunk 8 had the fastest forward and chunk 4 a 11% faster forward+backward; 16-64 were slower).
    Inside a chunk the state is the closed form
    h_t = sum_{s<=t} exp(S_t - S_s) delta_s B_s u_s with S the within-chunk cumulative sum of delta*A; every
    exponent is <= 0 (A < 0, delta > 0), so no overflow, and the masked (s > t) entries become exp(-inf) = 0.
    Chunk end states are carried across chunks with a short loop over chunks. This is our design (the Heinsen
    log-space scan is the alternative; it loses precision over long L), vectorised over batch, channels and chunks.
  * "cuda": mamba_ssm's fused kernel, used by "auto" only when `mamba_ssm` imports and the tensors are on CUDA.
  * "auto": "cuda" when possible, else "recurrent".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional: the fused CUDA kernel of the official Mamba package
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_scan  # type: ignore
except Exception:  # noqa: BLE001 - any import failure (missing package, no CUDA build) means "not available"
    _cuda_scan = None

IMPLS = ("auto", "loop", "recurrent", "chunked", "cuda")


def cuda_scan_available() -> bool:
    return _cuda_scan is not None and torch.cuda.is_available()


def _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be (batch, channels, L); got {tuple(u.shape)} "
                         f"and {tuple(delta.shape)}")
    b, d, L = u.shape
    if A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be (channels={d}, N); got {tuple(A.shape)}")
    n = A.shape[1]

    def expand(M, name):
        if M.dim() == 3:
            M = M.unsqueeze(1)
        if M.dim() != 4 or M.shape[0] != b or M.shape[2] != n or M.shape[3] != L or d % M.shape[1]:
            raise ValueError(f"selective_scan: {name} must be (batch, N, L) or (batch, G, N, L) with G dividing "
                             f"channels={d}, N={n}, L={L}; got {tuple(M.shape)}")
        return M.repeat_interleave(d // M.shape[1], dim=1)  # (b, d, n, L)

    Bx, Cx = expand(B, "B"), expand(C, "C")
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return u.float(), dt, A.float(), Bx.float(), Cx.float()


def _finish(y, u, D, dtype):
    if D is not None:
        y = y + u * D.float()[None, :, None]
    return y.to(dtype)


def selective_scan_loop(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Sequential reference: one recurrence step per position (float32 state)."""
    dtype = u.dtype
    uf, dt, Af, Bx, Cx = _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus)
    h = uf.new_zeros(uf.shape[0], uf.shape[1], Af.shape[1])
    ys = []
    for t in range(uf.shape[2]):
        dA = torch.exp(dt[:, :, t, None] * Af)
        h = dA * h + (dt[:, :, t] * uf[:, :, t])[..., None] * Bx[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    return _finish(torch.stack(ys, dim=-1), uf, D, dtype)


def selective_scan_chunked(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, chunk: int = 8):
    """Chunked closed-form scan, equal to `selective_scan_loop` up to float rounding (see module docstring)."""
    if chunk < 1:
        raise ValueError(f"selective_scan: chunk must be >= 1; got {chunk}")
    dtype = u.dtype
    uf, dt, Af, Bx, Cx = _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus)
    b, d, L = uf.shape
    n = Af.shape[1]
    T = min(chunk, L)
    nc = -(-L // T)
    pad = nc * T - L
    if pad:  # padded steps have delta = 0 (no decay, no input) and are dropped at the end
        uf, dt = F.pad(uf, (0, pad)), F.pad(dt, (0, pad))
        Bx, Cx = F.pad(Bx, (0, pad)), F.pad(Cx, (0, pad))
    # (b, d, n, nc, T)
    logA = (dt[:, :, None, :] * Af[None, :, :, None]).view(b, d, n, nc, T)
    S = logA.cumsum(-1)
    x = (dt * uf)[:, :, None, :] * Bx
    x = x.view(b, d, n, nc, T)
    diff = S[..., :, None] - S[..., None, :]  # (.., t, s): S_t - S_s
    causal = torch.ones(T, T, dtype=torch.bool, device=u.device).tril()
    W = torch.exp(diff.masked_fill(~causal, float("-inf")))
    local = (W @ x.unsqueeze(-1)).squeeze(-1)  # states with zero state at each chunk start
    decay = torch.exp(S)  # from chunk start to t
    carry = uf.new_zeros(b, d, n)
    carries = []
    for c in range(nc):  # chunk-to-chunk carry: h_in(c+1) = decay_end(c) * h_in(c) + local_end(c)
        carries.append(carry)
        carry = decay[..., c, -1] * carry + local[..., c, -1]
    h = local + decay * torch.stack(carries, dim=3)[..., None]
    y = (h * Cx.view(b, d, n, nc, T)).sum(2).reshape(b, d, nc * T)[..., :L]
    return _finish(y, uf[..., :L], D, dtype)


class _LinearRecurrence(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + b_t (h_0 = 0) over the first dimension of (L, ...) tensors, one position per step, with
    the reverse recurrence as its backward: g_t = dL/dh_t + a_{t+1} g_{t+1}; dL/db_t = g_t; dL/da_t = g_t h_{t-1}.
    Every step is one elementwise op on a contiguous (...) slice, so autograd records no graph of L nodes."""

    @staticmethod
    def forward(ctx, a, b):
        h = torch.empty_like(b)
        prev = torch.zeros_like(b[0])
        for t in range(b.shape[0]):
            prev = torch.addcmul(b[t], a[t], prev)
            h[t] = prev
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        g = torch.empty_like(grad_h)
        acc = torch.zeros_like(grad_h[0])
        for t in range(grad_h.shape[0] - 1, -1, -1):
            acc = grad_h[t] + acc if t == grad_h.shape[0] - 1 else torch.addcmul(grad_h[t], a[t + 1], acc)
            g[t] = acc
        grad_a = torch.zeros_like(a)
        grad_a[1:] = g[1:] * h[:-1]
        return grad_a, g


def selective_scan_recurrent(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Sequential recurrence (as "loop") with a hand-written backward (`_LinearRecurrence`): exact like the loop, and
    as cheap as the loop's forward in the backward too (no L-node autograd graph, no T x T chunk matrices)."""
    dtype = u.dtype
    uf, dt, Af, Bx, Cx = _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus)
    # (L, b, d, n) so that each step reads a contiguous slice
    a = torch.exp(dt[:, :, None, :] * Af[None, :, :, None]).permute(3, 0, 1, 2).contiguous()
    x = ((dt * uf)[:, :, None, :] * Bx).permute(3, 0, 1, 2).contiguous()
    h = _LinearRecurrence.apply(a, x)  # (L, b, d, n)
    y = (h * Cx.permute(3, 0, 1, 2)).sum(-1).permute(1, 2, 0)  # (b, d, L)
    return _finish(y, uf, D, dtype)


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, impl: str = "auto",
                   chunk: int = 8):
    """Dispatch to one implementation (see module docstring); "auto" uses CUDA's kernel only when it can."""
    if impl not in IMPLS:
        raise ValueError(f"selective_scan: impl must be one of {IMPLS}; got {impl!r}")
    if impl == "auto":
        impl = "cuda" if (u.is_cuda and cuda_scan_available()) else "recurrent"
    if impl == "cuda":
        if not (u.is_cuda and cuda_scan_available()):
            raise RuntimeError("selective_scan impl='cuda' needs the mamba_ssm package (pip install mamba-ssm) "
                               "and CUDA tensors; use impl='recurrent' (the CPU default) on CPU")
        return _cuda_scan(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
    if impl == "loop":
        return selective_scan_loop(u, delta, A, B, C, D, delta_bias, delta_softplus)
    if impl == "recurrent":
        return selective_scan_recurrent(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return selective_scan_chunked(u, delta, A, B, C, D, delta_bias, delta_softplus, chunk=chunk)
