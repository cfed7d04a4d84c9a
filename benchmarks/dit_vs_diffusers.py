"""Sampling speed of effigen's DiT pipeline against diffusers' DiT (`DiTTransformer2DModel` + `DDIMScheduler`,
driven by diffusers' own `DiTPipeline`), same weights, one process.

    python benchmarks/dit_vs_diffusers.py --size DiT-B/2 --batch-size 4 --steps 10 --repeats 3 --threads 1
    python benchmarks/dit_vs_diffusers.py --size DiT-S/2 --repeats 1          # quick check

diffusers is not an effigen dependency: install it into the environment without touching torch
(`pip install -e ".[bench]"`: diffusers and the pure-python packages it imports; torch is left as it is).

The script random-initialises an official-layout DiT (facebookresearch/DiT parameter names; ImageNet-like: 1000
classes, 256 px = a 32x32x4 latent, learned sigma so 8 output channels), perturbs every parameter (the official
adaLN-Zero init would make every output 0 and the check vacuous), saves the state dict, converts it with
`effigen.convert.dit_official.convert_dit_official` and loads the effigen pipeline; it maps the same state dict
into diffusers' layout (`official_to_diffusers` below, written here) and builds diffusers' `DiTPipeline` with a
stand-in VAE whose `decode` is the identity (no VAE on either side: latents only). Then

1. checks in fp32, same noise and labels: one forward pass (effigen DiT vs diffusers transformer), and a full
   `--steps` DDIM sample with guidance through both pipelines; the relative error max|a - b| / max|b| must be below
   1e-4, else it stops;
2. times effigen fp32, diffusers fp32, effigen bf16 autocast, diffusers bf16 autocast (`torch.autocast("cpu",
   bfloat16)` around `DiTPipeline.__call__`; effigen's `precision="bf16"` is the same autocast), one warm-up each,
   the repeats interleaved (e, d, e, d, ...) so that load changes hit both alike, and prints images/s (median)
   with the ratios effigen / diffusers and bf16 / fp32.

Two diffusers conventions differ from the official DiT and are aligned for the check (neither changes the cost):
- its timestep embedding divides the frequency exponent by 127 instead of 128 (`downscale_freq_shift=1`); the
  benchmark sets `downscale_freq_shift = 0` on every block so both compute the official DiT features;
- its DDIM takes timesteps 900, 800, ..., 0 for 10 steps ('leading' spacing: the previous step is t - 1000 // K),
  effigen's respacing 999, 888, ..., 0; for the whole run effigen's schedule is given diffusers' kept timesteps
  (`same_timesteps`), so both denoise the same trajectory with the same cost.
Guidance: scale --cfg on the 4 latent (epsilon) channels in both (diffusers guides all latent channels; effigen's
cfg_channels=4 does the same; the official DiT's first-3-channel quirk is not used).

--profile prints the top CPU ops of one fp32 and one bf16 call of each side (torch.profiler).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from effigen.bench.throughput import count_flops, environment, measure_matmul_peak
from effigen.runtime import tune_cpu_allocator
from effigen.convert.dit_official import OFFICIAL_HEADS, convert_dit_official
from effigen.models.dit import DIT_PRESETS, DiT, DiTConfig
from effigen.objectives import ddpm as ddpm_module
from effigen.pipeline import Pipeline
from effigen.samplers.diffusion import DiffusionSchedule, beta_schedule


def import_diffusers():
    try:
        import diffusers
        from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    except ImportError as e:
        raise SystemExit(f"diffusers is needed for this benchmark ({e}); install it without touching torch: "
                         "pip install -e \".[bench]\" (diffusers and its pure-python imports)") from None
    return diffusers, DiTTransformer2DModel, DDIMScheduler, DiTPipeline


def official_state_dict(size: str, num_classes: int, latent: int, channels: int, seed: int) -> dict[str, torch.Tensor]:
    """A random official-layout DiT state dict (learned sigma), every parameter perturbed away from the zero init."""
    preset = DIT_PRESETS[size]
    config = DiTConfig(input_size=latent, in_channels=channels, num_classes=num_classes, learn_sigma=True,
                       **{k: v for k, v in preset.items() if k in ("depth", "hidden_size", "num_heads", "patch_size")})
    torch.manual_seed(seed)
    network = DiT(config)  # effigen keeps the official names and init
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return {k: v.clone() for k, v in network.state_dict().items()}


def official_to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """facebookresearch/DiT names -> diffusers DiTTransformer2DModel names. diffusers keeps a copy of the timestep
    and label embedders in every block's AdaLayerNormZero (`norm1.emb`); the final layer uses block 0's."""
    out = {"pos_embed.proj.weight": state["x_embedder.proj.weight"],
           "pos_embed.proj.bias": state["x_embedder.proj.bias"],
           "proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": state["final_layer.linear.weight"], "proj_out_2.bias": state["final_layer.linear.bias"]}
    for i in range(depth):
        o, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = d + "norm1.emb."
        out[emb + "timestep_embedder.linear_1.weight"] = state["t_embedder.mlp.0.weight"]
        out[emb + "timestep_embedder.linear_1.bias"] = state["t_embedder.mlp.0.bias"]
        out[emb + "timestep_embedder.linear_2.weight"] = state["t_embedder.mlp.2.weight"]
        out[emb + "timestep_embedder.linear_2.bias"] = state["t_embedder.mlp.2.bias"]
        out[emb + "class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
        out[d + "norm1.linear.weight"] = state[o + "adaLN_modulation.1.weight"]  # same chunk order
        out[d + "norm1.linear.bias"] = state[o + "adaLN_modulation.1.bias"]
        for part, w, b in zip(("to_q", "to_k", "to_v"), state[o + "attn.qkv.weight"].chunk(3, 0),
                              state[o + "attn.qkv.bias"].chunk(3, 0)):  # qkv rows: q, then k, then v
            out[d + f"attn1.{part}.weight"], out[d + f"attn1.{part}.bias"] = w.clone(), b.clone()
        out[d + "attn1.to_out.0.weight"] = state[o + "attn.proj.weight"]
        out[d + "attn1.to_out.0.bias"] = state[o + "attn.proj.bias"]
        out[d + "ff.net.0.proj.weight"] = state[o + "mlp.fc1.weight"]
        out[d + "ff.net.0.proj.bias"] = state[o + "mlp.fc1.bias"]
        out[d + "ff.net.2.weight"] = state[o + "mlp.fc2.weight"]
        out[d + "ff.net.2.bias"] = state[o + "mlp.fc2.bias"]
    return {k: v.clone() for k, v in out.items()}


class IdentityVAE(nn.Module):
    """Stands in for DiTPipeline's AutoencoderKL: `decode` hands the latents back (and keeps them for the check)."""

    class _Config(dict):
        scaling_factor = 1.0

    class _Out:
        def __init__(self, sample):
            self.sample = sample

    def __init__(self):
        super().__init__()
        self.config = self._Config()
        self.last = None

    device = property(lambda self: torch.device("cpu"))  # what a diffusers ModelMixin reports
    dtype = property(lambda self: torch.float32)

    def decode(self, latents):
        self.last = latents
        return self._Out(torch.zeros_like(latents))  # DiTPipeline clamps (x / 2 + 0.5) to [0, 1]: keep latents apart


@contextlib.contextmanager
def same_timesteps(kept: list[int]):
    """effigen's DDPM objective samples over `kept` original timesteps instead of its own respacing."""
    original = ddpm_module.DiffusionSchedule

    class Fixed(DiffusionSchedule):
        @classmethod
        def create(cls, name, num_timesteps, num_steps=None):
            if num_steps is None or num_steps == num_timesteps:
                return original.create(name, num_timesteps, num_steps)
            if num_steps != len(kept):
                raise ValueError(f"fixed schedule has {len(kept)} steps, asked for {num_steps}")
            alphas_cumprod = np.cumprod(1.0 - beta_schedule(name, num_timesteps))
            betas, last = [], 1.0
            for k in kept:
                betas.append(1 - alphas_cumprod[k] / last)
                last = alphas_cumprod[k]
            return original(np.array(betas), np.array(kept), num_timesteps)

    ddpm_module.DiffusionSchedule = Fixed
    try:
        yield
    finally:
        ddpm_module.DiffusionSchedule = original


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def profile(name: str, fn, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n--- profile: {name} ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    tune_cpu_allocator()  # as the effigen CLI; EFFIGEN_CPU_ALLOCATOR=default keeps glibc's thresholds (both sides share it)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="DiT-B/2", choices=[k for k in DIT_PRESETS if k.startswith("DiT-")
                                                              and DIT_PRESETS[k]["hidden_size"] in OFFICIAL_HEADS])
    parser.add_argument("--latent-size", type=int, default=32, help="latent grid (32 = 256 px through the SD VAE)")
    parser.add_argument("--num-classes", type=int, default=1000, help="diffusers' DiTPipeline hard-codes null id 1000")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--cfg", type=float, default=4.0, help="guidance scale (diffusers' DiTPipeline default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--skip-fp32", action="store_true", help="time the bf16 pair only (the fp32 check still runs)")
    parser.add_argument("--peak-size", type=int, default=4096, help="square GEMM of the matmul peak measurement")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of one call per row")
    args = parser.parse_args()
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    diffusers, DiTTransformer2DModel, DDIMScheduler, DiTPipeline = import_diffusers()
    if args.num_classes != 1000:
        raise SystemExit("diffusers' DiTPipeline uses 1000 as the null class: keep --num-classes 1000")
    C, B, K = 4, args.batch_size, args.steps

    # --- the same weights on both sides
    state = official_state_dict(args.size, args.num_classes, args.latent_size, C, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / "dit.pt")
        folder = convert_dit_official(Path(tmp) / "dit.pt", Path(tmp) / "effigen", num_steps=K, cfg_scale=args.cfg)
        pipeline = Pipeline.from_pretrained(folder)
    config = pipeline.generator.config
    heads, width, depth = config.num_heads, config.hidden_size, config.depth
    transformer = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=C,
                                       out_channels=2 * C, num_layers=depth, sample_size=args.latent_size,
                                       patch_size=config.patch_size, num_embeds_ada_norm=args.num_classes,
                                       norm_eps=1e-6)  # official DiT's LayerNorm eps (diffusers' default: 1e-5)
    missing, unexpected = transformer.load_state_dict(official_to_diffusers(state, depth), strict=False)
    if missing or unexpected:
        raise SystemExit(f"key mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # official DiT frequencies (diffusers: 1)
    transformer.eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                              prediction_type="epsilon")
    vae = IdentityVAE()
    dpipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    dpipe.set_progress_bar_config(disable=True)
    scheduler.set_timesteps(K)
    kept = sorted(int(t) for t in scheduler.timesteps)
    params = sum(p.numel() for p in pipeline.generator.parameters())
    dparams = sum(p.numel() for p in transformer.parameters())
    print(f"{args.size}: depth {depth}, width {width}, heads {heads}, patch {config.patch_size}, {params / 1e6:.1f} M "
          f"parameters (diffusers {dparams / 1e6:.1f} M: one timestep/label embedder copy per block); latent "
          f"{C}x{args.latent_size}x{args.latent_size} ({(args.latent_size // config.patch_size) ** 2} tokens), "
          f"{args.num_classes} classes, learned sigma; random weights; diffusers {diffusers.__version__}")
    print(f"batch {B}, {K} DDIM steps (timesteps {kept[::-1][:3]}...{kept[0]}), guidance {args.cfg} on the 4 latent "
          f"channels, latents only (no VAE)")

    labels = torch.randint(0, args.num_classes, (B,), generator=torch.Generator().manual_seed(args.seed))

    def effigen(precision: str) -> torch.Tensor:
        return pipeline(labels, seed=args.seed, batch_size=B, precision=precision, output_type="latent",
                        num_steps=K, cfg_scale=args.cfg, cfg_channels=C, solver="ddim", eta=0.0)

    def diffusers_call(precision: str) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            dpipe(class_labels=labels.tolist(), guidance_scale=args.cfg, num_inference_steps=K,
                  generator=torch.Generator().manual_seed(args.seed), output_type="pt")
        return vae.last.float()

    with same_timesteps(kept):
        # --- 1. agreement, fp32
        x = torch.randn(2 * B, C, args.latent_size, args.latent_size, generator=torch.Generator().manual_seed(1))
        k = torch.tensor([kept[-1 - (i % K)] for i in range(2 * B)])  # integer DDPM steps
        y = torch.cat([labels, torch.full_like(labels, args.num_classes)])
        with torch.no_grad():
            ours = pipeline.generator(x, k.float() / 1000, y)
            theirs = transformer(x, timestep=k, class_labels=y).sample
        forward_error = relative_error(ours, theirs)
        generator = torch.Generator().manual_seed(args.seed)
        noise_same = torch.equal(torch.stack([torch.randn((C, args.latent_size, args.latent_size), generator=generator)
                                              for _ in range(B)]),
                                 torch.randn((B, C, args.latent_size, args.latent_size),
                                             generator=torch.Generator().manual_seed(args.seed)))
        sample_error = relative_error(effigen("fp32"), diffusers_call("fp32"))
        print(f"fp32 check: one forward (2B = {2 * B} inputs, timesteps {k.tolist()}, labels and null): "
              f"max|effigen - diffusers| / max|diffusers| = {forward_error:.2e}; full {K}-step guided DDIM "
              f"sample from the same noise (same seed, noise identical: {noise_same}): {sample_error:.2e} (limit 1e-4)")
        if not noise_same or forward_error > 1e-4 or sample_error > 1e-4:
            raise SystemExit("effigen and diffusers disagree: not timing")

        # --- 2. speed
        rows = {} if args.skip_fp32 else {"effigen fp32": lambda: effigen("fp32"),
                                            "diffusers fp32": lambda: diffusers_call("fp32")}
        if not args.skip_bf16:
            bf16_error = relative_error(effigen("bf16"), diffusers_call("bf16"))
            print(f"bf16 autocast: max|effigen - diffusers| / max|diffusers| = {bf16_error:.2e} (rounding only; "
                  f"not checked)")
            rows.update({"effigen bf16": lambda: effigen("bf16"), "diffusers bf16": lambda: diffusers_call("bf16")})
        if args.profile:
            for name, fn in rows.items():
                profile(name, fn)
        # useful FLOPs: matrix products and attention of effigen's fp32 call (the same network on both sides)
        flops, _ = count_flops(lambda: effigen("bf16" if args.skip_fp32 else "fp32"))  # fused linears counted too
        peaks = {p: measure_matmul_peak(p, "cpu", args.peak_size, 2.0) for p in {n.split()[1] for n in rows}}
        times: dict[str, list[float]] = {name: [] for name in rows}
        for fn in rows.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in rows.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    env = environment("cpu")
    print(f"torch {env['torch_version']}, {env['threads']} threads, {env.get('cpu_name', '?')}, allocator {env['cpu_allocator']}; {args.repeats} repeats "
          f"(median), 1 warm-up, rows interleaved")
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"useful FLOPs {flops / B / 1e9:.1f} GFLOP/image (counted on one effigen call); matmul peak "
          + ", ".join(f"{p} {v / 1e12:.3f} TFLOP/s" for p, v in sorted(peaks.items())) + f" ({args.peak_size}^3 GEMM)")
    print(f"{'run':<18}{'images/s':>10}{'s/batch':>10}{'min..max s':>16}{'% of peak':>11}{'x diffusers':>13}{'x fp32':>9}")
    for name, seconds in median.items():
        side, precision = name.split()
        theirs = median.get(f"diffusers {precision}")
        versus = f"{theirs / seconds:.2f}" if theirs else "-"
        fp32 = f"{median[f'{side} fp32'] / seconds:.2f}" if f"{side} fp32" in median else "-"
        spread = f"{min(times[name]):.2f}..{max(times[name]):.2f}"
        fraction = 100 * flops / seconds / peaks[precision]
        print(f"{name:<18}{B / seconds:>10.3f}{seconds:>10.2f}{spread:>16}{fraction:>10.1f}%{versus:>13}{fp32:>9}")


if __name__ == "__main__":
    main()
