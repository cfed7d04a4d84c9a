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
"""

from __future__ import annotations

import argparse
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="METHOD:PRESET[:k=v,...] (repeatable)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = args.model or DEFAULT_MODELS
    print("model | space | precision | params (M) | GFLOPs/img (matmul+conv+attention) | scan GFLOPs/img (formula) | "
          "img/s | peak memory of one forward (MiB)")
    for channels, size, space in ((3, 32, "pixels 3x32x32"), (4, 32, "latents 4x32x32")):
        for spec in models:
            for precision in ("fp32", "bf16"):
                try:
                    net = build(spec, channels, size)
                    params = sum(p.numel() for p in net.parameters()) / 1e6
                    ips, flops, scan, mem = measure(net, channels, size, args.batch_size, precision, args.repeats)
                    print(f"{spec} | {space} | {precision} | {params:.2f} | {flops / 1e9:.3f} | {scan / 1e9:.3f} | "
                          f"{ips:.1f} | {mem:.0f}")
                except Exception as e:  # never skip silently: the failure is a row
                    print(f"{spec} | {space} | {precision} | FAILED: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
