"""Parity with sihyun-yu/REPA (`models/sit.py`, `samplers.py`, `loss.py`), from a `train.py` checkpoint converted with
`effigen convert repa-official`: forward velocity and projector outputs (through the DiT's feature taps), guided
velocity inside and outside the guidance interval, the Euler ODE samples (guided with its trajectory, unguided), the
Heun sample, the Euler-Maruyama SDE sample with the recorded noise, and SILoss's denoising and projection losses
computed by effigen's flow objective wrapped in REPA's alignment objective. REPA's time convention is effigen's (t = 1
noise), so nothing is translated at the boundary. Tolerances: the manifest's `max_abs` per output."""

from __future__ import annotations

import argparse
import collections

import pytest
import torch
from safetensors.torch import load_file

from effigen.convert.repa_official import convert_repa_official, official_sampler
from effigen.convert.sit_official import load_official_checkpoint
from effigen.io import CheckpointError
from effigen.nn.taps import Taps
from effigen.objectives.alignment import AlignConfig, AlignedObjective, repa_loss
from effigen.objectives.flow_matching import RectifiedFlow, RectifiedFlowConfig
from effigen.pipeline import Pipeline
from effigen.samplers import guided_prediction, heun_sample, make_time_grid
from effigen.teachers.base import Teacher

from .common import (assert_max_abs, discover, folder, manifest, max_abs_error, repa_heads_argument, replay_noise,
                     vectors_path)

pytestmark = pytest.mark.parity


@pytest.fixture(params=discover("repa-official"))
def case(request, tmp_path):
    path = folder(request.param)
    spec = manifest(path)
    out = convert_repa_official(path / spec["checkpoint"], tmp_path / "converted", repa_heads_argument(path, spec),
                                keep_projectors=True)
    return path, spec, load_file(str(vectors_path(path, spec))), Pipeline.from_pretrained(out)


def tolerance(spec, name):
    return spec["tolerance"]["max_abs"][name]


def tapped_forward(pipeline, x, t, y):
    """(velocity, [projector outputs]) as REPA's forward returns them, through the feature taps."""
    block = pipeline.info["projector_block"]
    out, features = pipeline.generator(x, t, y, taps=Taps(blocks=(block,)))
    return out, pipeline.components["projector"](features.blocks[block])


def test_config_is_read_off_the_checkpoint(case):
    _, spec, _, pipeline = case
    config, sit = pipeline.generator.config, spec["sit"]
    assert (config.hidden_size, config.depth, config.num_heads, config.patch_size, config.in_channels) == (
        sit["hidden_size"], sit["depth"], sit["num_heads"], sit["patch_size"], sit["in_channels"])
    assert config.input_size == sit["input_size"] and config.num_classes == sit["num_classes"]
    assert config.mlp_ratio == sit["mlp_ratio"] and config.qk_norm == sit["qk_norm"]
    assert not config.learn_sigma and config.out_channels == sit["out_channels"]
    assert (config.time_scale, config.time_offset) == (1.0, 0.0)  # REPA's t is effigen's
    projector = pipeline.components["projector"].config
    assert list(projector.out_dims) == sit["z_dims"] and projector.hidden_dim == sit["projector_dim"]
    assert pipeline.info["encoder_depth"] == sit["encoder_depth"]
    assert pipeline.info["projector_block"] == sit["encoder_depth"] - 1  # 0-based Taps index
    assert pipeline.info["weights"] == "ema"
    n_params = sum(p.numel() for p in pipeline.generator.parameters())
    n_params += sum(p.numel() for p in pipeline.components["projector"].parameters())
    n_params += pipeline.generator.pos_embed.numel()  # a frozen nn.Parameter in REPA's count, a buffer in effigen
    assert n_params == sit["n_params"]


def test_paper_sampler_settings_are_recorded(case):
    _, spec, _, pipeline = case
    s = pipeline.sampler_config  # generate.py --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7
    assert (s.solver, s.num_steps, s.last_step, s.diffusion_norm) == ("euler_maruyama", 249, 0.04, 2.0)
    assert s.cfg_scale == 1.8 and tuple(s.cfg_interval) == (0.0, 0.7) and s.cfg_channels is None
    assert pipeline.number_of_evaluations(cfg_scale=1.0) == 250
    assert pipeline.objective_config.prediction == "velocity" and pipeline.objective_config.path == "linear"


def test_forward_velocity_and_projectors(case):
    _, spec, v, pipeline = case
    with torch.no_grad():
        out, zs = tapped_forward(pipeline, v["x"], v["t"], v["y"])
        null = pipeline.generator(v["x"], v["t"], torch.full_like(v["y"], pipeline.num_classes))
    assert_max_abs(spec, "forward_out", out, v["forward_out"])
    assert_max_abs(spec, "forward_null_out", null, v["forward_null_out"])
    assert len(zs) == len(spec["sit"]["z_dims"])
    for i, z in enumerate(zs):
        assert_max_abs(spec, f"forward_zs_{i}", z, v[f"forward_zs_{i}"])


@pytest.mark.parametrize("inside", [True, False])
def test_guided_velocity_and_the_interval(case, inside):
    _, spec, v, pipeline = case
    cfg = spec["cfg"]
    t = v["cfg_t_in" if inside else "cfg_t_out"]
    assert (cfg["guidance_low"] <= t.item() <= cfg["guidance_high"]) == inside
    with torch.no_grad():
        guided = guided_prediction(pipeline.generator, v["x"], t.expand(v["x"].shape[0]), v["y"], pipeline.num_classes,
                                   cfg["cfg_scale"], (cfg["guidance_low"], cfg["guidance_high"]))
    name = "cfg_velocity_in" if inside else "cfg_velocity_out"
    assert_max_abs(spec, name, guided, v[name])


def test_time_grids_and_guided_steps(case):
    _, spec, v, _ = case
    s, cfg = spec["sampler"], spec["cfg"]
    grid = make_time_grid(s["num_steps"])
    assert torch.equal(grid, v["ode_time_grid"])
    sde = official_sampler("sde", s["sde_num_steps"])
    sde_grid = make_time_grid(sde.num_steps, t_end=sde.last_step)
    assert torch.allclose(torch.cat([sde_grid, sde_grid.new_zeros(1)]), v["sde_time_grid"], rtol=0, atol=1e-15)
    # effigen's interval test, on the float32 times the network sees, picks the steps REPA guided
    inside = (grid[:-1].float() >= cfg["guidance_low"]) & (grid[:-1].float() <= cfg["guidance_high"])
    assert torch.equal(inside, v["ode_guided_steps"])


class Recorder(torch.nn.Module):
    """The network, keeping the first `batch` rows of every input it is given (the state, not the null-class copy)."""

    def __init__(self, network, batch):
        super().__init__()
        self.network, self.batch, self.inputs = network, batch, []

    def forward(self, x, t, y):
        self.inputs.append(x[: self.batch].clone())
        return self.network(x, t, y)


@pytest.mark.parametrize("guided", [True, False])
def test_euler_ode_samples(case, guided):
    _, spec, v, pipeline = case
    s, cfg = spec["sampler"], spec["cfg"]
    sampler = official_sampler("ode", s["num_steps"], cfg["cfg_scale"] if guided else 1.0, cfg["guidance_low"],
                               cfg["guidance_high"])
    noise, y = v["sample_noise"], v["sample_y"]
    network = Recorder(pipeline.generator, noise.shape[0])
    sample = pipeline.objective.sample(network, y, tuple(noise.shape[1:]), sampler, noise=noise)
    name = "ode_cfg_sample" if guided else "ode_nocfg_sample"
    assert_max_abs(spec, name, sample, v[name])
    if guided:
        trajectory = torch.stack(network.inputs + [sample])
        assert_max_abs(spec, "ode_cfg_trajectory", trajectory, v["ode_cfg_trajectory"])


def heun_guidance_crossings(grid, low, high):
    """Steps whose corrector (at t_next) effigen guides differently from REPA (which keeps the decision at t_cur)."""
    inside = lambda t: low <= float(t) <= high  # noqa: E731
    return [i for i in range(len(grid) - 2) if inside(grid[i]) != inside(grid[i + 1])]


def test_heun_sample_with_repas_guidance_rule(case):
    """effigen's Heun solver with REPA's rule: the guidance decision of a step is taken at its start time t_cur and
    kept for the corrector at t_next."""
    _, spec, v, pipeline = case
    s, cfg = spec["sampler"], spec["cfg"]
    y, calls = v["sample_y"], {"n": 0, "start": 1.0}

    def velocity(x, t):
        if calls["n"] % 2 == 0:  # heun_sample alternates predictor (at t_cur) and corrector (at t_next)
            calls["start"] = t[0].item()
        calls["n"] += 1
        inside = cfg["guidance_low"] <= calls["start"] <= cfg["guidance_high"]
        return guided_prediction(pipeline.generator, x, t, y, pipeline.num_classes, cfg["cfg_scale"] if inside else 1.0)

    sample = heun_sample(velocity, v["sample_noise"], make_time_grid(s["num_steps"]))
    assert calls["n"] == 2 * s["num_steps"] - 1
    assert_max_abs(spec, "ode_heun_cfg_sample", sample, v["ode_heun_cfg_sample"])


def test_heun_sample_of_the_folder_sampler(case):
    """The folder's own Heun (`official_sampler("ode", heun=True)`) keeps the guidance decision of a step's start for
    its corrector, as REPA's euler_sampler does (`cfg_interval_at="step_start"`); deciding at each evaluation time
    instead differs wherever a step's corrector lies on the other side of an interval end than its start."""
    _, spec, v, pipeline = case
    s, cfg = spec["sampler"], spec["cfg"]
    sampler = official_sampler("ode", s["num_steps"], cfg["cfg_scale"], cfg["guidance_low"], cfg["guidance_high"], heun=True)
    assert sampler.cfg_interval_at == "step_start"
    noise = v["sample_noise"]
    sample = pipeline.objective.sample(pipeline.generator, v["sample_y"], tuple(noise.shape[1:]), sampler, noise=noise)
    assert_max_abs(spec, "ode_heun_cfg_sample", sample, v["ode_heun_cfg_sample"])
    crossings = heun_guidance_crossings(make_time_grid(s["num_steps"]), cfg["guidance_low"], cfg["guidance_high"])
    if crossings:  # the other rule really differs on this grid
        import dataclasses

        per_evaluation = dataclasses.replace(sampler, cfg_interval_at="evaluation")
        other = pipeline.objective.sample(pipeline.generator, v["sample_y"], tuple(noise.shape[1:]), per_evaluation,
                                          noise=noise)
        assert max_abs_error(other, v["ode_heun_cfg_sample"]) > tolerance(spec, "ode_heun_cfg_sample")


def test_euler_maruyama_sde_sample_with_the_recorded_noise(case, monkeypatch):
    _, spec, v, pipeline = case
    s, cfg = spec["sampler"], spec["cfg"]
    sampler = official_sampler("sde", s["sde_num_steps"], cfg["cfg_scale"], cfg["guidance_low"], cfg["guidance_high"])
    draws, noise = v["sde_noise_draws"], v["sample_noise"]  # draws: REPA's randn_like draws (steps - 1, B, C, H, W)
    generator, used = replay_noise(monkeypatch, draws)
    sample = pipeline.objective.sample(pipeline.generator, v["sample_y"], tuple(noise.shape[1:]), sampler, generator,
                                       noise=noise)
    monkeypatch.undo()
    assert len(used) == draws.shape[0] * draws.shape[1]  # every draw used once, none on the last (noiseless) step
    assert_max_abs(spec, "sde_cfg_sample", sample, v["sde_cfg_sample"])


class RecordedTeacher(Teacher):
    """Stands in for the encoder: the manifest's random teacher features (REPA's train.py: DINOv2 patch tokens)."""

    name = "recorded"

    def __init__(self, features):
        super().__init__()
        self.recorded, self.embed_dim = features, features.shape[-1]

    def features(self, images, grid=None):
        return self.recorded


class RecordedRandom:
    """The trainer's per-step random stream, replaying what SILoss drew: the noise, then t; label dropout is off."""

    key = (0, 0, 0)

    def __init__(self, noise, time):
        self.queue = collections.deque([("randn", noise), ("rand", time)])
        self.batch = time.shape[0]

    def randn(self, *shape):
        kind, value = self.queue.popleft()
        assert kind == "randn" and tuple(value.shape[1:]) == shape
        return value

    def rand(self, *shape):
        if self.queue:
            kind, value = self.queue.popleft()
            assert kind == "rand"
            return value
        return torch.ones(self.batch, *shape)  # the label-dropout draw: never below label_dropout = 0


def test_siloss_from_effigen_pieces(case):
    """SILoss(prediction='v', path_type='linear', weighting='uniform') with its recorded draws: the path, the target,
    the per-sample denoising loss, the student projections and the projection loss from effigen's parts."""
    _, spec, v, pipeline = case
    flow = RectifiedFlow(RectifiedFlowConfig(time_sampling="uniform", label_dropout=0.0), pipeline.num_classes)
    images, noise, t = v["loss_images"], v["loss_noise"], v["loss_time"]
    alpha, sigma, _, _ = flow.path.coefficients(t, images.dim())
    x_t = alpha * images + sigma * noise
    assert max_abs_error(x_t, v["loss_model_input"]) <= 1e-6 * float(v["loss_model_input"].abs().max())
    with torch.no_grad():
        out, zs = tapped_forward(pipeline, x_t, t, v["loss_y"])
    assert_max_abs(spec, "loss_model_output", out, v["loss_model_output"])
    denoising = ((out - flow.target(images, noise, t)) ** 2).mean(dim=(1, 2, 3))
    assert_max_abs(spec, "loss_denoising", denoising, v["loss_denoising"])
    proj = sum(repa_loss(z, v[f"loss_teacher_zs_{i}"]) for i, z in enumerate(zs)) / len(zs)
    for i, z in enumerate(zs):
        assert_max_abs(spec, f"loss_student_zs_{i}", z, v[f"loss_student_zs_{i}"])
    assert_max_abs(spec, "loss_proj", proj.reshape(1), v["loss_proj"])
    total = denoising.mean() + spec["loss"]["proj_coeff"] * proj
    assert_max_abs(spec, "loss_total", total.reshape(1), v["loss_total"])


def test_siloss_through_the_aligned_objective(case):
    """effigen's training loss (flow objective wrapped by `AlignedObjective`, method repa) on the recorded draws gives
    REPA's loss = denoising.mean() + proj_coeff * proj."""
    _, spec, v, pipeline = case
    projector = pipeline.components["projector"]
    flow = RectifiedFlow(RectifiedFlowConfig(time_sampling="uniform", label_dropout=0.0), pipeline.num_classes)
    config = AlignConfig(method="repa", block=pipeline.info["encoder_depth"], projector_dim=projector.config.hidden_dim,
                         proj_coeff=spec["loss"]["proj_coeff"])
    objective = AlignedObjective(flow, config, RecordedTeacher(v["loss_teacher_zs_0"]), pipeline.generator)
    state = projector.state_dict()
    several = len(spec["sit"]["z_dims"]) != 1
    if several:  # AlignedObjective aligns to one teacher: it takes the checkpoint's first projector and teacher
        state = {k: w for k, w in state.items() if k.startswith("projectors.0.")}
    objective.projectors.load_state_dict(state)
    batch = {"images": v["loss_images"], "labels": v["loss_y"]}
    with torch.no_grad():
        out = objective.loss(pipeline.generator, batch, RecordedRandom(v["loss_noise"], v["loss_time"]))
    assert_max_abs(spec, "loss_denoising", out["mse"], v["loss_denoising"].mean())
    if several:  # REPA's first per-projector term, from the official student and teacher features it recorded
        proj = repa_loss(v["loss_student_zs_0"], v["loss_teacher_zs_0"]).reshape(1)
        assert_max_abs(spec, "loss_proj", out["proj_loss"].reshape(1), proj)
        total = v["loss_denoising"].mean().reshape(1) + spec["loss"]["proj_coeff"] * proj
        assert_max_abs(spec, "loss_total", out["loss"].reshape(1), total)
        return
    assert_max_abs(spec, "loss_proj", out["proj_loss"].reshape(1), v["loss_proj"])
    assert_max_abs(spec, "loss_total", out["loss"].reshape(1), v["loss_total"])


@pytest.mark.parametrize("layout", ["bare", "ema-only"])
def test_released_last_pt_layouts(case, tmp_path, layout):
    """The released last.pt: the state dict itself (generate.py's loader in some versions) or {'ema': ...}. Neither
    stores encoder_depth: given, it converts to the same network and projectors."""
    path, spec, v, pipeline = case
    state, _, _, _ = load_official_checkpoint(path / spec["checkpoint"])
    last = tmp_path / "last.pt"
    torch.save(state if layout == "bare" else {"ema": state}, last)
    heads = pipeline.generator.config.num_heads if repa_heads_argument(path, spec) else None
    out = convert_repa_official(last, tmp_path / "released", heads, keep_projectors=True,
                                encoder_depth=spec["sit"]["encoder_depth"])
    released = Pipeline.from_pretrained(out)
    for name in ("generator", "projector"):
        mine, theirs = released.components[name].state_dict(), pipeline.components[name].state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        out, zs = tapped_forward(released, v["x"], v["t"], v["y"])
    assert_max_abs(spec, "forward_out", out, v["forward_out"])
    assert_max_abs(spec, "forward_zs_0", zs[0], v["forward_zs_0"])
    assert released.info["weights"] == ("state dict" if layout == "bare" else "ema")
    assert released.info["encoder_depth_source"] == "given"


def test_bare_state_dict_without_encoder_depth(case, tmp_path):
    path, spec, _, pipeline = case
    state, _, _, _ = load_official_checkpoint(path / spec["checkpoint"])
    torch.save(state, tmp_path / "last.pt")
    heads = pipeline.generator.config.num_heads if repa_heads_argument(path, spec) else None
    if spec["sit"]["depth"] >= 8:  # REPA's generate.py default (8) fits: taken, and the info says so
        out = convert_repa_official(tmp_path / "last.pt", tmp_path / "a", heads, keep_projectors=True)
        assert Pipeline.from_pretrained(out).info["encoder_depth"] == 8
        return
    out = convert_repa_official(tmp_path / "last.pt", tmp_path / "a", heads)  # projectors dropped: not needed
    converted = Pipeline.from_pretrained(out)
    assert converted.info["encoder_depth"] is None and "projector" not in converted.components
    with pytest.raises(CheckpointError, match="--encoder-depth"):
        convert_repa_official(tmp_path / "last.pt", tmp_path / "b", heads, keep_projectors=True)


_executed = []


def _record_execution():
    _executed.append(True)
    return {}


class _Payload:
    """Unpickling this runs `_record_execution` (harmless): what an unsafe loader would do with a malicious file."""

    def __reduce__(self):
        return (_record_execution, ())


def test_unsafe_pickle_is_refused(case, tmp_path):
    path, spec, _, _ = case
    state, args, _, _ = load_official_checkpoint(path / spec["checkpoint"])
    bad = tmp_path / "0050000.pt"
    torch.save({"ema": state, "args": argparse.Namespace(**args), "extra": _Payload()}, bad)
    with pytest.raises(CheckpointError, match=r"pickled objects other than tensors.*weights_only=True"):
        convert_repa_official(bad, tmp_path / "out", spec["sit"]["num_heads"])
    assert not _executed and not (tmp_path / "out").exists()


def test_convert_command(case, tmp_path, capsys):
    from effigen.cli.main import main

    path, spec, _, pipeline = case
    heads = repa_heads_argument(path, spec)
    flags = ["--num-heads", str(heads)] if heads else []
    source = str(path / spec["checkpoint"])
    assert main(["convert", "repa-official", "--ckpt", source, "--out", str(tmp_path / "dropped"), *flags]) == 0
    dropped = Pipeline.from_pretrained(tmp_path / "dropped")
    assert "projector" not in dropped.components and dropped.info["projector_block"] == spec["sit"]["encoder_depth"] - 1
    assert dropped.info["projectors"]["saved"].startswith("dropped")
    for key, value in dropped.generator.state_dict().items():
        assert torch.equal(value, pipeline.generator.state_dict()[key])
    assert main(["convert", "repa-official", "--ckpt", source, "--out", str(tmp_path / "kept"), "--keep-projectors",
                 "--mode", "ode", "--steps", "50", *flags]) == 0
    kept = Pipeline.from_pretrained(tmp_path / "kept")
    assert "projector" in kept.components and (kept.sampler_config.solver, kept.sampler_config.num_steps) == ("euler", 50)
    shape = (1, spec["sit"]["in_channels"], spec["sit"]["input_size"], spec["sit"]["input_size"])
    assert dropped([0], output_type="latent", num_steps=2).shape == shape
    assert main(["convert", "sit-official", "--ckpt", source, "--out", str(tmp_path / "sit"), *flags]) == 2
    assert "repa-official" in capsys.readouterr().err  # a REPA file given to the SiT converter names the right one
