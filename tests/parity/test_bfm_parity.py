"""Parity with mlvlab/Blockwise-Flow-Matching: per-segment and null-class velocity, trunk features, projector output,
the FRN approximation, its target and the FRN velocity, sample_ode / sample_ode_frn with and without CFG, and
sample_sde replaying the recorded step noise, from the EMA `model_1.safetensors` of a train_frn.py model converted
with `effigen convert bfm-official`. Every setting and tolerance is read from each folder's manifest."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from effigen.convert.bfm_official import convert_bfm_official
from effigen.models.bfm import segment_edges, segment_of
from effigen.objectives.bfm import fra_coefficient
from effigen.pipeline import Pipeline

from .common import discover, folder, manifest, relative_error, vectors_path

pytestmark = pytest.mark.parity


@pytest.fixture(params=discover("bfm-official"))
def case(request, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = folder(request.param)
    spec = manifest(path)
    bfm = spec["bfm"]
    out = convert_bfm_official(path / spec["checkpoint"], tmp_path / "converted", in_channels=bfm["in_channels"],
                               input_size=bfm["context_size"], steps_per_segment=spec["sampler"]["num_steps_per_segment"],
                               cfg_scale=spec["sampler"]["cfg_scale"])
    return path, spec, load_file(str(vectors_path(path, spec))), Pipeline.from_pretrained(out)


def test_convert_command_and_config(case, tmp_path):
    from effigen.cli.main import main

    path, spec, vectors, pipeline = case
    bfm = spec["bfm"]
    assert main(["convert", "bfm-official", "--ckpt", str(path / spec["checkpoint"]), "--out", str(tmp_path / "cli"),
                 "--input-size", str(bfm["context_size"]), "--in-channels", str(bfm["in_channels"]),
                 "--steps-per-segment", "1"]) == 0
    converted = Pipeline.from_pretrained(tmp_path / "cli")
    assert converted.method.name == "bfm" and converted.objective_config.stage == "fra"
    official = load_file(str(path / spec["checkpoint"]))
    state = converted.generator.state_dict()
    assert set(state) == set(official)
    for key, value in state.items():
        assert torch.equal(value, official[key].float()), key
    config = converted.generator.config
    for ours, theirs in (("input_size", "context_size"), ("patch_size", "patch_size"), ("in_channels", "in_channels"),
                         ("hidden_size", "hidden_size"), ("num_heads", "num_heads"), ("mlp_ratio", "mlp_ratio"),
                         ("num_classes", "num_classes"), ("segments", "segments"), ("segment_depth", "segment_depth"),
                         ("feature_alignment_depth", "feature_alignment_depth"), ("frn_depth", "frn_depth"),
                         ("adaln_lora_dim", "adaln_lora_dim"), ("projection_dim", "dim_projection")):
        assert getattr(config, ours) == bfm[theirs], ours
    assert pipeline.num_classes == bfm["null_class_id"]
    assert torch.equal(segment_edges(config.segments), vectors["segment_edges"])
    shape = (1, bfm["in_channels"], bfm["context_size"], bfm["context_size"])
    assert converted([0], output_type="latent").shape == shape


def _check(out, ref, tolerance, name):
    error = relative_error(out, ref)
    assert error < tolerance, f"{name}: relative L2 error {error:.3g} >= {tolerance}"


def test_forward_segments_trunk_projector(case):
    _, spec, v, pipeline = case
    net, tol = pipeline.generator.eval(), spec["tolerance"]["forward_rel_l2"]
    null = torch.full_like(v["y"], spec["bfm"]["null_class_id"])
    with torch.no_grad():
        for k in range(net.config.segments):
            x, t = v["segment_x"][k], v["segment_t"][k]
            assert torch.equal(segment_of(t, net.config.segments), torch.full_like(v["y"], k))
            velocity, features, projected = net(x, t, v["y"], segment=k, return_features=True, return_projection=True)
            _check(velocity, v["segment_velocity"][k], tol, f"segment_velocity[{k}]")
            _check(features, v["trunk_features"][k], tol, f"trunk_features[{k}]")
            _check(projected, v["projector_out"][k], tol, f"projector_out[{k}]")
            _check(net(x, t, null, segment=k), v["segment_velocity_null"][k], tol, f"segment_velocity_null[{k}]")
            # routing by t alone picks the same segment
            _check(net(x, t, v["y"]), v["segment_velocity"][k], tol, f"segment_velocity[{k}] (segment from t)")


def test_feature_residual_approximation(case):
    _, spec, v, pipeline = case
    net, tol = pipeline.generator.eval(), spec["tolerance"]["forward_rel_l2"]
    edges = segment_edges(net.config.segments)
    with torch.no_grad():
        for k in range(net.config.segments):
            x, t = v["segment_x"][k], v["segment_t"][k]
            t_start = v["frn_t_start"][k]
            coeff = fra_coefficient(t, t_start, edges[k + 1].expand_as(t))
            _check(coeff, v["frn_coeff"][k].flatten(), tol, f"frn_coeff[{k}]")
            y_eff = v["frn_y_effective"][k]
            start = net.trunk(v["frn_x_start"][k], t_start, y_eff)
            approx = net(x, t, y_eff, segment=k, start_features=start, coeff=coeff, features_only=True)
            _check(approx, v["frn_approx"][k], tol, f"frn_approx[{k}]")
            _check(net.trunk(x, t, y_eff), v["frn_target"][k], tol, f"frn_target[{k}]")
            start = net.trunk(v["frn_x_start"][k], t_start, v["y"])
            velocity = net(x, t, v["y"], segment=k, start_features=start, coeff=v["frn_coeff"][k].flatten())
            _check(velocity, v["frn_velocity"][k], tol, f"frn_velocity[{k}]")


@pytest.mark.parametrize("name, settings", [
    ("sample_ode", dict(solver="euler", fra=False)),
    ("sample_ode_nocfg", dict(solver="euler", fra=False, cfg_scale=1.0)),
    ("sample_ode_frn", dict(solver="euler", fra=True)),
    ("sample_ode_frn_nocfg", dict(solver="euler", fra=True, cfg_scale=1.0)),
    ("sample_sde", dict(solver="euler_maruyama", fra=False)),
])
def test_samplers(case, name, settings):
    _, spec, v, pipeline = case
    sampler_spec = spec["sampler"]
    segments = pipeline.generator.config.segments
    official = dict(num_steps=sampler_spec["num_steps_per_segment"] * segments, cfg_scale=sampler_spec["cfg_scale"],
                    cfg_interval=(sampler_spec["guidance_low"], sampler_spec["guidance_high"]))
    sampler = dataclasses.replace(pipeline.sampler_config, **{**official, **settings})
    noise = v["sample_noise"]
    step_noise = v["sde_step_noise"] if sampler.solver == "euler_maruyama" else None
    out = pipeline.objective.sample(pipeline.generator.eval(), v["y"], tuple(noise.shape[1:]), sampler, noise=noise,
                                    step_noise=step_noise)
    _check(out, v[name], spec["tolerance"]["sample_rel_l2"], name)
