"""Sequential vs chunked selective scan on CPU, one process, back to back (forward, and forward+backward).

python benchmarks/scan_speed.py [--batch 8 --channels 256 --state 1 --length 1024 --repeats 5]
Shapes default to a LaMamba SS2D at a 32x32 grid: K=4 directions x inner dim 64 = 256 scanned channels, d_state 1.
"""

from __future__ import annotations

import argparse
import time

import torch

from effigen.nn.selective_scan import selective_scan_chunked, selective_scan_loop, selective_scan_recurrent


def _time(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--state", type=int, default=1)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunks", type=str, default="4,8,16,32")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    b, d, n, L = a.batch, a.channels, a.state, a.length
    args = [torch.randn(b, d, L, generator=g), torch.randn(b, d, L, generator=g),
            -torch.rand(d, n, generator=g) - 0.1, torch.randn(b, a.groups, n, L, generator=g),
            torch.randn(b, a.groups, n, L, generator=g), torch.randn(d, generator=g), torch.zeros(d)]
    grad_args = [t.clone().requires_grad_() for t in args]
    print(f"torch {torch.__version__} threads {torch.get_num_threads()} shape B={b} D={d} N={n} L={L}")
    runs = [("loop", lambda x: selective_scan_loop(*x, delta_softplus=True)),
            ("recurrent", lambda x: selective_scan_recurrent(*x, delta_softplus=True))]
    runs += [(f"chunked{c}", lambda x, c=c: selective_scan_chunked(*x, delta_softplus=True, chunk=int(c)))
             for c in a.chunks.split(",")]
    for name, f in runs:
        with torch.no_grad():
            fwd = _time(lambda: f(args), a.repeats)
        fb = _time(lambda: f(grad_args).sum().backward(), a.repeats)
        print(f"{name:10s} forward {fwd * 1e3:8.1f} ms   forward+backward {fb * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
