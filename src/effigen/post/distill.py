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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import ConfigError, config_from_dict, config_to_dict
from ..models.dit import DiT
from ..objectives.distilled import (  # noqa: F401  (the student method; re-exported for users of this module)
    METHOD, DiffusionFamily, DistilledConfig, DistilledGenerator, DistilledSamplerConfig, FlowFamily, _bcast,
    make_family, renoise, step,
)
from ..rng import BatchRandom
from ..training.trainer import TrainerConfig

TEACHER_METHODS = ("dit-flow", "dit-ddpm")


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
