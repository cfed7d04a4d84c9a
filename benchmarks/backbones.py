"""Backbones at matched parameter counts, in ONE process: forward images/s, peak memory and FLOPs per image.

    python benchmarks/backbones.py --threads 1                                   # DiT vs DiCo (defaults below)
    python benchmarks/backbones.py --model dit-ddpm:DiT-Ti/4:hidden_size=256,depth=4,num_heads=4 \\
        --model dico-ddpm:DiCo-Ti --model lamamba-ddpm:<preset>                  # add any registered method

Each --model is METHOD:PRESET[:key=value,...] (a registry method, one of its network presets, overrides). Every
model runs in every space (32 px pixels, 3 channels; 32x32x4 latents) and precision (fp32, bf16 autocast); a
combination that fails is printed with its error, never dropped. FLOPs come from torch.utils.flop_counter (counts
matmuls and convolutions, grouped ones included; elementwise work, norms and scans written as elementwise ops are
NOT counted: the table says so). torch's counter has no formula for the CPU attention kernel
(`_scaled_dot_product_flash_attention_for_cpu`): effigen.bench's mapping adds the two attention matmuls (masks and
softmax not counted; the DiT figures in docs/dico.md predate it and miss the attention). Selective scans (LaMamba's
SS2D) are elementwise recurrences the counter cannot see: their FLOPs are added in a separate column with the
formula of Mamba's / VMamba's FLOP helper (`flops_selective_scan_fn`: 9 B L D N + B D L for the D skip), from each
module's `scan_flops(x)`. Peak memory of one forward (effigen.bench's measure_peak_memory: CUDA max allocated on a
GPU; on CPU the RSS high-water mark after a reset, or 1 ms RSS polling, minus the RSS before the call).

`--profile` adds, per model and precision, where the forward's time goes (torch.profiler, self CPU time of each op over
the timed repeats): the ops grouped into convolution, matmul (linear / bmm / attention kernels), normalisation,
elementwise and copies/layout, and the top ops, so a FLOP count can be read against the time the ops really take.

    python benchmarks/backbones.py --profile --spaces pixels --model dico-ddpm:DiCo-Ti --model dit-ddpm:DiT-Ti/2
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from effigen.bench.throughput import CPU_SDPA_FLOPS, measure_peak_memory
from effigen.registry import METHODS

DEFAULT_MODELS = ["dit-ddpm:DiT-Ti/4:hidden_size=256,depth=4,num_heads=4", "dico-ddpm:DiCo-Ti"]


def build(spec: str, channels: int, size: int):
    method, preset, *rest = spec.split(":")
    entry = METHODS[method]
    kwargs = dict(entry.network_presets[preset])
    for item in (rest[0].split(",") if rest else []):
        key, value = item.split("=")
        kwargs[key] = type(kwargs[key])(value) if key in kwargs else int(value)
    config = entry.network_class.config_class(**{**kwargs, "input_size": size, "in_channels": channels,
                                                 "num_classes": 10, "learn_sigma": "ddpm" in method})
    return entry.network_class(config).eval()


def measure(net, channels, size, batch, precision, repeats):
    x, t, y = torch.randn(batch, channels, size, size), torch.rand(batch), torch.randint(0, 10, (batch,))
    ctx = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")
    scan_flops = []
    hooks = [m.register_forward_hook(lambda m, inputs, out: scan_flops.append(m.scan_flops(inputs[0])))
             for m in net.modules() if hasattr(m, "scan_flops")]
    with torch.no_grad(), ctx:
        counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)
        with counter:
            net(x, t, y)
        flops = counter.get_total_flops() / batch
        scan = sum(scan_flops) / batch
        for h in hooks:
            h.remove()
        memory = measure_peak_memory(lambda: net(x, t, y))  # also the warm-up call
        start = time.perf_counter()
        for _ in range(repeats):
            net(x, t, y)
        seconds = time.perf_counter() - start
    return batch * repeats / seconds, flops, scan, memory["peak_memory_bytes"] / 2**20


# op name -> group for the profile summary (first match wins; names are aten ops as the profiler reports them)
OP_GROUPS = (
    ("convolution", ("conv", "mkldnn_convolution")),
    ("matmul", ("addmm", "mm", "bmm", "matmul", "linear", "scaled_dot_product", "baddbmm")),
    ("normalisation", ("norm",)),
    ("copies/layout", ("copy_", "contiguous", "clone", "permute", "transpose", "cat", "to_copy", "_to_copy", "view",
                       "reshape", "index", "gather", "roll", "flip", "pad", "empty", "fill_", "zero_", "as_strided",
                       "unfold", "select", "slice", "expand", "stack", "split", "chunk")),
    ("elementwise", ("add", "mul", "sub", "div", "gelu", "silu", "sigmoid", "exp", "softplus", "softmax", "tanh",
                     "mean", "sum", "pow", "rsqrt", "sqrt", "neg", "clamp", "cos", "sin", "where", "cumsum")),
)


def op_group(name: str) -> str:
    short = name.split("::")[-1]
    for group, keys in OP_GROUPS:
        if any(short == k or short.startswith(k) or k in short for k in keys):
            return group
    return "other"


def profile(net, channels, size, batch, precision, repeats, top: int = 8) -> str:
    """Self CPU time per op group and the top ops of `repeats` forwards (after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    x, t, y = torch.randn(batch, channels, size, size), torch.rand(batch), torch.randint(0, 10, (batch,))
    ctx = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad(), ctx:
        net(x, t, y)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                net(x, t, y)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[op_group(e.key)] += e.self_cpu_time_total
    lines = ["  time by op group (self CPU, % of aten time): " + ", ".join(
        f"{g} {100 * v / total:.1f}%" for g, v in sorted(groups.items(), key=lambda kv: -kv[1]))]
    lines.append(f"  aten self CPU per forward: {total / repeats / 1e3:.1f} ms; top ops:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        lines.append(f"    {e.key:<44} {100 * e.self_cpu_time_total / total:5.1f}%  calls/forward {e.count / repeats:6.1f}"
                     f"  [{op_group(e.key)}]")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="METHOD:PRESET[:k=v,...] (repeatable)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--spaces", default="pixels,latents", help="comma-separated: pixels (3x32x32), latents (4x32x32)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--profile", action="store_true", help="also print where each forward's time goes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = args.model or DEFAULT_MODELS
    print("model | space | precision | params (M) | GFLOPs/img (matmul+conv+attention) | scan GFLOPs/img (formula) | "
          "img/s | peak memory of one forward (MiB)")
    spaces = {"pixels": (3, 32, "pixels 3x32x32"), "latents": (4, 32, "latents 4x32x32")}
    for channels, size, space in (spaces[s] for s in args.spaces.split(",")):
        for spec in models:
            for precision in args.precisions.split(","):
                try:
                    net = build(spec, channels, size)
                    params = sum(p.numel() for p in net.parameters()) / 1e6
                    ips, flops, scan, mem = measure(net, channels, size, args.batch_size, precision, args.repeats)
                    print(f"{spec} | {space} | {precision} | {params:.2f} | {flops / 1e9:.3f} | {scan / 1e9:.3f} | "
                          f"{ips:.1f} | {mem:.0f}")
                    if args.profile:
                        print(profile(net, channels, size, args.batch_size, precision, args.repeats))
                except Exception as e:  # never skip silently: the failure is a row
                    print(f"{spec} | {space} | {precision} | FAILED: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
