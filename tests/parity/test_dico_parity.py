"""Parity with shallowdream204/DiCo: forward, the null-class forward, the official guided forward (first-3-channels
CFG), DDIM (eta = 0) with and without guidance, and ancestral DDPM replaying the recorded step noise, from a
checkpoint in the official training format converted with `effigen convert dico-official`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from effigen.convert.dico_official import convert_dico_official
from effigen.objectives.ddpm import DDPMSamplerConfig
from effigen.pipeline import Pipeline
from effigen.samplers import guided_prediction
from effigen.samplers.diffusion import DiffusionSchedule

from .common import discover, folder, manifest, relative_error, vectors_path

pytestmark = pytest.mark.parity


@pytest.fixture(params=discover("dico-official"))
def case(request, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = folder(request.param)
    spec = manifest(path)
    out = convert_dico_official(path / spec["checkpoint"], tmp_path / "converted", input_size=spec["dico"]["input_size"])
    return path, spec, load_file(str(vectors_path(path, spec))), Pipeline.from_pretrained(out)


def test_convert_command_uses_ema(case, tmp_path):
    from effigen.cli.main import main

    path, spec, vectors, pipeline = case
    dico = spec["dico"]
    assert main(["convert", "dico-official", "--ckpt", str(path / spec["checkpoint"]), "--out", str(tmp_path / "cli"),
                 "--input-size", str(dico["input_size"])]) == 0
    converted = Pipeline.from_pretrained(tmp_path / "cli")
    assert converted.sampler_config.cfg_channels == 3 and converted.method.name == "dico-ddpm"
    ema = torch.load(path / spec["checkpoint"], weights_only=True)["ema"]
    for key, value in converted.generator.state_dict().items():
        assert torch.equal(value, ema[key].float()), key
    shape = (1, dico["in_channels"], dico["input_size"], dico["input_size"])
    assert converted([0], output_type="latent", num_steps=2).shape == shape


def test_config_is_read_off_the_checkpoint(case):
    _, spec, _, pipeline = case
    config, dico = pipeline.generator.config, spec["dico"]
    for key in ("input_size", "in_channels", "hidden_size", "depth", "mlp_ratio", "num_classes", "learn_sigma",
                "out_channels"):
        assert getattr(config, key) == dico[key], key
    assert pipeline.num_classes == dico["null_class_id"]


def _forward(pipeline, x, t, y):
    T = pipeline.objective_config.num_timesteps
    with torch.no_grad():
        return pipeline.generator(x, t.float() / T, y)


def test_forward_and_null_class(case):
    _, spec, vectors, pipeline = case
    tol = spec["tolerance"]["forward_rel_l2"]
    out = _forward(pipeline, vectors["x"], vectors["t"], vectors["y"])
    assert relative_error(out, vectors["forward_out"]) < tol
    null = torch.full_like(vectors["y"], spec["dico"]["null_class_id"])
    assert relative_error(_forward(pipeline, vectors["x"], vectors["t"], null), vectors["forward_null_out"]) < tol


def test_guided_forward_first_three_channels(case):
    _, spec, vectors, pipeline = case
    T = pipeline.objective_config.num_timesteps
    tol = spec["tolerance"]["forward_rel_l2"]
    x, t, y = vectors["cfg_input_x"], vectors["cfg_input_t"].float() / T, vectors["cfg_input_y"]
    half = x.shape[0] // 2
    with torch.no_grad():
        guided = guided_prediction(pipeline.generator, x[:half], t[:half], y[:half], pipeline.num_classes,
                                   spec["cfg"]["cfg_scale"], channels=3)
    expected = vectors["forward_with_cfg_out"][:half]
    assert relative_error(guided, expected) < tol
    second = vectors["forward_with_cfg_out"][half:]
    assert torch.allclose(second[:, :3], expected[:, :3])
    uncond = _forward(pipeline, x[:half], vectors["cfg_input_t"][half:], y[half:])  # official: first half of x
    assert relative_error(uncond[:, 3:], second[:, 3:]) < tol


def _sample(pipeline, vectors, spec, solver, cfg_scale, **kwargs):
    steps = spec["sampler"][solver]["steps"]
    key = "ddim_timesteps" if solver == "ddim" else "ddpm_timesteps"
    schedule = DiffusionSchedule.create("linear", pipeline.objective_config.num_timesteps, steps)
    # the respaced schedule hands the network the original timesteps the official loop used
    times = schedule.network_time(torch.arange(steps)) * pipeline.objective_config.num_timesteps
    assert torch.allclose(times.double(), vectors[key].double()), (times, vectors[key])
    sampler = DDPMSamplerConfig(solver=solver, num_steps=steps, eta=0.0, cfg_scale=cfg_scale, cfg_channels=3,
                                clip_denoised=spec["sampler"][solver]["clip_denoised"])
    noise = vectors["sample_noise"]
    return pipeline.objective.sample(pipeline.generator, vectors["y"], tuple(noise.shape[1:]), sampler, noise=noise,
                                     **kwargs)


@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "nocfg"])
def test_ddim_sample(case, guided):
    _, spec, vectors, pipeline = case
    sample = _sample(pipeline, vectors, spec, "ddim", spec["cfg"]["cfg_scale"] if guided else 1.0)
    expected = vectors["ddim_sample" if guided else "ddim_sample_nocfg"]
    assert relative_error(sample, expected) < spec["tolerance"]["sample_rel_l2"]


def test_ddpm_sample_with_recorded_noise(case):
    _, spec, vectors, pipeline = case
    B = vectors["sample_noise"].shape[0]
    step_noise = vectors["ddpm_step_noise"][:, :B]  # the official batch is doubled; the sample is its first half
    sample = _sample(pipeline, vectors, spec, "ddpm", spec["cfg"]["cfg_scale"], step_noise=step_noise)
    assert relative_error(sample, vectors["ddpm_sample"]) < spec["tolerance"]["sample_rel_l2"]
