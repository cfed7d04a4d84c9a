"""HMAR against VAR at equal parameter count on the same token schedule, in one process: training step time,
sampling images/s and peak sampling memory, with the ratios the HMAR paper claims (training >= 2.5x faster,
sampling >= 1.75x faster, sampling memory >= 3x lower; measured there on an A100 with Triton block-sparse kernels).

    python benchmarks/hmar_vs_var.py                                   # VAR-d16 vs a parameter-matched HMAR, 256 px
    python benchmarks/hmar_vs_var.py --depth 2 --batch-size 2 --train-batch-size 2 --repeats 1 --warmup 0  # quick check
    python benchmarks/hmar_vs_var.py --match none --depth 16           # HMAR-d16 (467M) vs VAR-d16 (310M), as released

Weights are random (speed and memory do not depend on the values). Sizes:

- VAR: depth D, width 64 D, D heads (`VAR-dD`).
- HMAR (`--match width`, default): the same depth D and heads, n_layers_train = D / 2 (the released d16's split), the
  width (a multiple of the head count) whose total parameter count (trunk + both branches + both heads) is closest
  to VAR's; its next-scale path has VAR's D blocks at a narrower width. `--match none`: HMAR-dD's own width 64 D
  (n_layers_train min(8, D / 2)), i.e. ~1.5x VAR's parameters at D = 16, as the released models compare.
- Token schedule: VAR/HMAR's 256 px (1, 2, 3, 4, 5, 6, 8, 10, 13, 16; 680 tokens), 4096 codes, Cvae 32.
  The tokenizer only matters for sampling (it decodes the image at the end, the same work for both): by default a
  small VQVAE with VAR's layout (ch 32) so that the figures are the generators'; `--tokenizer-ch 160` uses the
  released tokenizer's size.

Measured:

1. training step: forward + backward of the teacher-forced pass (random teacher input and targets, cross-entropy,
   `--train-batch-size`, `--precision`), the two models interleaved, median over `--repeats` after `--warmup`:
   VAR (block-causal attention, `BlockMask`), HMAR stage 1 (next-scale branch, block-diagonal attention) and HMAR
   stage 2 (mask branch; only it trains).
2. sampling: the generation of the latent f_hat (`pipeline(..., output_type="latent")`; with `--with-decoding` whole
   pipeline calls through `effigen.bench.throughput.benchmark_runs`), interleaved, median; peak memory = the call's
   RSS high-water mark on CPU, `max_memory_allocated` on CUDA (`measure_peak_memory`); FLOPs by `count_flops`. VAR
   with its KV cache against HMAR with the official default schedule (2x2 in 2 steps, 3x3 in 4; mask steps with the official near-zero guidance) and
   HMAR without refinement (`--schedule off`). Guidance cfg 1.5 (cfg_scale 2.5), top-k 900, top-p 0.96.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from effigen.bench.throughput import benchmark_runs, count_flops, environment, measure_peak_memory
from effigen.runtime import tune_cpu_allocator
from effigen.models.hmar import HMAR, HMARConfig
from effigen.models.var import VAR, VARConfig
from effigen.nn.losses import token_cross_entropy
from effigen.objectives.hmar import HMARObjectiveConfig
from effigen.objectives.next_scale import NextScaleConfig
from effigen.pipeline import Pipeline
from effigen.samplers.hmar import HMARSamplerConfig, single_step_schedule
from effigen.samplers.next_scale import NextScaleSamplerConfig
from effigen.tokenizers.msvq import VAR_SCALES, MultiScaleVQ, MultiScaleVQConfig


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(args) -> tuple[VARConfig, HMARConfig]:
    shapes = dict(num_classes=args.num_classes, vocab_size=args.vocab, latent_channels=32, scales=VAR_SCALES[256])
    var = VARConfig(depth=args.depth, **shapes)
    if args.match == "none":  # HMAR-dD as released (n_layers_train 8 at depth >= 16)
        return var, HMARConfig(depth=args.depth, n_layers_train=args.n_layers_train, **shapes)
    n = args.n_layers_train or max(1, args.depth // 2)
    target = count(VAR(var))
    heads = args.depth

    def hmar_config(head_dim: int) -> HMARConfig:
        return HMARConfig(depth=args.depth, n_layers_train=n, embed_dim=heads * head_dim, num_heads=heads, **shapes)

    # the parameter count is a quadratic in the width: fit it on three small widths, then pick the closest head size
    xs = (1, 2, 3)
    ys = [count(HMAR(hmar_config(x))) for x in xs]
    a = (ys[2] - 2 * ys[1] + ys[0]) / 2
    b = ys[1] - ys[0] - a * 3
    c = ys[0] - a - b
    head_dim = min(range(1, 257), key=lambda x: abs(a * x * x + b * x + c - target))
    return var, hmar_config(head_dim)


def training_step_times(networks: dict, args, device) -> dict[str, float]:
    """Median seconds of forward + backward per model, interleaved."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    B = args.train_batch_size
    generator = torch.Generator().manual_seed(0)
    some = next(iter(networks.values()))[0]
    L, C, V = some.config.num_tokens, some.config.latent_channels, some.config.vocab_size
    labels = torch.randint(0, args.num_classes, (B,), generator=generator).to(device)
    teacher = torch.randn(B, L - 1, C, generator=generator).to(device)
    current = torch.randn(B, L - 1, C, generator=generator).to(device)
    target = torch.randint(0, V, (B, L), generator=generator).to(device)
    masked = torch.rand(B, L, generator=generator).to(device) < 0.5
    masked[:, 0] = False

    def step(network, stage):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = network(labels, teacher) if stage != "mask" else network(labels, teacher, current, masked)
        loss = token_cross_entropy(logits, target)  # the objectives' loss (C passes in bf16 CPU training)
        loss.backward()
        for p in network.parameters():
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {name: [] for name in networks}
    for repeat in range(args.warmup + args.repeats):
        for name, (network, stage) in networks.items():
            started = time.perf_counter()
            step(network, stage)
            if repeat >= args.warmup:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def sample_latents(runs: dict, args) -> list[dict]:
    """images/s, peak memory and FLOPs of `pipeline(..., output_type="latent")` (the generator's work), interleaved."""
    labels = torch.arange(args.batch_size) % args.num_classes
    calls = []
    for pipeline in runs.values():
        def call(pipeline=pipeline):
            pipeline(labels, seed=0, batch_size=args.batch_size, precision=args.precision, output_type="latent")
            if pipeline.device.type == "cuda":
                torch.cuda.synchronize(pipeline.device)
        calls.append(call)
    for _ in range(args.warmup):
        for call in calls:
            call()
    times = [[] for _ in calls]
    for _ in range(args.repeats):
        for i, call in enumerate(calls):
            started = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - started)
    results = []
    for pipeline, call, seconds in zip(runs.values(), calls, times):
        flops, _ = count_flops(call)
        results.append({"images_per_second": args.batch_size / statistics.median(seconds), "latencies_s": seconds,
                        **measure_peak_memory(call, pipeline.device), "flops_per_image": flops / args.batch_size,
                        "evaluations_per_image": pipeline.number_of_evaluations()})
    return results


def main() -> None:
    tune_cpu_allocator()  # as the effigen CLI; EFFIGEN_CPU_ALLOCATOR=default keeps glibc's thresholds (both sides share it)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--n-layers-train", type=int, default=0, help="HMAR branch depth (default: depth / 2)")
    parser.add_argument("--match", choices=["width", "none"], default="width")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokenizer-ch", type=int, default=32, help="VQVAE base channels (the release: 160)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per sampling call")
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--with-decoding", action="store_true", help="time whole pipeline calls (decoding included)")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    var_config, hmar_config = build(args)
    var, hmar = VAR(var_config).to(device), HMAR(hmar_config).to(device)
    params = {"var": count(var), "hmar": count(hmar), "hmar_next_scale_path": count(hmar) - sum(
        p.numel() for name, p in hmar.named_parameters() if name.startswith(("mask_blocks.", "mask_head", "mask_embed")))}
    report = {"environment": environment(device), "args": vars(args), "parameters": params,
              "var_config": {"depth": var_config.depth, "width": var_config.embed_dim, "heads": var_config.num_heads},
              "hmar_config": {"depth": hmar_config.depth, "width": hmar_config.embed_dim, "heads": hmar_config.num_heads,
                              "n_layers_train": hmar_config.n_layers_train}}
    print(f"VAR-d{var_config.depth}: width {var_config.embed_dim}, {params['var'] / 1e6:.2f}M parameters")
    print(f"HMAR d{hmar_config.depth} (n_layers_train {hmar_config.n_layers_train}): width {hmar_config.embed_dim}, "
          f"{params['hmar'] / 1e6:.2f}M parameters ({params['hmar'] / params['var']:.3f}x VAR; next-scale path "
          f"{params['hmar_next_scale_path'] / 1e6:.2f}M)")
    print(f"token schedule {var_config.scales} ({var_config.num_tokens} tokens), {args.precision}, device {device}, "
          f"{torch.get_num_threads()} threads")

    if not args.skip_training:
        var.train(), hmar.train()
        stage2 = HMAR(hmar_config).to(device).train()
        stage2.load_state_dict(hmar.state_dict())
        hmar.set_trainable("next_scale"), stage2.set_trainable("mask")
        times = training_step_times({"var": (var, "var"), "hmar_stage1": (hmar, "next_scale"),
                                     "hmar_stage2": (stage2, "mask")}, args, device)
        del stage2
        report["training_step_seconds"] = times
        report["training_speedup_stage1"] = times["var"] / times["hmar_stage1"]
        print(f"\ntraining step (forward + backward, batch {args.train_batch_size}, median of {args.repeats}):")
        for name, seconds in times.items():
            print(f"  {name:<12} {seconds * 1000:9.1f} ms   VAR / this = {times['var'] / seconds:.2f}x")

    if not args.skip_sampling:
        var.eval(), hmar.eval()
        tokenizer = MultiScaleVQ(MultiScaleVQConfig(base_channels=args.tokenizer_ch, vocab_size=args.vocab,
                                                    scales=VAR_SCALES[256], resolution=256)).to(device).eval()
        info = {"class_names": [str(i) for i in range(args.num_classes)]}
        common = dict(cfg_scale=2.5, top_k=900, top_p=0.96)
        runs = {
            "var (KV cache)": Pipeline("var", var, NextScaleConfig(), NextScaleSamplerConfig(**common), info, tokenizer),
            "hmar (default schedule)": Pipeline("hmar", hmar, HMARObjectiveConfig(stage="mask"),
                                                HMARSamplerConfig(**common), info, tokenizer),
            "hmar (no refinement)": Pipeline("hmar", hmar, HMARObjectiveConfig(stage="mask"),
                                             HMARSamplerConfig(**common, mask_schedule=single_step_schedule(VAR_SCALES[256])),
                                             info, tokenizer),
        }
        if args.with_decoding:
            results = benchmark_runs([(p, args.precision) for p in runs.values()], args.batch_size, args.repeats,
                                     args.warmup)
            what = "whole pipeline call incl. decoding"
        else:
            results = sample_latents(runs, args)
            what = "generation of the latent f_hat, no decoding"
        report["sampling"] = {name: {k: v for k, v in r.items() if k != "flops_by_op_per_image"}
                              for name, r in zip(runs, results)}
        base = results[0]
        print(f"\nsampling ({what}; batch {args.batch_size}, median of {args.repeats}):")
        print(f"  {'':<24} {'images/s':>9} {'x VAR':>6} {'peak MiB':>9} {'VAR / this':>10} {'GFLOP/img':>10} {'passes':>6}")
        for name, r in zip(runs, results):
            print(f"  {name:<24} {r['images_per_second']:9.2f} {r['images_per_second'] / base['images_per_second']:6.2f} "
                  f"{r['peak_memory_bytes'] / 2**20:9.1f} {base['peak_memory_bytes'] / max(r['peak_memory_bytes'], 1):10.2f} "
                  f"{r['flops_per_image'] / 1e9:10.2f} {r['evaluations_per_image']:6d}")
        report["sampling_speedup"] = results[1]["images_per_second"] / base["images_per_second"]
        report["sampling_memory_reduction"] = base["peak_memory_bytes"] / max(results[1]["peak_memory_bytes"], 1)
        print(f"  memory: {results[0]['memory_method']}")

    print("\npaper targets: training >= 2.5x, sampling >= 1.75x, sampling memory >= 3x lower (A100, Triton kernels)")
    summary = {k: round(report[k], 3) for k in ("training_speedup_stage1", "sampling_speedup", "sampling_memory_reduction")
               if k in report}
    print(f"measured: {summary}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
    main()
