"""Parity with hustvl/LightningDiT: forward velocity (its time direction, t = 0 noise), the official guided
forward (first-3-channels CFG, interval on t[0]), and the shifted-grid Euler samples, from a training checkpoint
converted with `effigen convert lightningdit-official`. effigen's converted network works in effigen's
conventions (t = 1 - t_official, velocity = -official velocity); the tests translate at the boundary."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from effigen.convert.lightningdit_official import convert_lightningdit_official, official_sampler
from effigen.pipeline import Pipeline
from effigen.samplers import guided_prediction, make_time_grid

from .common import discover, folder, manifest, relative_error, vectors_path

pytestmark = pytest.mark.parity


@pytest.fixture(params=discover("lightningdit-official"))
def case(request, tmp_path):
    path = folder(request.param)
    spec = manifest(path)
    official = spec["lightningdit"]
    # the weights give the head count through RoPE's table or qk-norm's width; without either, a user passes it
    num_heads = None if official["use_rope"] or official["use_qknorm"] else official["num_heads"]
    out = convert_lightningdit_official(path / spec["checkpoint"], tmp_path / "converted", num_heads)
    return spec, load_file(str(vectors_path(path, spec))), Pipeline.from_pretrained(out)


def official_velocity(network, x, t_official, y):
    return -network(x, 1 - t_official, y)


def official_guided(pipeline, spec, x, t_official, y, interval: bool):
    start = spec["cfg"]["cfg_interval_start"]
    return -guided_prediction(pipeline.generator, x, 1 - t_official, y, pipeline.num_classes, spec["cfg"]["cfg_scale"],
                              interval=(0.0, 1.0 - start) if interval else None, channels=3)


def test_config_is_read_off_the_checkpoint(case):
    spec, _, pipeline = case
    config, official = pipeline.generator.config, spec["lightningdit"]
    assert (config.hidden_size, config.depth, config.num_heads, config.patch_size, config.in_channels) == (
        official["hidden_size"], official["depth"], official["num_heads"], official["patch_size"], official["in_channels"])
    assert config.rope == official["use_rope"] and config.qk_norm == official["use_qknorm"]
    assert (config.norm == "rmsnorm") == official["use_rmsnorm"] and (config.mlp == "swiglu") == official["use_swiglu"]
    assert config.num_classes == official["num_classes"] and config.adaln_shift == (not official["wo_shift"])
    assert config.input_size == official["input_size"]
    mlp, mlp_hidden = pipeline.generator.blocks[0].mlp, int(official["hidden_size"] * official["mlp_ratio"])
    if official["use_swiglu"]:  # official: SwiGLUFFN(hidden_size, int(2 / 3 * mlp_hidden_dim))
        assert mlp.w3.in_features == official.get("swiglu_hidden", int(2 / 3 * mlp_hidden))
    else:
        assert mlp.fc1.out_features == mlp_hidden


def test_forward_velocity(case):
    spec, v, pipeline = case
    tol = spec["tolerance"]["forward_rel_l2"]
    with torch.no_grad():
        out = official_velocity(pipeline.generator, v["x"], v["t"], v["y"])
        null = official_velocity(pipeline.generator, v["x"], v["t"], torch.full_like(v["y"], pipeline.num_classes))
    assert relative_error(out, v["forward_out"]) < tol
    assert relative_error(null, v["forward_null_out"]) < tol


@pytest.mark.parametrize("t_key, out_key, interval", [
    ("cfg_input_t", "forward_with_cfg_out", True),
    ("cfg_input_t_low", "forward_with_cfg_low_t_out", True),
    ("cfg_input_t_low", "forward_with_cfg_low_t_nointerval_out", False),
])
def test_guided_forward(case, t_key, out_key, interval):
    spec, v, pipeline = case
    half = v["cfg_input_x"].shape[0] // 2
    x, t, y = v["cfg_input_x"][:half], v[t_key][:half], v["cfg_input_y"][:half]
    expected = v[out_key]
    with torch.no_grad():
        guided = official_guided(pipeline, spec, x, t, y, interval)
        uncond = official_velocity(pipeline.generator, x, t, v["cfg_input_y"][half:])
    tol = spec["tolerance"]["forward_rel_l2"]
    assert relative_error(guided, expected[:half]) < tol
    # second half: the same guided 3 channels, the unconditional output elsewhere
    assert relative_error(expected[half:, :3], expected[:half, :3]) < tol
    assert relative_error(uncond[:, 3:], expected[half:, 3:]) < tol


def test_time_grid_translation(case):
    spec, v, pipeline = case
    sampler = official_sampler(spec["sampler"]["num_sampling_steps"], spec["sampler"]["timestep_shift"])
    grid = 1 - make_time_grid(sampler.num_steps, shift=sampler.time_shift)
    assert relative_error(grid.float(), v["sample_time_grid"]) < 1e-6


@pytest.mark.parametrize("guided", [True, False])
def test_euler_samples(case, guided):
    spec, v, pipeline = case
    s = spec["sampler"]
    sampler = official_sampler(s["num_sampling_steps"], s["timestep_shift"], s["cfg_scale"] if guided else 1.0,
                               spec["cfg"]["cfg_interval_start"])
    sample = pipeline.objective.sample(pipeline.generator, v["y"], tuple(v["sample_noise"].shape[1:]), sampler,
                                       noise=v["sample_noise"])
    expected = v["sample_cfg"] if guided else v["sample_nocfg"]
    assert relative_error(sample, expected) < spec["tolerance"]["sample_rel_l2"]
