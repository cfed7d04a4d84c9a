"""How well does a trained diffusion or flow model denoise, noise level by noise level?

    python benchmarks/denoising_error.py --from runs/dit-ddpm/final runs/sit/final --json denoise.json

For held-out images x_0 of the pipeline's dataset (test split; through its tokenizer for latent models), each
noise level is a signal-to-noise ratio SNR = alpha^2 / sigma^2, named by the step k of DDPM's 1000-step linear
schedule that has it (k = 999 is the noisiest). Every model sees the same x_0 and the same noise at that SNR, in
its own parameterisation:
  - DDPM (`dit-ddpm`): the step of its own schedule nearest in SNR, x_k = sqrt(ab) x_0 + sqrt(1 - ab) eps, its
    prediction converted to eps and then to x_0 = (x_k - sqrt(1 - ab) eps) / sqrt(ab);
  - flow matching (`dit-flow`, SiT, LightningDiT): the t of its path with sigma_t / alpha_t = 1 / sqrt(SNR),
    x_t = alpha_t x_0 + sigma_t eps, its prediction converted to (velocity, eps), then x_0 = (x_t - sigma_t eps) / alpha_t.
It prints the mean squared error of that x_0 estimate (class-conditional, no guidance) next to two estimates that
ignore x_t: the mean training image and the mean training image of the class. A model that is worse than the class
mean at high noise lays out an image's global shape from a wrong guess: this is how the pixel-space eps-prediction
DiT-DDPM of docs/results-30min.md fails (x_0 error 5.1 at k = 999 against 0.25 for the mean image).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from effigen.data.builtin import build_builtin_dataset
from effigen.data.datasets import DataConfig
from effigen.objectives.ddpm import GaussianDiffusion
from effigen.objectives.flow_matching import RectifiedFlow
from effigen.pipeline import Pipeline
from effigen.samplers.diffusion import DiffusionSchedule

LINEAR_STEPS = (999, 900, 800, 700, 600, 500, 400, 300, 200, 100, 20)


def dataset_tensors(pipeline: Pipeline, split: str, count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images or latents, labels) of the pipeline's built-in dataset."""
    dataset = build_builtin_dataset(DataConfig(name=pipeline.info["dataset"], resolution=pipeline.sample_shape[-1]), split)
    indices = list(range(len(dataset) if count is None else min(count, len(dataset))))
    images, labels = dataset.images(indices), dataset.labels[indices]
    if pipeline.tokenizer is not None:
        with torch.no_grad():
            images = torch.cat([pipeline.tokenizer.encode(chunk) for chunk in images.split(256)])
    return images.float(), labels


@torch.no_grad()
def x0_estimate(pipeline: Pipeline, x0: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor, snr: float):
    """The model's x_0 estimate at signal-to-noise ratio `snr`; returns (estimate, the SNR actually used)."""
    objective, network = pipeline.objective, pipeline.generator
    batch = x0.shape[0]
    if isinstance(objective, GaussianDiffusion):
        schedule = objective.schedule
        k = int(np.argmin(np.abs(np.log(schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)) - math.log(snr))))
        ab = float(schedule.alphas_cumprod[k])
        x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise
        index = torch.full((batch,), k, dtype=torch.long)
        out = network(x_t, schedule.network_time(index), labels).float()[:, : x0.shape[1]]
        eps = objective.to_noise(out, x_t, torch.tensor(ab))
        return (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab), ab / (1 - ab)
    if isinstance(objective, RectifiedFlow):
        ratio = 1 / math.sqrt(snr)  # sigma_t / alpha_t
        t_value = ratio / (1 + ratio) if objective.config.path == "linear" else 2 / math.pi * math.atan(ratio)
        t = torch.full((batch,), t_value)
        alpha, sigma, _, _ = objective.path.coefficients(t, x0.dim())
        x_t = alpha * x0 + sigma * noise
        _, eps = objective.velocity_and_noise(network(x_t, t, labels).float(), x_t, t)
        return (x_t - sigma * eps) / alpha, snr
    raise SystemExit(f"{pipeline.method.name}: only diffusion (dit-ddpm) and flow (dit-flow) pipelines have an x_0 estimate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="sources", nargs="+", required=True, help="pipeline folders")
    parser.add_argument("--num-images", type=int, default=256, help="held-out images (test split)")
    parser.add_argument("--steps", default=",".join(map(str, LINEAR_STEPS)),
                        help="noise levels, as steps of DDPM's 1000-step linear schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    linear = DiffusionSchedule.create("linear", 1000)
    steps = [int(s) for s in args.steps.split(",")]
    results = []
    for source in args.sources:
        pipeline = Pipeline.from_pretrained(source)
        pipeline.generator.eval()
        x0, labels = dataset_tensors(pipeline, "test", args.num_images)
        train, train_labels = dataset_tensors(pipeline, "train", None)
        mean = train.mean(0, keepdim=True)
        class_means = torch.stack([train[train_labels == c].mean(0) for c in range(pipeline.num_classes)])
        mean_error = ((mean - x0) ** 2).mean().item()
        class_error = ((class_means[labels] - x0) ** 2).mean().item()
        generator = torch.Generator().manual_seed(args.seed)
        print(f"\n{source} ({pipeline.method.name}, {getattr(pipeline.objective.config, 'prediction', '')}): "
              f"{len(x0)} held-out {tuple(x0.shape[1:])}; mean image {mean_error:.4f}, class mean {class_error:.4f}")
        print(f"{'k (linear)':>10}{'log SNR':>9}{'x0 MSE':>9}{'/ class mean':>13}")
        rows = []
        for k in steps:
            ab = float(linear.alphas_cumprod[k])
            noise = torch.randn(x0.shape, generator=generator)
            estimate, used = x0_estimate(pipeline, x0, noise, labels, ab / (1 - ab))
            error = ((estimate - x0) ** 2).mean().item()
            rows.append({"k": k, "log_snr": math.log(used), "x0_mse": error, "ratio_to_class_mean": error / class_error})
            print(f"{k:>10}{math.log(used):>9.2f}{error:>9.4f}{error / class_error:>13.3f}")
        results.append({"source": source, "method": pipeline.method.name, "mean_image_mse": mean_error,
                        "class_mean_mse": class_error, "levels": rows})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
