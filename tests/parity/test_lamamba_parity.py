"""Parity with yunxiangfu2001/LaMamba-Diff: forward and null-class forward with the snake scan paths, forward with the
raster cross scan (same weights), the official guided forward (CFG on all in_chans eps channels), DDIM (eta = 0) with
CFG and ancestral DDPM replaying the recorded step noise, from a checkpoint in the official training format (+ its
yaml) converted with `effigen convert lamamba-official`. Every setting and tolerance comes from the manifest."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from effigen.convert.lamamba_official import convert_lamamba_official
from effigen.pipeline import Pipeline
from effigen.samplers import guided_prediction
from effigen.samplers.diffusion import DiffusionSchedule

from .common import discover, folder, manifest, relative_error, vectors_path

pytestmark = pytest.mark.parity


@pytest.fixture(params=discover("lamamba-official"))
def case(request, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = folder(request.param)
    spec = manifest(path)
    yaml = path / spec["lamamba"]["config_yaml"]
    out = convert_lamamba_official(path / spec["checkpoint"], tmp_path / "converted", yaml)
    return path, spec, load_file(str(vectors_path(path, spec))), Pipeline.from_pretrained(out)


def _tol(spec, name):
    return spec["tolerance"]["per_tensor"][name]


def test_convert_command_uses_ema_and_reads_the_yaml(case, tmp_path):
    from effigen.cli.main import main

    path, spec, vectors, pipeline = case
    lm = spec["lamamba"]
    assert main(["convert", "lamamba-official", "--ckpt", str(path / spec["checkpoint"]), "--config",
                 str(path / lm["config_yaml"]), "--out", str(tmp_path / "cli")]) == 0
    converted = Pipeline.from_pretrained(tmp_path / "cli")
    assert converted.method.name == "lamamba-ddpm"
    assert converted.sampler_config.cfg_channels == lm["in_chans"]  # official: guidance on all in_chans eps channels
    assert converted.generator.config.scan == ("snake" if lm["continuous_scan"] else "raster")
    ema = torch.load(path / spec["checkpoint"], weights_only=True)["ema"]
    for key, value in converted.generator.state_dict().items():
        assert torch.equal(value, ema[key].float()), key


def test_config_is_read_off_the_checkpoint(case):
    _, spec, _, pipeline = case
    config, lm = pipeline.generator.config, spec["lamamba"]
    assert config.input_size == lm["latent_size"] == lm["image_size"] // 8
    assert (config.in_channels, config.out_channels, config.learn_sigma) == (lm["in_chans"], lm["out_channels"],
                                                                            lm["learn_sigma"])
    assert (config.num_classes, pipeline.num_classes) == (lm["num_classes"], lm["null_class_id"])
    assert (config.patch_size, config.embed_dim, config.dims) == (lm["patch_size"], lm["embed_dim"], lm["dims"])
    assert (config.depths, config.bottleneck_depth) == (lm["depths"], lm["bottleneck_depth"])
    assert [len(s.blocks) for s in pipeline.generator.layers_up] == lm["decoder_depths"]
    assert config.num_heads == lm["num_heads"] and config.window_size == lm["window_size"]
    assert (config.d_state, config.ssm_ratio, config.d_conv, config.conv_bias) == (
        lm["ssm_d_state"], lm["ssm_ratio"], lm["ssm_conv"], lm["ssm_conv_bias"])
    assert [s.blocks[0].op.rank for s in pipeline.generator.layers] == lm["dt_rank_per_stage"]
    assert config.mlp_ratio == lm["mlp_ratio"] and config.encoder_resolutions() == lm["encoder_resolutions"]
    assert [s.blocks[0].attn.window for s in pipeline.generator.layers_up] == lm["effective_window"]
    blocks = len(pipeline.generator.blocks())
    assert blocks == lm["selective_scan_calls_per_forward"]


def _forward(network, x, t, y):
    with torch.no_grad():
        return network(x, t.float() / 1000, y)  # effigen t in [0, 1]; the embedding sees 1000 t (integer DDPM t)


def test_forward_and_null_class_snake(case):
    _, spec, vectors, pipeline = case
    out = _forward(pipeline.generator, vectors["x"], vectors["t"], vectors["y"])
    assert relative_error(out, vectors["forward_out"]) < _tol(spec, "forward_out")
    null = torch.full_like(vectors["y"], spec["lamamba"]["null_class_id"])
    out = _forward(pipeline.generator, vectors["x"], vectors["t"], null)
    assert relative_error(out, vectors["forward_null_out"]) < _tol(spec, "forward_null_out")


def test_forward_raster_cross_scan(case, tmp_path):
    path, spec, vectors, pipeline = case
    out = convert_lamamba_official(path / spec["checkpoint"], tmp_path / "raster", scan="raster")
    raster = Pipeline.from_pretrained(out).generator
    assert raster.config.scan == "raster"
    result = _forward(raster, vectors["x"], vectors["t"], vectors["y"])
    assert relative_error(result, vectors["forward_out_other_scan"]) < _tol(spec, "forward_out_other_scan")
    # and the scan order matters: the snake network's output is measurably different
    snake = _forward(pipeline.generator, vectors["x"], vectors["t"], vectors["y"])
    assert relative_error(snake, vectors["forward_out_other_scan"]) > 10 * _tol(spec, "forward_out_other_scan")


def test_guided_forward_all_eps_channels(case):
    _, spec, vectors, pipeline = case
    C = spec["lamamba"]["in_chans"]
    x, t, y = vectors["cfg_input_x"], vectors["cfg_input_t"].float() / 1000, vectors["cfg_input_y"]
    half = x.shape[0] // 2
    with torch.no_grad():
        guided = guided_prediction(pipeline.generator, x[:half], t[:half], y[:half], pipeline.num_classes,
                                   spec["cfg"]["cfg_scale"], channels=pipeline.sampler_config.cfg_channels)
    expected = vectors["forward_with_cfg_out"]
    assert relative_error(guided, expected[:half]) < _tol(spec, "forward_with_cfg_out")
    assert torch.equal(expected[half:, :C], expected[:half, :C])  # the guided eps is copied into both halves
    # the official unconditional half runs on the first half of x
    uncond = _forward(pipeline.generator, x[:half], vectors["cfg_input_t"][half:], y[half:])
    assert relative_error(uncond[:, C:], expected[half:, C:]) < _tol(spec, "forward_with_cfg_out")


def _sample(pipeline, vectors, spec, solver, **kwargs):
    settings = spec["sampler"][solver]
    steps = settings["steps"]
    schedule = DiffusionSchedule.create("linear", pipeline.objective_config.num_timesteps, steps)
    # the respaced schedule hands the network the original timesteps the official loop used
    times = schedule.network_time(torch.arange(steps)) * pipeline.objective_config.num_timesteps
    key = "ddim_timesteps" if solver == "ddim" else "ddpm_timesteps"
    assert torch.allclose(times.double(), vectors[key].double()), (times, vectors[key])
    sampler = dataclasses.replace(pipeline.sampler_config, solver=solver, num_steps=steps,
                                  eta=settings.get("eta", 0.0), cfg_scale=spec["cfg"]["cfg_scale"],
                                  clip_denoised=settings["clip_denoised"])
    noise = vectors["sample_noise"]
    with torch.no_grad():
        return pipeline.objective.sample(pipeline.generator, vectors["y"], tuple(noise.shape[1:]), sampler,
                                         noise=noise, **kwargs)


def test_ddim_sample_with_cfg(case):
    _, spec, vectors, pipeline = case
    sample = _sample(pipeline, vectors, spec, "ddim")
    assert relative_error(sample, vectors["ddim_sample"]) < _tol(spec, "ddim_sample")


def test_ddpm_sample_with_recorded_noise(case):
    _, spec, vectors, pipeline = case
    B = vectors["sample_noise"].shape[0]
    step_noise = vectors["ddpm_step_noise"][:, :B]  # the official batch is doubled; the sample is its first half
    sample = _sample(pipeline, vectors, spec, "ddpm", step_noise=step_noise)
    assert relative_error(sample, vectors["ddpm_sample"]) < _tol(spec, "ddpm_sample")
