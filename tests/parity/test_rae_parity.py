"""Parity with bytetriper/RAE stage 2 (DiT^DH with its wide DDT head, `DDT.py`; transport + Euler `sample_ode`):
forward velocity (t = 1 noise, effigen's own direction), CFG on all channels with a per-sample interval,
autoguidance with the smaller guidance model, and Euler samples over the shifted decreasing grid that stops at its
last point, from a training checkpoint converted with `effigen convert rae-official --guidance-ckpt`. Every size,
setting and value comes from the folder's manifest."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from effigen.convert.rae_official import convert_rae_official, official_sampler
from effigen.models.dit import DiT
from effigen.pipeline import Pipeline
from effigen.samplers import guided_prediction, make_time_grid
from effigen.samplers.guidance import autoguided_prediction

from .common import discover, folder, manifest, relative_error, vectors_path

pytestmark = pytest.mark.parity


@pytest.fixture(params=discover("rae-ddt-official"))
def case(request, tmp_path):
    path = folder(request.param)
    spec = dict(manifest(path), folder=path)
    # the split of the blocks is in the weights unless encoder and head widths agree; then a user passes --head-depth
    head_depths = [model["depth"][1] if model["hidden_size"][0] == model["hidden_size"][1] else None
                   for model in (spec["ddt"], spec["guidance_model_ddt"])]
    out = convert_rae_official(path / spec["checkpoint"], tmp_path / "converted", path / spec["guidance_checkpoint"],
                               head_depth=head_depths[0], guidance_head_depth=head_depths[1])
    return spec, load_file(str(vectors_path(path, spec))), Pipeline.from_pretrained(out)


def sampler_settings(spec, guidance: str | None):
    s, g = spec["sampler"], spec["guidance"]
    scale = {"cfg": g["cfg_scale"], "autoguidance": g["autoguidance_scale"], None: 1.0}[guidance]
    return official_sampler(s["num_steps"], s["time_dist_shift_dim"], s["time_dist_shift_base"], scale,
                            guidance or "cfg", g["t_min"], g["t_max"])


@pytest.mark.parametrize("key, which", [("ddt", "generator"), ("guidance_model_ddt", "guidance_model")])
def test_config_is_read_off_the_checkpoint(case, key, which):
    spec, _, pipeline = case
    official = spec[key]
    network: DiT = pipeline.components[which]
    config = network.config
    assert [config.hidden_size, config.head_hidden_size] == official["hidden_size"]
    assert [config.depth, config.head_depth] == official["depth"]
    assert [config.num_heads, config.head_num_heads] == official["num_heads"]
    assert (config.input_size, config.patch_size, config.in_channels, config.out_channels) == (
        official["input_size"], official["patch_size"], official["in_channels"], official["out_channels"])
    assert config.num_classes == official["num_classes"] and official["null_class_id"] == config.num_classes
    assert config.rope == official["use_rope"] and config.qk_norm == official["use_qknorm"]
    assert (config.norm == "rmsnorm") == official["use_rmsnorm"] and (config.mlp == "swiglu") == official["use_swiglu"]
    assert config.adaln_shift == (not official["wo_shift"])
    assert config.absolute_positions == official["use_pos_embed"]
    if official["use_swiglu"]:
        assert [network.blocks[0].mlp.w3.in_features, network.head_blocks[0].mlp.w3.in_features] == official["swiglu_hidden"]
    # s_projector is an Identity (no weights) when the widths agree, else Linear(enc, dec)
    assert isinstance(network.head_projector, torch.nn.Linear) == (official["hidden_size"][0] != official["hidden_size"][1])


def test_frozen_buffers_are_kept(case):
    """The checkpoint's own Gaussian Fourier frequencies, RoPE tables and positions are what the network uses."""
    spec, _, pipeline = case
    path = spec["folder"]
    state = torch.load(path / spec["checkpoint"], map_location="cpu", weights_only=True)["ema"]
    network = pipeline.generator
    assert torch.equal(network.t_embedder.W, state["t_embedder.W"].float())
    if "pos_embed" in state:
        assert torch.equal(network.pos_embed, state["pos_embed"].float())
    assert torch.allclose(network.feat_rope.freqs_cos, state["enc_feat_rope.freqs_cos"].float(), atol=1e-6)
    assert torch.allclose(network.head_rope.freqs_sin, state["dec_feat_rope.freqs_sin"].float(), atol=1e-6)


def test_forward_velocity(case):
    spec, v, pipeline = case
    assert "t = 1 is pure NOISE" in spec["conventions"]["time"]  # effigen's direction: t passes through unchanged
    tol = spec["tolerance"]["forward_rel_l2"]
    null = torch.full_like(v["y"], spec["ddt"]["null_class_id"])
    with torch.no_grad():
        assert relative_error(pipeline.generator(v["x"], v["t"], v["y"]), v["forward_out"]) < tol
        assert relative_error(pipeline.generator(v["x"], v["t"], null), v["forward_null_out"]) < tol
        guide = pipeline.components["guidance_model"]
        assert relative_error(guide(v["x"], v["t"], v["y"]), v["guidance_model_forward_out"]) < tol


def test_cfg_forward(case):
    """Official forward_with_cfg: the first half of x for both halves, all channels guided, interval on each
    sample's t; both output halves hold the guided result."""
    spec, v, pipeline = case
    half = v["cfg_input_x"].shape[0] // 2
    x, t, y = v["cfg_input_x"][:half], v["cfg_input_t"][:half], v["cfg_input_y"][:half]
    g = spec["guidance"]
    with torch.no_grad():
        guided = guided_prediction(pipeline.generator, x, t, y, pipeline.num_classes, g["cfg_scale"],
                                   (g["t_min"], g["t_max"]))
    tol = spec["tolerance"]["forward_rel_l2"]
    expected = v["forward_with_cfg_out"]
    assert relative_error(guided, expected[:half]) < tol and relative_error(guided, expected[half:]) < tol


def test_autoguidance_forward(case):
    """Official forward_with_autoguidance on the doubled batch (no halving: the second half is guided with the null
    label for both models)."""
    spec, v, pipeline = case
    g = spec["guidance"]
    with torch.no_grad():
        out = autoguided_prediction(pipeline.generator, pipeline.components["guidance_model"], v["cfg_input_x"],
                                    v["cfg_input_t"], v["cfg_input_y"], g["autoguidance_scale"], (g["t_min"], g["t_max"]))
    assert relative_error(out, v["forward_with_autoguidance_out"]) < spec["tolerance"]["forward_rel_l2"]


def test_time_grid_translation(case):
    """The official decreasing grid 1 - linspace(0, 1 - 1/1000, N), shifted, ends at a point above 0."""
    spec, v, pipeline = case
    sampler = sampler_settings(spec, None)
    assert abs(sampler.time_shift - spec["sampler"]["time_dist_shift"]) < 1e-9
    grid = make_time_grid(sampler.num_steps, shift=sampler.time_shift, t_end=sampler.t_end)
    assert len(grid) == spec["sampler"]["num_steps"] and sampler.num_steps == spec["sampler"]["number_of_model_evaluations"]
    assert relative_error(grid.float(), v["sample_time_grid"]) < 1e-6
    assert grid[-1] > 0


@pytest.mark.parametrize("guidance, key", [("cfg", "sample_cfg"), ("autoguidance", "sample_autoguidance"),
                                           (None, "sample_noguidance")])
def test_euler_samples(case, guidance, key):
    spec, v, pipeline = case
    sampler = sampler_settings(spec, guidance)
    sample = pipeline.objective.sample(pipeline.generator, v["y"], tuple(v["sample_noise"].shape[1:]), sampler,
                                       noise=v["sample_noise"])
    assert relative_error(sample, v[key]) < spec["tolerance"]["sample_rel_l2"]
