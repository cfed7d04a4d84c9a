"""Blockwise Flow Matching's two training stages and its segment samplers (Park et al., arXiv 2510.21167; official
`src/scheduler/flow_matching.py`, `train.py`, `train_frn.py`). The network is models/bfm.py.

Convention (DESIGN.md and the official code alike): t = 1 noise, t = 0 data, x_t = (1 - t) x_0 + t eps, the network
predicts the velocity v = eps - x_0. The K segments are [edge_{k+1}, edge_k] with edges = linspace(1, 0, K + 1).

Stage 1, `stage: velocity` (preset `mnist-bfm`). The global batch is split over the K segments as equally as possible
(the first B mod K segments take one more sample, the official counts), the samples of segment k draw
t ~ U(edge_{k+1}, edge_k) and run segment k's velocity blocks:
    L = mean ||v_theta(x_t, t, y; k) - (eps - x_0)||^2 + proj_loss_weight * L_proj,
    L_proj = -mean_{b, n} cos(h_phi(f(x_t, t, y))_{b, n}, y*_{b, n})       (REPA's loss on the SemFeat trunk f)
with y* the frozen teacher's patch tokens of the clean image at the student's token grid (teachers/). The official
weight is 0.05 (DINOv2-B); `proj_loss_weight: 0` is the teacher-free mode (no teacher is loaded, the projector gets
no gradient). Labels are replaced by the null class with probability `label_dropout` (0.1).

Stage 2, `stage: fra` (preset `mnist-bfm-fra`, `init_from` the stage-1 folder): everything frozen except the FRN
blocks. With the same (x_0, eps) and the sample's segment [t_e, t_s]:
    L = mean || f(x_{t_s}, t_s, y) + coeff * FRN(x_t, t, y) - f(x_t, t, y) ||^2,   coeff = (t_s - t) / (t_s - t_e)
(official `compute_loss_ft`; its proj_loss is identically 0, so `train_frn.py`'s proj_loss_weight 0.5 multiplies
nothing and no alignment term is used here either).

Deviation: the official split is contiguous (samples 0..B/K - 1 in segment 0, ...); here sample i of the global batch
is in segment i mod K. The counts per segment are the same, and every process of a DDP run (local batch >= K) then
holds every segment, so every velocity stack takes part in every step (DDP requires it; a contiguous split would
leave whole segments out of a process). In teacher-free mode the projector, if the network has one, is frozen.

Sampling (`BFMSamplerConfig`): `num_steps` in total, the same number per segment (a budget that the segment count does
not divide is an error naming the nearest valid ones: samplers/blockwise.py). Euler (official `sample_ode`) or
Euler-Maruyama with g^2 = 2t (official `sample_sde`, whose double final step is `sde_ending: official`). `fra: true`
is the official `sample_ode_frn`: the full trunk runs at the first step of each segment only, later steps use
f_start + coeff * FRN(x_t). Guidance: uncond + s (cond - uncond) on all channels, inside `cfg_interval` (official
guidance_low / guidance_high). If guidance switches on or off inside a segment, the FRA features of the segment
start are made for the new batch (the official sampler fails with a shape error there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, check_range
from ..models.bfm import segment_edges
from ..rng import BatchRandom
from ..samplers import guided_evaluations, guided_prediction
from ..samplers.blockwise import blockwise_euler, blockwise_euler_maruyama, segment_grids, steps_per_segment
from ..samplers.guidance import check_guidance, check_num_steps
from .alignment import repa_loss
from .next_scale import unwrap


@dataclass
class BFMObjectiveConfig:
    stage: Literal["velocity", "fra"] = "velocity"
    label_dropout: float = 0.1
    proj_loss_weight: float = 0.05  # stage 1: SemFeat alignment weight (official 0.05); 0 = teacher-free
    teacher: str = ""  # a built-in teacher (mnist-vit, mnist-net) or dinov2-vitb14[-reg]=PATH; needed when weight > 0

    def __post_init__(self):
        if self.stage not in ("velocity", "fra"):
            raise ValueError(f"stage must be 'velocity' (stage 1) or 'fra' (feature residual approximation), "
                             f"got {self.stage!r}")
        check_range("label_dropout", self.label_dropout, 0, 1, meaning="probability of the null class")
        check_range("proj_loss_weight", self.proj_loss_weight, 0, meaning="0 = teacher-free")
        if self.stage == "velocity" and self.proj_loss_weight > 0 and not self.teacher:
            raise ValueError("proj_loss_weight > 0 aligns the trunk to a teacher: set objective.teacher (e.g. "
                             "mnist-vit) or proj_loss_weight 0 for the teacher-free mode")


@dataclass
class BFMSamplerConfig:
    solver: Literal["euler", "euler_maruyama"] = "euler"
    num_steps: int = 12  # in total, split equally over the segments
    fra: bool = False  # feature residual approximation: the full trunk once per segment (needs a stage-2 model)
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] | None = None  # guide only while t in [low, high]
    diffusion_norm: float = 2.0  # SDE: g^2 = diffusion_norm * t (official 2t)
    last_step: float = 0.04  # SDE: the last segment ends at this t, then one step to 0
    sde_ending: Literal["mean", "official"] = "mean"  # official: the sample_sde quirk (see samplers/blockwise.py)

    setting_hints = {"time_shift": "BFM's segments have fixed equal-width time grids (no shift)",
                     "steps_per_segment": "set num_steps = segments x steps per segment"}

    def __post_init__(self):
        check_num_steps(self.num_steps)
        check_guidance(self.cfg_scale, self.cfg_interval)
        if self.solver not in ("euler", "euler_maruyama"):
            raise ValueError(f"solver must be 'euler' or 'euler_maruyama' for BFM, got {self.solver!r}")
        check_range("diffusion_norm", self.diffusion_norm, 0, meaning="SDE noise scale g^2 = norm * t")
        check_range("last_step", self.last_step, 0, 1, high_open=True, meaning="SDE: the final step from t to 0")
        if self.sde_ending not in ("mean", "official"):
            raise ValueError(f"sde_ending must be 'mean' or 'official', got {self.sde_ending!r}")


def segment_split(global_size: int, segments: int) -> torch.Tensor:
    """The segment of each sample of a global batch, (B,) long: sample i in segment i mod K (the first B mod K
    segments one sample larger, as the official contiguous split; interleaved so that any K consecutive samples,
    e.g. one process's share, cover every segment)."""
    return torch.arange(global_size) % segments


def fra_coefficient(t: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor) -> torch.Tensor:
    """(t_s - t) / (t_s - t_e): 0 at the segment start, 1 at its end."""
    return (t_start - t) / (t_start - t_end)


class BlockwiseFlowMatching:
    """`loss(model, batch, random)` for the trainer, `sample(...)` for the pipeline; holds the (frozen, lazily loaded)
    teacher of stage 1 and no trainable parameters."""

    config_class = BFMObjectiveConfig
    sampler_config_class = BFMSamplerConfig
    evaluations_need_model = True  # the segment count is the network's
    needs_tokenizer = True  # a latent generator's teacher sees the decoded images

    def __init__(self, config: BFMObjectiveConfig, num_classes: int, tokenizer: nn.Module | None = None):
        self.config = config
        self.num_classes = num_classes
        self.tokenizer = tokenizer
        self._teacher = None
        self._checked = False

    # ------------------------------------------------------------------ set-up hooks (effigen.training.run)
    def _trains(self, name: str) -> bool:
        if self.config.stage == "fra":
            return name.startswith("frn_blocks.")
        teacher_free = self.config.proj_loss_weight == 0
        return not name.startswith("frn_blocks.") and not (teacher_free and name.startswith("linear_projection."))

    def prepare_network(self, network: nn.Module) -> None:
        """Stage 1 trains everything but the FRN (and the projector when teacher-free); stage 2 only the FRN."""
        network = unwrap(network)
        if self.config.stage == "fra" and not len(network.frn_blocks):
            raise ConfigError("stage fra trains the FRN blocks, and this network has none: set network.frn_depth >= 1")
        for name, param in network.named_parameters():
            param.requires_grad_(self._trains(name))

    def init_from_state(self, network: nn.Module, state: dict[str, torch.Tensor], source: dict[str, Any],
                        where: str) -> str:
        """Load a pipeline folder's weights (`init_from`). A stage-1 folder built without FRN (frn_depth 0, e.g. a
        converted official stage-1 checkpoint) loads into a network with FRN blocks, which keep their init."""
        from ..io import load_state_dict_strict

        network = unwrap(network)
        frn_keys = {k for k in network.state_dict() if k.startswith("frn_blocks.")}
        if frn_keys and not any(k.startswith("frn_blocks.") for k in state):
            load_state_dict_strict(network, {**network.state_dict(), **state}, where)
            return "stage-1 weights (no FRN in the source: FRN blocks keep their initialisation)"
        load_state_dict_strict(network, state, where)
        stage = (source.get("objective") or {}).get("stage", "velocity")
        return f"{'stage-1' if stage == 'velocity' else 'FRA'} weights, loaded as they are"

    def _check_frozen(self, network: nn.Module) -> None:
        if self._checked:
            return
        wrong = [n for n, p in unwrap(network).named_parameters() if p.requires_grad != self._trains(n)]
        if wrong:
            raise RuntimeError(f"BFM stage {self.config.stage!r} trains the wrong parameters (e.g. {wrong[0]}): call "
                               "objective.prepare_network(network) before building the Trainer (effigen train does)")
        self._checked = True

    def teacher(self, device):
        if self._teacher is None:
            from ..teachers import TeacherError, load_teacher

            try:
                self._teacher = load_teacher(self.config.teacher).frozen()
            except TeacherError as e:
                raise ConfigError(f"objective.teacher: {e}") from None
        return self._teacher.to(device)

    # ------------------------------------------------------------------ losses
    def _draw(self, x0: torch.Tensor, random: BatchRandom, segments: int):
        """Segments, times, noise, the segment-start times and edges, and dropped labels for one batch."""
        if random.local_size < segments < random.global_size:
            raise ConfigError(f"each process holds {random.local_size} samples, fewer than the model's {segments} "
                              "segments, so some velocity blocks would get no gradient on it: use a per-process batch "
                              f"of at least {segments}")
        segment = segment_split(random.global_size, segments)[random.offset: random.offset + random.local_size]
        segment = segment.to(x0.device)
        edges = segment_edges(segments).to(x0.device)
        t_start, t_end = edges[segment], edges[segment + 1]  # (B,)
        t = t_end + random.rand().to(x0.device) * (t_start - t_end)  # U(t_e, t_s) within the sample's segment
        noise = random.randn(*x0.shape[1:]).to(x0.dtype)
        drop = random.rand() < self.config.label_dropout
        return segment, t, t_start, t_end, noise, drop

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        self._check_frozen(model)
        x0, labels = batch["images"], batch["labels"]  # (B, C, H, W), (B,)
        net = unwrap(model).config
        segment, t, t_start, t_end, noise, drop = self._draw(x0, random, net.segments)
        labels = torch.where(drop.to(labels.device), torch.full_like(labels, self.num_classes), labels)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        x_t = (1 - t.view(shape)) * x0 + t.view(shape) * noise
        if self.config.stage == "fra":
            return self._fra_loss(model, x0, noise, x_t, t, t_start, t_end, labels, segment)
        align = self.config.proj_loss_weight > 0
        out = model(x_t, t, labels, segment=segment, return_projection=align)
        velocity, projected = out if align else (out, None)
        error = (velocity.float() - (noise - x0).float()) ** 2  # (B, C, H, W)
        mse = error.mean()
        logs = {"mse": mse.detach()}
        per_sample = error.flatten(1).mean(1).detach()
        for k in range(net.segments):
            mine = segment == k
            if bool(mine.any()):
                logs[f"mse_segment{k}"] = per_sample[mine].mean()
        loss = mse
        if align:
            teacher = self.teacher(x0.device)
            images = x0.float() if self.tokenizer is None else self.tokenizer.decode(x0.float()).float().clamp(-1, 1)
            with torch.no_grad(), torch.autocast(x0.device.type, enabled=False):
                target = teacher.features(images, grid=math.isqrt(projected.shape[1]))  # (B, L, C)
            if target.shape[-1] != projected.shape[-1]:
                raise ConfigError(f"the {self.config.teacher} teacher has {target.shape[-1]}-wide features but the "
                                  f"network's projector gives {projected.shape[-1]}: set network.projection_dim="
                                  f"{target.shape[-1]}")
            proj = repa_loss(projected, target)
            loss = loss + self.config.proj_loss_weight * proj
            logs["proj_loss"] = proj.detach()
        return {"loss": loss, **logs}

    def _fra_loss(self, model, x0, noise, x_t, t, t_start, t_end, labels, segment) -> dict[str, torch.Tensor]:
        network = unwrap(model)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        x_start = (1 - t_start.view(shape)) * x0 + t_start.view(shape) * noise
        with torch.no_grad():
            start = network.trunk(x_start, t_start, labels)  # (B, L, D), the full trunk at the segment start
            target = network.trunk(x_t, t, labels)  # (B, L, D), what the FRA replaces
        approx = model(x_t, t, labels, segment=segment, start_features=start,
                       coeff=fra_coefficient(t, t_start, t_end), features_only=True)
        mse = F.mse_loss(approx.float(), target.float())
        # how much of the feature change across the segment the FRN explains (0: none, as `start` alone)
        baseline = F.mse_loss(start.float(), target.float())
        return {"loss": mse, "mse": mse.detach(), "start_only_mse": baseline.detach()}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, model: nn.Module, labels: torch.Tensor, shape: tuple[int, ...], sampler: BFMSamplerConfig,
               generator: torch.Generator | None = None, progress=None, noise: torch.Tensor | None = None,
               step_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Integrate from noise at t = 1 to t = 0. labels: (B,); shape: (C, H, W). `noise`: the start (B, C, H, W);
        `step_noise`: the SDE's per-step draws (steps, B, C, H, W) in loop order (default: from `generator`)."""
        network = unwrap(model)
        K = network.config.segments
        n = self._steps(sampler, K)
        if sampler.fra and self.config.stage != "fra":
            raise ConfigError("sampler.fra uses the feature residual approximation, and this model's FRN was never "
                              "trained (objective stage velocity): sample with fra false, or train the FRA stage first "
                              "(e.g. effigen train --preset mnist-bfm-fra)")
        device, B = labels.device, labels.shape[0]
        if noise is None:  # one draw per sample, in order: the images do not depend on the batch size
            noise = torch.stack([torch.randn(shape, generator=generator) for _ in range(B)])
        edges = segment_edges(K).double()
        cache: dict[str, Any] = {}

        def network_fn(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, k: int, j: int) -> torch.Tensor:
            if not sampler.fra:
                return model(x_t, t, y, segment=k)
            if j == 0:  # the full trunk, kept for the rest of the segment
                v, features = model(x_t, t, y, segment=k, return_features=True)
                cache.update(x=x_t[:B], t=t[:B], features={x_t.shape[0]: features})
                return v
            features = cache["features"].get(x_t.shape[0])
            if features is None and 2 * x_t.shape[0] in cache["features"]:  # guidance switched off: the cond half
                features = cache["features"][2 * x_t.shape[0]][: x_t.shape[0]]
            if features is None:  # guidance switched on inside the segment: the start's trunk for the doubled batch
                reps = x_t.shape[0] // B
                features = model(torch.cat([cache["x"]] * reps), torch.cat([cache["t"]] * reps), y,
                                 segment=k, features_only=True)
                cache["features"][x_t.shape[0]] = features
            coeff = ((edges[k] - t.double()) / (edges[k] - edges[k + 1])).float()
            return model(x_t, t, y, segment=k, start_features=features, coeff=coeff)

        def velocity(x_t: torch.Tensor, t: torch.Tensor, k: int, j: int) -> torch.Tensor:
            return guided_prediction(lambda xx, tt, yy: network_fn(xx, tt, yy, k, j), x_t, t, labels,
                                     self.num_classes, sampler.cfg_scale, sampler.cfg_interval).float()

        x = noise.to(device)
        if sampler.solver == "euler":
            return blockwise_euler(velocity, x, segment_grids(K, n), progress)
        if step_noise is not None:
            draw = lambda i: step_noise[i]  # noqa: E731
        else:
            draw = lambda i: torch.stack([torch.randn(shape, generator=generator) for _ in range(B)])  # noqa: E731
        return blockwise_euler_maruyama(velocity, x, segment_grids(K, n, sampler.last_step), draw,
                                        sampler.diffusion_norm, sampler.sde_ending, progress)

    @staticmethod
    def _steps(sampler: BFMSamplerConfig, segments: int) -> int:
        try:
            return steps_per_segment(sampler.num_steps, segments)
        except ValueError as e:
            raise ConfigError(f"sampler.{e}") from None

    def evaluations_per_sample(self, sampler: BFMSamplerConfig, model: nn.Module) -> int:
        """Network evaluations per image (two inside the guidance interval). With `fra` most of them run the FRN
        instead of the trunk: `trunk_evaluations_per_sample` counts the full-trunk ones."""
        K = unwrap(model).config.segments
        n = self._steps(sampler, K)
        last = sampler.last_step if sampler.solver == "euler_maruyama" else 0.0
        times = [float(t) for grid in segment_grids(K, n, last) for t in grid[:-1]]
        if sampler.solver == "euler_maruyama" and sampler.sde_ending == "official":
            times.append(times[-1])
        return guided_evaluations(times, sampler.cfg_scale, sampler.cfg_interval)

    def trunk_evaluations_per_sample(self, sampler: BFMSamplerConfig, model: nn.Module) -> int:
        """Full-trunk evaluations per image: every evaluation without FRA, the first of each segment with it."""
        if not sampler.fra:
            return self.evaluations_per_sample(sampler, model)
        K = unwrap(model).config.segments
        n = self._steps(sampler, K)
        return guided_evaluations([float(g[0]) for g in segment_grids(K, n)], sampler.cfg_scale, sampler.cfg_interval)
