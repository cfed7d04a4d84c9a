"""Packed low-bit networks against fp32 and bf16, in ONE process: a single linear layer and whole DiT forwards.

    python benchmarks/quant_speed.py --threads 2
    python benchmarks/quant_speed.py --presets DiT-S/2 DiT-B/2 --batch-size 16 --repeats 5 --threads 1

For each DiT preset (random weights, 32x32x4 latents as DiT at 256 px, no guidance) the script writes a dit-flow
pipeline folder, quantizes it with `effigen.post.quantize` (PTQ; calibration on 4 images, 2 Euler steps: speed does
not depend on the calibration) at W8A8 and W4A8, and times network forwards interleaved (fp32, bf16 autocast, W8A8,
W4A8, in turn, so a slow spell on a shared machine hits them all alike). Quantized linear layers run
`torch._int_mm` (int8 x int8 -> int32) with their activation quantization and zero-point corrections included in
the time; the patch-embedding convolution runs simulated. Also printed: the layer alone (768 -> 3072, 4096 rows),
generator folder size and peak memory (CPU RSS high-water mark) of one forward.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from effigen.bench.throughput import measure_peak_memory
from effigen.models.dit import DIT_PRESETS, DiT, DiTConfig
from effigen.nn.quant import QuantLayer, TimestepContext
from effigen.objectives.flow_matching import FlowSamplerConfig, RectifiedFlowConfig
from effigen.pipeline import Pipeline
from effigen.post.quantize import QuantizeSettings, folder_bytes, quantize


def interleaved(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each entry, timed A, B, C, A, B, C, ..."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def layer_benchmark(repeats: int) -> None:
    torch.manual_seed(0)
    M, K, N = 4096, 768, 3072
    linear = torch.nn.Linear(K, N)
    x = torch.randn(M, K)
    w_bf16, b_bf16, x_bf16 = linear.weight.bfloat16(), linear.bias.bfloat16(), x.bfloat16()
    layers = {}
    for bits in (8, 4):
        layer = QuantLayer.from_float(linear, bits, 8, 1, TimestepContext()).eval()
        layer.set_activation_params(torch.tensor(8.0 / 255), torch.tensor(128.0))
        layers[bits] = layer
    with torch.no_grad():
        calls = {"fp32": lambda: F.linear(x, linear.weight, linear.bias),
                 "bf16": lambda: F.linear(x_bf16, w_bf16, b_bf16),
                 "W8A8 int": lambda: layers[8](x), "W4A8 int": lambda: layers[4](x)}
        seconds = interleaved(calls, repeats)
    flops = 2 * M * K * N
    print(f"\nlinear {K} -> {N}, {M} rows (activation quantization and corrections included in the int rows)")
    print(f"{'':10} {'ms':>8} {'GFLOP/s':>9} {'vs fp32':>8} {'vs bf16':>8}")
    for name, s in seconds.items():
        print(f"{name:10} {s * 1e3:8.2f} {flops / s / 1e9:9.1f} {seconds['fp32'] / s:7.2f}x {seconds['bf16'] / s:7.2f}x")


def model_benchmark(preset: str, batch: int, repeats: int, root: Path) -> None:
    torch.manual_seed(0)
    config = DiTConfig(**{**DIT_PRESETS[preset], "input_size": 32, "in_channels": 4, "num_classes": 10})
    network = DiT(config).eval()
    with torch.no_grad():  # non-zero adaLN / output layers, as a trained model has
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    info = {"dataset": "random", "resolution": 32, "class_names": [str(i) for i in range(10)]}
    source = Pipeline("dit-flow", network, RectifiedFlowConfig(), FlowSamplerConfig(solver="euler", num_steps=2, cfg_scale=1.0),
                      info).save_pretrained(root / preset.replace("/", "_"))
    folders = {}
    for bits in ("w8a8", "w4a8"):
        out = root / f"{preset.replace('/', '_')}-{bits}"
        quantize(source, out, QuantizeSettings(bits=bits, mode="ptq", calib_images=4, calib_batch=4), progress=False,
                 log=lambda *_: None)
        folders[bits] = out
    quantized = {bits: Pipeline.from_pretrained(f).generator for bits, f in folders.items()}
    x, y = torch.randn(batch, 4, 32, 32), torch.arange(batch) % 10
    t = torch.full((batch,), float(quantized["w8a8"].config.time_grid[-1]))

    def forward(net, bf16=False):
        def call():
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                net(x, t, y)
        return call

    calls = {"fp32": forward(network), "bf16": forward(network, True),
             "W8A8 int": forward(quantized["w8a8"]), "W4A8 int": forward(quantized["w4a8"])}
    seconds = interleaved(calls, repeats)
    sizes = {"fp32": folder_bytes(source / "generator"), "bf16": folder_bytes(source / "generator"),
             "W8A8 int": folder_bytes(folders["w8a8"] / "generator"), "W4A8 int": folder_bytes(folders["w4a8"] / "generator")}
    memory = {name: measure_peak_memory(fn)["peak_memory_bytes"] for name, fn in calls.items()}
    params = sum(p.numel() for p in network.parameters()) / 1e6
    print(f"\n{preset} ({params:.1f}M parameters), 32x32x4 latents, batch {batch}, one forward")
    print(f"{'':10} {'img/s':>8} {'vs fp32':>8} {'vs bf16':>8} {'weights MB':>11} {'peak MB':>8}")
    for name, s in seconds.items():
        print(f"{name:10} {batch / s:8.1f} {seconds['fp32'] / s:7.2f}x {seconds['bf16'] / s:7.2f}x "
              f"{sizes[name] / 1e6:11.2f} {memory[name] / 2 ** 20:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["DiT-S/2", "DiT-B/2"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    print(f"CPU: {cpu}; threads {torch.get_num_threads()}; amx_bf16: {'amx_bf16' in flags}; "
          f"avx512_bf16: {'avx512_bf16' in flags}; avx512_vnni: {'avx512_vnni' in flags}; torch {torch.__version__}")
    layer_benchmark(args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            model_benchmark(preset, args.batch_size, args.repeats, Path(tmp))


if __name__ == "__main__":
    main()
