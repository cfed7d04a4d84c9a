"""Per-op profile and roofline figures of one sampling call of a random-weight network, in this process.

    python benchmarks/profile_sampling.py --model VAR-d16 --precision bf16 --batch-size 16
    python benchmarks/profile_sampling.py --model DiT-B/2 --precision bf16 --batch-size 16 --steps 2
    python benchmarks/profile_sampling.py --model all --precision bf16 --no-table      # fraction of peak of every model

For each model: the matmul peak of this machine in the precision (`measure_matmul_peak`, all torch threads, a
--peak-size square GEMM; with --model all re-measured before every model, the largest value so far used), the FLOPs of one call (`count_flops`: matrix products and attention only), the median
wall time of --repeats calls after one warm-up, achieved FLOP/s and its fraction of the peak, then (unless
--no-table) torch.profiler's per-op table of one more call sorted by self CPU time, and the share of the call spent
in matrix products / attention ("matmul time") against everything else.

Models (random weights; speed does not depend on the values):
- DiT-B/2, DiT-XL/2, LightningDiT-B/2: latent 4x32x32 (256 px through an f8 VAE), 1000 classes, learned sigma off,
  `dit-flow` Euler sampling with guidance 4 (2 network passes of batch B per step), --steps steps, latents only.
- VAR-d16 / HMAR-d16: the 256 px schedule (680 tokens), 4096 codes, cfg 1.5, top-k 900, top-p 0.96, the generation
  of the latent f_hat (output_type="latent": no VQVAE decoding). HMAR-d16 is the released size (width 1024).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch

from effigen.bench.throughput import count_flops, environment, measure_matmul_peak
from effigen.runtime import tune_cpu_allocator
from effigen.models.dit import DIT_PRESETS, DiT, DiTConfig
from effigen.objectives.flow_matching import FlowSamplerConfig, RectifiedFlowConfig
from effigen.pipeline import Pipeline

MODELS = ("DiT-B/2", "DiT-XL/2", "LightningDiT-B/2", "VAR-d16", "HMAR-d16")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
              "aten::convolution", "aten::mkldnn_convolution", "aten::_convolution", "aten::_int_mm")
MATMUL_SELF = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm", "aten::mkldnn_convolution",
               "aten::_scaled_dot_product_flash_attention_for_cpu",
               "mkldnn::_linear_pointwise", "mkldnn::_linear_pointwise.binary",  # effigen's fused bf16 linears
               "effigen::attention")  # effigen's attention kernel (nn/cpu_kernels.py)


def build(name: str, steps: int) -> tuple[Pipeline, dict]:
    info = {"class_names": [str(i) for i in range(1000)]}
    torch.manual_seed(0)
    if name.startswith(("DiT", "LightningDiT")):
        preset = DIT_PRESETS[name]
        network = DiT(DiTConfig(input_size=32, in_channels=4, num_classes=1000, **preset))
        with torch.no_grad():  # adaLN-Zero would make every block the identity
            for p in network.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        pipeline = Pipeline("dit-flow", network, RectifiedFlowConfig(),
                            FlowSamplerConfig(solver="euler", num_steps=steps, cfg_scale=4.0), info)
        return pipeline, {"output_type": "latent"}
    from effigen.tokenizers.msvq import VAR_SCALES, MultiScaleVQ, MultiScaleVQConfig

    tokenizer = MultiScaleVQ(MultiScaleVQConfig(base_channels=32, vocab_size=4096, scales=VAR_SCALES[256],
                                                resolution=256)).eval()
    common = dict(cfg_scale=2.5, top_k=900, top_p=0.96)
    if name == "VAR-d16":
        from effigen.models.var import VAR, VARConfig
        from effigen.objectives.next_scale import NextScaleConfig
        from effigen.samplers.next_scale import NextScaleSamplerConfig

        network = VAR(VARConfig(depth=16, num_classes=1000, vocab_size=4096, scales=VAR_SCALES[256]))
        return Pipeline("var", network, NextScaleConfig(), NextScaleSamplerConfig(**common), info, tokenizer), \
            {"output_type": "latent"}
    if name == "HMAR-d16":
        from effigen.models.hmar import HMAR, HMARConfig
        from effigen.objectives.hmar import HMARObjectiveConfig
        from effigen.samplers.hmar import HMARSamplerConfig

        network = HMAR(HMARConfig(depth=16, num_classes=1000, vocab_size=4096, scales=VAR_SCALES[256]))
        return Pipeline("hmar", network, HMARObjectiveConfig(stage="mask"), HMARSamplerConfig(**common), info,
                        tokenizer), {"output_type": "latent"}
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def main() -> None:
    tune_cpu_allocator()  # as the effigen CLI; EFFIGEN_CPU_ALLOCATOR=default keeps glibc's thresholds (both sides share it)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="VAR-d16", help=f"one of {', '.join(MODELS)}, or all")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="DiT-family sampling steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--peak-size", type=int, default=4096)
    parser.add_argument("--no-table", action="store_true", help="skip the torch.profiler table")
    args = parser.parse_args()
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment("cpu")
    print(f"{env['cpu_name']}, {env['threads']} threads, torch {env['torch_version']}, allocator {env['cpu_allocator']}")
    peak = measure_matmul_peak(args.precision, "cpu", args.peak_size, 2.0)
    print(f"matmul peak {args.precision} ({args.peak_size}^3 GEMM, {env['threads']} threads): {peak / 1e12:.3f} TFLOP/s")
    B = args.batch_size
    labels = torch.arange(B) % 1000
    for name in (MODELS if args.model == "all" else [args.model]):
        pipeline, extra = build(name, args.steps)

        def call():
            return pipeline(labels, seed=0, batch_size=B, precision=args.precision, **extra)

        call()
        # the peak again right before this model's timing: on a shared VM it drifts by 20-30% within minutes
        peak = max(peak, measure_matmul_peak(args.precision, "cpu", args.peak_size, 2.0)) if args.model == "all" else peak
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        flops, _ = count_flops(call)
        achieved = flops / seconds
        print(f"\n{name} {args.precision} batch {B}: {seconds:.3f} s/call (min {min(times):.3f}), "
              f"{B / seconds:.3f} images/s, {flops / B / 1e9:.1f} GFLOP/image, {achieved / 1e12:.3f} TFLOP/s = "
              f"{100 * achieved / peak:.1f}% of peak ({peak / 1e12:.3f})", flush=True)
        if args.no_table:
            continue
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        averages = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in averages)
        matmul = sum(e.self_cpu_time_total for e in averages if e.key in MATMUL_SELF)
        print(f"profile: matrix products + attention kernels {100 * matmul / max(total, 1):.1f}% of self CPU time; "
              f"everything else {100 * (total - matmul) / max(total, 1):.1f}%")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
