"""Guided-diffusion distillation: "On Distillation of Guided Diffusion Models" (Meng, Rombach, Gao, Kingma, Ermon,
Ho, Salimans; arXiv 2210.03142), for effigen's DiT teachers (`dit-flow`, including the SiT / LightningDiT presets,
and `dit-ddpm`), in pixel space or in a KL-VAE latent space (the paper's second setting: its latent-diffusion
teachers). A latent teacher's data are encoded once into `out_dir/latents` with its own tokenizer, every student
regresses in that latent space, and every student folder carries the same frozen tokenizer to decode its samples.

What the paper does. A classifier-free-guided teacher costs two network evaluations per step (conditional and
unconditional) and many steps. Stage 1 trains ONE student x_eta(z_t, w) that takes the guidance strength w as an
input and matches the teacher's guided prediction at the same noisy input,

    x^w_theta(z_t) = (1 + w) x_c,theta(z_t) - w x_theta(z_t),          w ~ U[w_min, w_max],
    L1 = E_{x, eps, t, w} [ omega(lambda_t) || x_eta(z_t, w) - x^w_theta(z_t) ||^2 ],

so one evaluation replaces two. Stage 2 is progressive distillation (Salimans & Ho, arXiv 2202.00512) of that
student: a new student learns to reproduce two deterministic steps of the current one with a single step (same w),
then becomes the teacher; the number of steps halves each round (N -> N/2 -> ... -> the requested count).
Samples come from the plain deterministic step, or from the paper's stochastic variant: from t_i take one
deterministic step of twice the length (to t_{i+2}), then go back to t_{i+1} by re-noising with fresh Gaussian
noise, q(z_{t_{i+1}} | z_{t_{i+2}}); the last step is deterministic.

Conventions (explicit, because both exist in the literature):

- Guidance: the paper's w; effigen's one guidance convention is cfg_scale s in uncond + s (cond - uncond), so
  s = 1 + w. w = 0 is the teacher's conditional prediction. The student's w input is the paper's w
  (`DiT(..., guidance=w)`, `sampler.guidance_w`). The distillation target guides ALL output channels at all t
  (the teacher's `cfg_interval` / `cfg_channels` sampler quirks are not distilled).
- Time: effigen's (t = 0 data, t = 1 noise), whatever the family. A *family* adapter below gives, per teacher
  objective, the noisy input z_t = alpha_t x + sigma_t eps, the step grid and one sampler step, reusing the
  objectives' own definitions and conversions (`RectifiedFlow.path` / `velocity_and_noise`;
  `GaussianDiffusion.schedule` / `predict_x0_from_eps`):
    * flow (`dit-flow`, any path/prediction): continuous t; the step is Euler on the velocity
      z_s = z_t + (s - t) v (on the linear path this IS the DDIM step of the paper); the grid is the teacher
      sampler's `make_time_grid(N, time_shift, t_start)`, which nests (grid(N) = every other point of grid(2N)).
    * diffusion (`dit-ddpm`): the teacher's discrete steps k (network time k / T); the step is DDIM (eta = 0) from
      the x-prediction; the N-step grid is k_j = round(j T / N) - 1, j = N..1, then the data (alpha_bar = 1). This
      "trailing" grid nests under halving (ADM's respacing does not, so it is not used here).
- Weighting: the truncated-SNR weight of progressive distillation, omega = max(SNR_t, 1), SNR = alpha^2 / sigma^2,
  on the x-space error. Diffusion students are regressed in x-space with exactly that. Flow students are
  regressed on the velocity (what the objective trains): with z_t fixed, dx = -(sigma / c_t) dv where
  c_t = alpha'_t sigma_t - sigma'_t alpha_t (linear path: c = -1, so dx = -t dv), hence the equivalent weight on
  || dv ||^2 is max(alpha_t^2, sigma_t^2) / c_t^2 (linear path: max((1-t)^2, t^2)). ("data" predictions
  convert to velocity through the objective, with its sigma clamp near t = 0.)
- Stage-2 target (two teacher steps t -> t' -> t'' on the 2N grid, student one step t -> t''): the value in the
  regression space that makes one student step land on the teacher's z_t'': flow v~ = (z_t'' - z_t) / (t'' - t);
  diffusion x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t) (Salimans & Ho).
  t is drawn from the student's grid points (as in the paper), x from the data, w ~ U[w_min, w_max].
- Parameterisation: a student keeps its teacher's output meaning by default, so that at initialisation it IS the
  teacher's conditional prediction (the w embedding of `DiTConfig.guidance_embed` ends in a zero-initialised
  Linear). The paper avoids epsilon prediction at few steps; for `dit-ddpm` teachers choose
  `parameterization="x"` or `"v"` (v = alpha eps - sigma x): the student then re-learns the meaning of its output
  head during stage 1 (it no longer equals the teacher at initialisation). The stage-1 target is always the x_0
  implied by the teacher's guided output read in the teacher objective's own `prediction` (noise, velocity or
  data), whatever the student's parameterisation. Flow students keep the teacher's prediction (the mnist-dit
  preset already predicts x).

Each stage and each halving round is one resumable run of the shared Trainer (`GuidanceDistillation` and
`ProgressiveDistillation` are objectives with the frozen teacher inside); every round writes a normal pipeline folder
of method `dit-distilled` whose sampler settings default to the round's step count and the student's w. Choices that
are ours, not the paper's: stage-1 times follow the teacher objective's own time sampling (uniform for SiT / mnist-dit;
the paper's is uniform); the starting grid is Euler/DDIM at `teacher_steps` (the paper starts from 1024 DDIM steps).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, config_from_dict, config_to_dict
from ..models.dit import DiT
from ..objectives.ddpm import DDPMConfig, GaussianDiffusion
from ..objectives.flow_matching import RectifiedFlow, RectifiedFlowConfig
from ..rng import BatchRandom
from ..samplers import make_time_grid
from ..samplers.diffusion import predict_eps_from_x0, predict_x0_from_eps
from ..training.trainer import TrainerConfig

METHOD = "dit-distilled"
TEACHER_METHODS = ("dit-flow", "dit-ddpm")


def _bcast(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.float().view(-1, *([1] * (ndim - 1)))


# ------------------------------------------------------------------------------------------- families
class FlowFamily:
    """Rectified-flow / SiT teachers: continuous t, Euler on the velocity, loss on the velocity."""

    def __init__(self, objective: RectifiedFlow, time_shift: float = 1.0, sample_eps: float = 1e-3):
        self.objective = objective
        self.prediction = objective.config.prediction
        self.time_shift = time_shift
        self.t_start = 1.0 if self.prediction == "velocity" else 1.0 - sample_eps  # as RectifiedFlow.sample

    def grid(self, num_steps: int) -> torch.Tensor:
        return make_time_grid(num_steps, shift=self.time_shift, t_start=self.t_start).float()  # (N+1,) decreasing

    def train_points(self, random: BatchRandom) -> torch.Tensor:
        return self.objective.sample_time(random)  # (B,)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def coefficients(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma, _, _ = self.objective.path.coefficients(t, ndim)
        return alpha, sigma

    def output(self, out: torch.Tensor, channels: int) -> torch.Tensor:
        return out[:, :channels].float()

    def regression(self, prediction: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity implied by the prediction at (z, t)."""
        if self.prediction == "velocity":
            return prediction
        return self.objective.velocity_and_noise(prediction, z, t)[0]

    def teacher_regression(self, prediction: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.regression(prediction, z, t)  # a flow student keeps its teacher's prediction

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """max(SNR, 1) of the x-space error, expressed on the velocity error (module docstring), (B,)."""
        alpha, sigma, d_alpha, d_sigma = (c.flatten() for c in self.objective.path.coefficients(t, 1))
        return torch.maximum(alpha**2, sigma**2) / (d_alpha * sigma - d_sigma * alpha) ** 2

    def step_regression(self, v: torch.Tensor, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return z + _bcast(s - t, z.dim()) * v  # Euler

    def step_target(self, z_t: torch.Tensor, z_s: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (z_s - z_t) / _bcast(s - t, z_t.dim())


class DiffusionFamily:
    """DDPM teachers: discrete steps k (k = -1 is the data), DDIM steps, loss in x-space."""

    # the teacher objective's `prediction` in this module's names
    KINDS = {"noise": "eps", "velocity": "v", "data": "x"}

    def __init__(self, objective: GaussianDiffusion, parameterization: Literal["teacher", "eps", "x", "v"] = "teacher"):
        self.objective = objective
        self.schedule = objective.schedule
        self.num_timesteps = objective.config.num_timesteps
        self.teacher_parameterization = self.KINDS[objective.config.prediction]
        self.parameterization = self.teacher_parameterization if parameterization == "teacher" else parameterization
        self.alpha_bar = torch.from_numpy(np.append(1.0, self.schedule.alphas_cumprod))  # index k + 1

    def grid(self, num_steps: int) -> torch.Tensor:
        if not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"cannot take {num_steps} steps on a {self.num_timesteps}-step diffusion")
        T = self.num_timesteps
        return torch.tensor([round(j * T / num_steps) - 1 for j in range(num_steps, 0, -1)] + [-1])

    def train_points(self, random: BatchRandom) -> torch.Tensor:
        return random.randint(self.num_timesteps)

    def network_time(self, k: torch.Tensor) -> torch.Tensor:
        return self.schedule.network_time(k)  # k / T, the teacher's own convention

    def coefficients(self, k: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = _bcast(self.alpha_bar.to(k.device)[k.long() + 1], ndim)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def output(self, out: torch.Tensor, channels: int) -> torch.Tensor:
        return out[:, :channels].float()  # never the learned-variance channels

    def regression(self, prediction: torch.Tensor, z: torch.Tensor, k: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """The x_0 implied by a prediction at (z, k): the student's (`parameterization`) unless `kind` is given."""
        kind = kind or self.parameterization
        if kind == "eps":
            return predict_x0_from_eps(self.schedule, z, k, prediction)
        if kind == "x":
            return prediction
        alpha, sigma = self.coefficients(k, z.dim())
        return alpha * z - sigma * prediction  # from v = alpha eps - sigma x

    def teacher_regression(self, prediction: torch.Tensor, z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The x_0 implied by the (stage-1) teacher's prediction, in the teacher objective's own parameterisation."""
        return self.regression(prediction, z, k, self.teacher_parameterization)

    def weight(self, k: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alpha_bar.to(k.device)[k.long() + 1].float()
        return (alpha_bar / (1 - alpha_bar)).clamp(min=1.0)  # truncated SNR, (B,)

    def step_regression(self, x0: torch.Tensor, z: torch.Tensor, k: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        alpha_s, sigma_s = self.coefficients(s, z.dim())
        eps = predict_eps_from_x0(self.schedule, z, k, x0)
        return alpha_s * x0 + sigma_s * eps  # DDIM, eta = 0

    def step_target(self, z_t: torch.Tensor, z_s: torch.Tensor, k: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        alpha_t, sigma_t = self.coefficients(k, z_t.dim())
        alpha_s, sigma_s = self.coefficients(s, z_t.dim())
        ratio = sigma_s / sigma_t
        return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)


def step(family, prediction: torch.Tensor, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One deterministic sampler step t -> s from a network prediction at (z, t)."""
    return family.step_regression(family.regression(prediction, z, t), z, t, s)


def renoise(family, z: torch.Tensor, s: torch.Tensor, u: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward-diffuse z_s to the noisier time u: q(z_u | z_s) = N((alpha_u/alpha_s) z_s, sigma_u^2 - (alpha_u sigma_s
    / alpha_s)^2), valid for any path whose noise-to-signal ratio grows with time."""
    alpha_s, sigma_s = family.coefficients(s, z.dim())
    alpha_u, sigma_u = family.coefficients(u, z.dim())
    ratio = alpha_u / alpha_s
    return ratio * z + (sigma_u**2 - (ratio * sigma_s) ** 2).clamp(min=0).sqrt() * noise


# ------------------------------------------------------------------------------------------- the student method
@dataclass
class DistilledConfig:
    teacher_method: Literal["dit-flow", "dit-ddpm"] = "dit-flow"
    teacher_objective: dict[str, Any] = field(default_factory=dict)  # the teacher's objective settings (time, prediction)
    parameterization: Literal["teacher", "x", "v"] = "teacher"  # dit-ddpm students only: what the output means
    time_shift: float = 1.0  # flow grid: make_time_grid(N, time_shift, t_start), as the teacher's sampler
    sample_eps: float = 1e-3  # flow grid starts at 1 - sample_eps unless the teacher predicts velocity
    w_min: float = 0.0  # the range of the paper's w the student was trained on (cfg_scale = 1 + w)
    w_max: float = 4.0
    stage: Literal["guidance", "progressive"] = "guidance"  # what produced these weights


@dataclass
class DistilledSamplerConfig:
    num_steps: int = 4  # steps of the distilled grid (one network evaluation each, no CFG doubling)
    guidance_w: float = 1.0  # the paper's w; the teacher's effigen cfg_scale = 1 + guidance_w
    stochastic: bool = False  # the paper's stochastic sampler (double step, then re-noise one step back)


def make_family(config: DistilledConfig, num_classes: int):
    if config.teacher_method == "dit-flow":
        if config.parameterization != "teacher":
            raise ConfigError("parameterization x/v is for dit-ddpm teachers; a flow student keeps its teacher's "
                              "prediction (set it with the teacher's objective.prediction)")
        objective = RectifiedFlow(config_from_dict(RectifiedFlowConfig, config.teacher_objective, "teacher_objective"),
                                  num_classes)
        return FlowFamily(objective, config.time_shift, config.sample_eps)
    objective = GaussianDiffusion(config_from_dict(DDPMConfig, config.teacher_objective, "teacher_objective"), num_classes)
    return DiffusionFamily(objective, config.parameterization)


class DistilledGenerator:
    """The objective entry of method `dit-distilled`: what a distilled student's output means and how it samples.
    It is trained only by `effigen distill` (the stage objectives below), not by `effigen train`."""

    config_class = DistilledConfig
    sampler_config_class = DistilledSamplerConfig

    def __init__(self, config: DistilledConfig, num_classes: int):
        self.config = config
        self.num_classes = num_classes
        self.family = make_family(config, num_classes)

    def loss(self, model, batch, random):
        raise ConfigError("a dit-distilled student is trained by `effigen distill --from TEACHER` (the stage objectives "
                          "GuidanceDistillation / ProgressiveDistillation), not by `effigen train`")

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: torch.Tensor, shape: tuple[int, ...], sampler: DistilledSamplerConfig,
               generator: torch.Generator | None = None, progress=None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """N steps of the student at the fixed w from noise at the grid's start. labels: (B,); shape: (C, H, W)."""
        device = labels.device
        if noise is None:  # one draw per sample, in order, as the other objectives
            noise = torch.stack([torch.randn(shape, generator=generator) for _ in range(labels.shape[0])])
        z = noise.to(device)
        family, N = self.family, sampler.num_steps
        grid = family.grid(N).to(device)
        w = torch.full((labels.shape[0],), float(sampler.guidance_w), device=device)
        for i in range(N):
            t = grid[i].expand(labels.shape[0])
            prediction = family.output(model(z, family.network_time(t), labels, guidance=w), shape[0])
            if sampler.stochastic and i < N - 1:
                z2 = step(family, prediction, z, t, grid[i + 2].expand_as(t))
                fresh = torch.randn(z.shape, generator=generator).to(device)
                z = renoise(family, z2, grid[i + 2].expand_as(t), grid[i + 1].expand_as(t), fresh)
            else:
                z = step(family, prediction, z, t, grid[i + 1].expand_as(t))
            if progress is not None:
                progress.update(1)
        return z

    def evaluations_per_sample(self, sampler: DistilledSamplerConfig) -> int:
        return sampler.num_steps


# ------------------------------------------------------------------------------------------- stage objectives
def _teacher_guided(teacher: nn.Module, z, t_net, labels, w, null_label: int, family, channels: int) -> torch.Tensor:
    """(1 + w) cond - w uncond = uncond + s (cond - uncond) with s = 1 + w, per sample, in one doubled batch."""
    out = teacher(torch.cat([z, z]), torch.cat([t_net, t_net]), torch.cat([labels, torch.full_like(labels, null_label)]))
    cond, uncond = family.output(out, channels).chunk(2)
    return uncond + _bcast(1 + w, z.dim()) * (cond - uncond)


def _weighted_mse(family, prediction, target, points) -> torch.Tensor:
    per_sample = ((prediction - target) ** 2).mean(dim=tuple(range(1, prediction.dim())))  # (B,)
    return (family.weight(points) * per_sample).mean()


class _Distillation:
    def __init__(self, family, teacher: nn.Module, num_classes: int, w_min: float, w_max: float):
        if not w_min <= w_max:
            raise ConfigError(f"w_min={w_min} must not exceed w_max={w_max}")
        self.family = family
        self.teacher = teacher.eval().requires_grad_(False)
        self.num_classes = num_classes
        self.w_min, self.w_max = float(w_min), float(w_max)

    def to(self, device) -> "_Distillation":
        self.teacher.to(device)
        return self

    def _draw(self, x0: torch.Tensor, random: BatchRandom, points: torch.Tensor | None = None):
        noise = random.randn(*x0.shape[1:]).to(x0.dtype)
        if points is None:
            points = self.family.train_points(random)
        w = self.w_min + (self.w_max - self.w_min) * random.rand()  # (B,) the paper's w
        alpha, sigma = self.family.coefficients(points, x0.dim())
        return alpha * x0 + sigma * noise, points, w


class GuidanceDistillation(_Distillation):
    """Stage 1: one w-conditioned evaluation of the student matches the teacher's two-evaluation guided
    prediction at the same z_t (the target is NOT a multi-step sample)."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        x0, labels = batch["images"], batch["labels"]
        family, C = self.family, x0.shape[1]
        z, t, w = self._draw(x0, random)
        t_net = family.network_time(t)
        with torch.no_grad():
            guided = _teacher_guided(self.teacher, z, t_net, labels, w, self.num_classes, family, C)
            target = family.teacher_regression(guided, z, t)
        prediction = family.regression(family.output(model(z, t_net, labels, guidance=w), C), z, t)
        loss = _weighted_mse(family, prediction, target, t)
        return {"loss": loss, "mse": ((prediction - target) ** 2).mean().detach()}


class ProgressiveDistillation(_Distillation):
    """Stage 2, one halving round: one student step t -> t'' reproduces two steps t -> t' -> t'' of the
    (w-conditioned) teacher on the grid of 2 * `student_steps` steps."""

    def __init__(self, family, teacher: nn.Module, num_classes: int, w_min: float, w_max: float, student_steps: int):
        super().__init__(family, teacher, num_classes, w_min, w_max)
        self.student_steps = student_steps
        self.teacher_grid = family.grid(2 * student_steps)

    def teacher_two_steps(self, z: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor, t_next: torch.Tensor,
                          labels: torch.Tensor, w: torch.Tensor, channels: int) -> torch.Tensor:
        """z_t -> z_t' -> z_t'' with two deterministic teacher steps at the same w."""
        family, teacher = self.family, self.teacher
        z_mid = step(family, family.output(teacher(z, family.network_time(t), labels, guidance=w), channels), z, t, t_mid)
        out = teacher(z_mid, family.network_time(t_mid), labels, guidance=w)
        return step(family, family.output(out, channels), z_mid, t_mid, t_next)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        x0, labels = batch["images"], batch["labels"]
        family, C = self.family, x0.shape[1]
        grid = self.teacher_grid.to(x0.device)
        index = 2 * random.randint(self.student_steps)  # (B,) a point of the student's grid
        t, t_mid, t_next = grid[index], grid[index + 1], grid[index + 2]
        z, t, w = self._draw(x0, random, t)
        with torch.no_grad():
            z_next = self.teacher_two_steps(z, t, t_mid, t_next, labels, w, C)
            target = family.step_target(z, z_next, t, t_next)
        prediction = family.regression(family.output(model(z, family.network_time(t), labels, guidance=w), C), z, t)
        loss = _weighted_mse(family, prediction, target, t)
        return {"loss": loss, "mse": ((prediction - target) ** 2).mean().detach()}


# ------------------------------------------------------------------------------------------- running the stages
# Trainer settings of each round unless the caller overrides them (a fine-tune: small learning rate, short EMA).
DISTILL_TRAINER_DEFAULTS: dict[str, Any] = {"max_steps": 1000, "batch_size": 64, "learning_rate": 1e-4, "ema_decay": 0.999,
                                            "checkpoint_every": 250, "log_every": 25, "grad_clip": 1.0}


@dataclass
class DistillSettings:
    stage: Literal["guidance", "progressive", "all"] = "all"
    steps: int = 4  # the final student's number of sampling steps
    teacher_steps: int | None = None  # grid of the stage-1 student that stage 2 starts from (steps * 2^k)
    w_min: float | None = None  # default [0, 4] (the paper's pixel-space range), or a stage-1 folder's own range
    w_max: float | None = None
    w: float | None = None  # the students' default sampler w (default: the teacher's cfg_scale - 1)
    stochastic: bool = False  # the students' default sampler
    parameterization: Literal["teacher", "x", "v"] = "teacher"


def read_teacher_index(path: str | Path) -> dict[str, Any]:
    """model_index.json of a pipeline folder that can be distilled, or a ConfigError that says why not."""
    from ..io import read_json

    folder = Path(path)
    if not (folder / "model_index.json").is_file() or not (folder / "generator" / "config.json").is_file():
        raise ConfigError(f"--from {path}: not a pipeline folder with a generator (expected {folder}/model_index.json and "
                          "generator/, as `effigen train` writes in its final/ folder, e.g. runs/mnist-dit/final)")
    index = read_json(folder / "model_index.json")
    method = index.get("method")
    if method not in (*TEACHER_METHODS, METHOD):
        raise ConfigError(f"--from {path} holds a {method!r} model: guided distillation needs a diffusion or flow teacher "
                          f"that denoises a continuous grid ({', '.join(TEACHER_METHODS)}, or a {METHOD} folder of a "
                          "previous stage); token models (var, raster-ar, hmar) have no such step to distill")
    return index


def student_from_teacher(teacher: DiT, seed: int = 0) -> DiT:
    """The teacher's network plus a zero-initialised w embedding: at initialisation its output equals the teacher's
    conditional prediction for every w. The w embedding's first layer is drawn from `seed` (not the global RNG)."""
    config = dataclasses.replace(teacher.config, guidance_embed=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = DiT(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not key.startswith("w_embedder.") for key in missing):
        raise ConfigError(f"the teacher's weights do not fit its own network plus a w embedding: missing {missing}, "
                          f"unexpected {unexpected}")
    return student.train().requires_grad_(True)


def default_teacher_steps(saved_steps: int, steps: int) -> int:
    """The smallest steps * 2^k that is at least the teacher's saved step count."""
    return steps * 2 ** max(0, math.ceil(math.log2(max(saved_steps, 1) / steps)))


def check_steps(teacher_steps: int, steps: int) -> int:
    """Number of halving rounds from teacher_steps down to steps."""
    if steps < 1 or teacher_steps < 1:
        raise ConfigError(f"--steps and --teacher-steps must be >= 1, got {steps} and {teacher_steps}")
    ratio = teacher_steps // steps
    if teacher_steps % steps or ratio & (ratio - 1):
        raise ConfigError(f"--teacher-steps {teacher_steps} is not --steps {steps} times a power of two: progressive "
                          f"distillation halves the step count each round (e.g. --teacher-steps {default_teacher_steps(teacher_steps, steps)})")
    return int(math.log2(ratio))


def _run_round(name: str, out_dir: Path, student: DiT, objective: _Distillation, objective_config: DistilledConfig,
               sampler_config: DistilledSamplerConfig, info: dict, dataset, trainer_config: TrainerConfig,
               seed_offset: int, log, tokenizer=None) -> tuple[Path, dict]:
    """One stage / halving round = one resumable Trainer run in out_dir/name; its EMA student goes to name/final
    (with the teacher's frozen tokenizer for a latent teacher)."""
    from ..pipeline import Pipeline
    from ..training.trainer import Trainer

    run_dir = out_dir / name
    config = dataclasses.replace(trainer_config, output_dir=str(run_dir), seed=trainer_config.seed + seed_offset)

    def save_folder(path: Path, ema_state: dict, extra) -> None:
        Pipeline(METHOD, student, objective_config, sampler_config, info, tokenizer).save_pretrained(
            path, generator_state=ema_state, extra=extra)

    trainer = Trainer(config, student, objective, dataset, save_folder, component="generator")
    objective.to(trainer.device)
    log(f"[{name}] {type(objective).__name__}: {config.max_steps} steps of batch {config.batch_size} into {run_dir}")
    summary = trainer.train()
    final = Pipeline(METHOD, student, objective_config, sampler_config, info, tokenizer).save_pretrained(
        run_dir / "final", generator_state=trainer.ema_state_dict())
    log(f"[{name}] {summary['steps']} steps ({summary['steps_this_run']} this run, {summary['seconds']:.0f}s), "
        f"final loss {summary['final_loss']}: {final}")
    return final, summary


def distill(teacher_dir: str | Path, out_dir: str | Path, settings: DistillSettings, trainer_config: TrainerConfig,
            data_overrides: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Run the requested stages; every round resumes from its own checkpoints. Returns the rounds' summaries and
    `final`, the pipeline folder of the last student (copied to out_dir/final)."""
    from ..data import DataConfig, build_dataset
    from ..pipeline import Pipeline

    index = read_teacher_index(teacher_dir)
    method = index["method"]
    if settings.stage in ("guidance", "all") and method == METHOD:
        raise ConfigError(f"--from {teacher_dir} is already a {METHOD} student: continue it with --stage progressive")
    if settings.stage == "progressive" and method != METHOD:
        raise ConfigError(f"--stage progressive starts from a stage-1 ({METHOD}) folder, and --from {teacher_dir} holds "
                          f"a {method} teacher: use --stage all (or --stage guidance first)")
    local = Path(teacher_dir)  # a local pipeline folder; nothing is downloaded (from_pretrained fails if missing)
    source = Pipeline.from_pretrained(local).to("cpu")
    tokenizer = source.tokenizer  # a KL-VAE for a latent teacher: the students work in its latents and keep it
    if method == METHOD:
        teacher_config: DistilledConfig = source.objective_config
        w_min = teacher_config.w_min if settings.w_min is None else settings.w_min
        w_max = teacher_config.w_max if settings.w_max is None else settings.w_max
        saved_w, saved_steps = source.sampler_config.guidance_w, source.sampler_config.num_steps
        teacher_steps = settings.teacher_steps or saved_steps
        if teacher_steps != saved_steps:
            raise ConfigError(f"--teacher-steps {teacher_steps}: the stage-1 student in {teacher_dir} was made for "
                              f"{saved_steps} steps; leave --teacher-steps out")
    else:
        w_min = 0.0 if settings.w_min is None else settings.w_min
        w_max = 4.0 if settings.w_max is None else settings.w_max
        saved_w = source.sampler_config.cfg_scale - 1.0
        teacher_steps = settings.teacher_steps or default_teacher_steps(source.sampler_config.num_steps, settings.steps)
    rounds = check_steps(teacher_steps, settings.steps)
    if not 0 <= w_min <= w_max:
        raise ConfigError(f"need 0 <= w_min <= w_max, got [{w_min}, {w_max}] (the paper's w; cfg_scale = 1 + w)")
    w = saved_w if settings.w is None else settings.w
    if not w_min <= w <= w_max:
        raise ConfigError(f"the sampler's w = {w} (cfg_scale {w + 1}) lies outside the trained range [{w_min}, {w_max}]: "
                          "pass --w or widen --w-min/--w-max")
    info = dict(source.info)
    if "dataset" not in info and not (data_overrides or {}).get("name"):
        raise ConfigError(f"{teacher_dir} does not record its dataset: pass --data.name=... (and --data.resolution=...)")
    data_config = config_from_dict(DataConfig, {"name": info.get("dataset"), "resolution": info.get("resolution"),
                                                **(data_overrides or {})}, "data")
    dataset = build_dataset(data_config, "train")
    info["distilled_from"] = str(teacher_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:  # latent teacher: encode the data once into out_dir/latents (reused on resume)
        from ..training.run import latent_training_set

        dataset = latent_training_set(tokenizer, dataset, out_dir / "latents", data_config.resolution, flip=False,
                                      quiet=True)  # distillation rounds do not flip (pixel-space ones neither)
        log(f"latents of {data_config.name} ({len(dataset)} images) cached in {out_dir / 'latents'}")
    num_classes = source.num_classes
    summaries: dict[str, Any] = {}

    if method != METHOD:  # stage 1
        teacher = source.generator
        if teacher.config.guidance_embed:
            raise ConfigError(f"{teacher_dir}: a {method} teacher with a w embedding is not a plain CFG teacher")
        flow = method == "dit-flow"
        objective_config = DistilledConfig(
            teacher_method=method, teacher_objective=config_to_dict(source.objective_config),
            parameterization=settings.parameterization, time_shift=getattr(source.sampler_config, "time_shift", 1.0) if flow else 1.0,
            sample_eps=getattr(source.sampler_config, "sample_eps", 1e-3), w_min=w_min, w_max=w_max, stage="guidance")
        family = make_family(objective_config, num_classes)
        student = student_from_teacher(teacher, trainer_config.seed)
        objective = GuidanceDistillation(family, teacher, num_classes, w_min, w_max)
        sampler_config = DistilledSamplerConfig(num_steps=teacher_steps, guidance_w=w, stochastic=settings.stochastic)
        folder, summaries["guidance"] = _run_round("guidance", out_dir, student, objective, objective_config,
                                                  sampler_config, info, dataset, trainer_config, 0, log, tokenizer)
        if settings.stage == "guidance":
            rounds = 0
    else:
        folder = Path(teacher_dir)
        objective_config = dataclasses.replace(source.objective_config, w_min=w_min, w_max=w_max)

    objective_config = dataclasses.replace(objective_config, stage="progressive")
    for r in range(rounds):
        teacher_pipeline = Pipeline.from_pretrained(folder).to("cpu")
        teacher = teacher_pipeline.generator
        student_steps = teacher_pipeline.sampler_config.num_steps // 2
        student = DiT(teacher.config)
        student.load_state_dict(teacher.state_dict())
        family = make_family(objective_config, num_classes)
        objective = ProgressiveDistillation(family, teacher, num_classes, w_min, w_max, student_steps)
        sampler_config = DistilledSamplerConfig(num_steps=student_steps, guidance_w=w, stochastic=settings.stochastic)
        name = f"progressive_{2 * student_steps}to{student_steps}"
        folder, summaries[name] = _run_round(name, out_dir, student.train(), objective, objective_config, sampler_config,
                                             info, dataset, trainer_config, r + 1, log, tokenizer)
    final = out_dir / "final"
    if folder.resolve() != final.resolve():
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(folder, final)
    return {"final": str(final), "rounds": summaries, "teacher_steps": teacher_steps, "steps": settings.steps,
            "w": w, "w_range": [w_min, w_max]}
