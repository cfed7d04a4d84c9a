"""LowDiff: sampling with a low-resolution condition (Xu et al., arXiv 2509.15342), as a flow-matching cascade.

One network (models/lowdiff.py) generates at increasing resolutions r_0 < r_1 < ... < r_K = final. Stage 0 is
plain (class-conditional) generation at r_0; stage k > 0 generates at r_k conditioned on up(x_{k-1}), the previous
stage's result upsampled bilinearly. The flow is effigen's (objectives/flow_matching.py, t = 0 data, t = 1 noise):
    x_t = alpha_t x0_k + sigma_t eps,  x0_k = avgpool(x0, final / r_k),  loss_k = || f(x_t, t, y, k, c) - v ||^2,
    loss = sum_k w_k loss_k / sum_k w_k   (every stage on every batch).
Conditioning modes (the paper's abstract does not say which it uses; both are effigen's readings, switched by
`network.mode`):
- "concat": c = (1 - s) up(x0_{k-1}) + s eps' with s ~ U(0, cond_aug_max) in training (cascaded-diffusion
  conditioning augmentation, Ho et al. 2106.15282) and s = sampler.cond_aug at sampling; c, the stage and s are
  network inputs. Each stage integrates from t = 1.
- "init": no condition input; stage k > 0 starts from x_{t*} = (1 - t*) up(x_{k-1}) + t* eps (SDEdit-style) at
  t* = sampler.start_time and integrates t* -> 0, so its steps are fewer for the same grid spacing. In training the
  stages k > 0 sample t in [0, train_start_time] only.
Per-stage step budgets: `sampler.stage_steps` (one per stage). Stage loss weights `stage_weights` (the paper's
"resolution-specific loss adjustments" are not public: default equal weights). Resolutions, the upsampling
(bilinear), downsampling (average pooling), cond_aug_max 0.3, sampling s 0.1 and t* 0.6 are effigen's choices.
Latent space: the objective sees latents as images (DiT + KL-VAE style, tokenizers/base.py), resolutions then count
latent cells.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..rng import BatchRandom
from ..samplers import SOLVERS, guided_evaluations, guided_prediction, make_time_grid
from .flow_matching import FlowSamplerConfig, RectifiedFlow, RectifiedFlowConfig


@dataclass
class LowDiffObjectiveConfig(RectifiedFlowConfig):
    cond_aug_max: float = 0.3  # concat: training noise level of the condition, s ~ U(0, cond_aug_max)
    train_start_time: float = 0.6  # init: stages > 0 train on t in [0, train_start_time]
    stage_weights: tuple[float, ...] | None = None  # loss weight per stage; None = equal

    def __post_init__(self):
        if not 0 <= self.cond_aug_max < 1:
            raise ValueError(f"cond_aug_max must be in [0, 1), got {self.cond_aug_max}")
        if not 0 < self.train_start_time <= 1:
            raise ValueError(f"train_start_time must be in (0, 1], got {self.train_start_time}")
        if self.stage_weights is not None and (not self.stage_weights or min(self.stage_weights) < 0
                                               or sum(self.stage_weights) <= 0):
            raise ValueError(f"stage_weights {self.stage_weights} must be non-negative with a positive sum")


@dataclass
class LowDiffSamplerConfig(FlowSamplerConfig):
    stage_steps: tuple[int, ...] | None = None  # steps per stage, low to high; None = num_steps at every stage
    cond_aug: float = 0.1  # concat: noise level s of the condition at sampling
    start_time: float = 0.6  # init: t* where stages > 0 start from the noised upsample

    def __post_init__(self):
        super().__post_init__()
        if self.stage_steps is not None:
            self.stage_steps = tuple(self.stage_steps)
            if not self.stage_steps or any(int(n) != n or n < 1 for n in self.stage_steps):
                raise ValueError(f"stage_steps {list(self.stage_steps)} must be positive integers, one per stage")
        if not 0 <= self.cond_aug < 1:
            raise ValueError(f"cond_aug must be in [0, 1), got {self.cond_aug}")
        if not 0 < self.start_time <= 1:
            raise ValueError(f"start_time must be in (0, 1], got {self.start_time}")

    def steps_for(self, num_stages: int) -> tuple[int, ...]:
        if self.stage_steps is None:
            return (self.num_steps,) * num_stages
        if len(self.stage_steps) != num_stages:
            raise ConfigError(f"sampler.stage_steps has {len(self.stage_steps)} entries but the cascade has {num_stages} stages; "
                             "give one step budget per resolution, low to high")
        return self.stage_steps


def downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.avg_pool2d(x, x.shape[-1] // size)


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class LowDiffCascade:
    """The cascade objective: `loss(model, batch, random)` and `sample(model, labels, shape, sampler, generator)`."""

    config_class = LowDiffObjectiveConfig
    sampler_config_class = LowDiffSamplerConfig
    evaluations_need_model = True  # the stages (resolutions, mode) are the network's config

    def __init__(self, config: LowDiffObjectiveConfig, num_classes: int):
        if config.prediction != "velocity":
            raise ValueError("LowDiff here predicts velocity only (objective.prediction='velocity')")
        self.config = config
        self.num_classes = num_classes
        self.flow = RectifiedFlow(config, num_classes)  # interpolant, time sampling, targets, per-stage sampling

    def stage_weights(self, num_stages: int) -> list[float]:
        w = self.config.stage_weights
        if w is None:
            return [1.0] * num_stages
        if len(w) != num_stages:
            raise ValueError(f"stage_weights has {len(w)} entries but the cascade has {num_stages} stages")
        return list(w)

    def condition(self, x_low: torch.Tensor, size: int, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """up(x_low) noised to level s along the flow's path: alpha_s up + sigma_s eps'."""
        up = upsample(x_low, size)
        alpha, sigma, _, _ = self.flow.path.coefficients(level, up.dim())
        return alpha * up + sigma * noise

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        x0, labels = batch["images"], batch["labels"]
        cfg, net = self.config, model.config
        if x0.shape[-1] != net.resolutions[-1]:
            raise ValueError(f"images are {x0.shape[-1]} px but the cascade {list(net.resolutions)} ends at "
                             f"{net.resolutions[-1]}")
        drop = random.rand() < cfg.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        weights = self.stage_weights(net.num_stages)
        out, total = {}, 0.0
        for k, r in enumerate(net.resolutions):
            x0_k = downsample(x0, r)
            noise = random.randn(x0.shape[1], r, r).to(x0.dtype)
            t = self.flow.sample_time(random)
            cond = level = None
            if k > 0 and net.mode == "init":
                t = t * cfg.train_start_time
            if k > 0 and net.mode == "concat":
                level = random.rand() * cfg.cond_aug_max
                cond = self.condition(downsample(x0, net.resolutions[k - 1]), r, level,
                                      random.randn(x0.shape[1], r, r).to(x0.dtype))
            alpha, sigma, _, _ = self.flow.path.coefficients(t, x0.dim())
            x_t = alpha * x0_k + sigma * noise
            kwargs = {"cond": cond, "aug_level": level} if net.mode == "concat" else {}
            prediction = model(x_t, t, labels, stage=k, **kwargs).float()
            mse = F.mse_loss(prediction, self.flow.target(x0_k, noise, t))
            out[f"mse_{r}px"] = mse.detach()
            total = total + weights[k] * mse
        out["loss"] = total / sum(weights)
        out["mse"] = out["loss"].detach()
        return out

    def stage_plan(self, model: nn.Module, sampler: LowDiffSamplerConfig) -> list[tuple[int, int, float]]:
        """(resolution, steps, start time) per stage."""
        net = model.config
        steps = sampler.steps_for(net.num_stages)
        return [(r, n, 1.0 if (k == 0 or net.mode == "concat") else sampler.start_time)
                for k, (r, n) in enumerate(zip(net.resolutions, steps))]

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: torch.Tensor, shape: tuple[int, ...], sampler: LowDiffSamplerConfig,
               generator: torch.Generator | None = None, progress=None) -> torch.Tensor:
        net = model.config
        if tuple(shape[1:]) != (net.resolutions[-1],) * 2:
            raise ValueError(f"the cascade {list(net.resolutions)} cannot produce {tuple(shape)} samples")
        device, C, x = labels.device, shape[0], None
        for k, (r, steps, start) in enumerate(self.stage_plan(model, sampler)):
            noise = torch.stack([torch.randn((C, r, r), generator=generator) for _ in range(len(labels))]).to(device)
            kwargs = {}
            if k > 0 and net.mode == "concat":
                level = torch.full((len(labels),), sampler.cond_aug, device=device)
                aug = torch.stack([torch.randn((C, r, r), generator=generator) for _ in range(len(labels))]).to(device)
                kwargs = {"cond": self.condition(x, r, level, aug), "aug_level": level}

            def stage_model(x_t, t, y, k=k, kwargs=kwargs):
                if "cond" in kwargs and x_t.shape[0] != kwargs["cond"].shape[0]:  # the guidance's doubled batch
                    reps = x_t.shape[0] // kwargs["cond"].shape[0]
                    kwargs = {name: torch.cat([v] * reps) for name, v in kwargs.items()}
                return model(x_t, t, y, stage=k, **kwargs)

            if start >= 1.0:
                x = self.flow.sample(stage_model, labels, (C, r, r), replace(sampler, num_steps=steps), generator,
                                     progress, noise=noise)
                continue
            if sampler.solver not in SOLVERS:
                raise ConfigError(f"mode 'init' integrates from t* = {start} with an ODE solver: use solver 'euler' or "
                                 f"'heun', not {sampler.solver!r}")
            alpha, sigma, _, _ = self.flow.path.coefficients(torch.full((len(labels),), start), 4)
            x_start = alpha.to(device) * upsample(x, r) + sigma.to(device) * noise

            def velocity(x_t, t, interval_time=None, stage_model=stage_model):
                return guided_prediction(stage_model, x_t, t, labels, self.num_classes, sampler.cfg_scale,
                                         sampler.cfg_interval, sampler.cfg_channels, interval_time).float()

            grid = make_time_grid(steps, shift=sampler.time_shift, t_start=start)
            x = SOLVERS[sampler.solver](velocity, x_start, grid, progress=progress)
        return x

    def evaluations_per_stage(self, model: nn.Module, sampler: LowDiffSamplerConfig) -> list[int]:
        """Network evaluations per image at each stage (guidance counted as in the flow sampler)."""
        out = []
        for r, steps, start in self.stage_plan(model, sampler):
            if start >= 1.0:
                out.append(self.flow.evaluations_per_sample(replace(sampler, num_steps=steps)))
                continue
            times = make_time_grid(steps, shift=sampler.time_shift, t_start=start).tolist()
            decisions = times[:-1] + ([times[i + 1] for i in range(len(times) - 1) if times[i + 1] != 0.0]
                                      if sampler.solver == "heun" else [])
            out.append(guided_evaluations(decisions, sampler.cfg_scale, sampler.cfg_interval))
        return out

    def evaluations_per_sample(self, sampler: LowDiffSamplerConfig, model: nn.Module) -> int:
        """Network evaluations per image over all stages (a low-resolution evaluation costs less: see
        evaluations_per_stage and benchmarks/lowdiff_pareto.py for FLOPs)."""
        return sum(self.evaluations_per_stage(model, sampler))
