"""Parity with facebookresearch/DiT: forward, the official guided forward (first-3-channels CFG), and the
DDIM (eta = 0) sample over the respaced linear schedule, from a checkpoint in the official format,
converted with `effigen convert dit-official`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from effigen.convert.dit_official import convert_dit_official
from effigen.objectives.ddpm import DDPMSamplerConfig
from effigen.pipeline import Pipeline
from effigen.samplers import guided_prediction

from .common import discover, folder, manifest, relative_error, vectors_path

pytestmark = pytest.mark.parity


@pytest.fixture(params=discover("dit-official"))
def case(request, tmp_path):
    path = folder(request.param)
    spec = manifest(path)
    out = convert_dit_official(path / spec["checkpoint"], tmp_path / "converted", num_heads=spec["dit"]["num_heads"])
    return spec, load_file(str(vectors_path(path, spec))), Pipeline.from_pretrained(out)


def test_convert_command(case, tmp_path, capsys):
    from effigen.cli.main import main

    spec, vectors, pipeline = case
    source = pipeline.info["checkpoint"]
    assert main(["convert", "dit-official", "--ckpt", source, "--out", str(tmp_path / "cli"),
                 "--num-heads", str(spec["dit"]["num_heads"])]) == 0
    converted = Pipeline.from_pretrained(tmp_path / "cli")
    assert converted.sampler_config.cfg_channels == 3 and converted.method.name == "dit-ddpm"
    for key, value in converted.generator.state_dict().items():
        assert torch.equal(value, pipeline.generator.state_dict()[key])
    dit = spec["dit"]
    if dit["in_channels"] != 3:
        with pytest.raises(ValueError, match="latent"):
            converted([0])  # latents and no decoder: a clear error, not garbage images
    shape = (1, dit["in_channels"], dit["input_size"], dit["input_size"])
    assert converted([0], output_type="latent", num_steps=2).shape == shape


def test_config_is_read_off_the_checkpoint(case):
    spec, _, pipeline = case
    config = pipeline.generator.config
    for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes", "learn_sigma"):
        assert getattr(config, key) == spec["dit"][key], key


def test_forward(case):
    spec, vectors, pipeline = case
    T = pipeline.objective_config.num_timesteps
    with torch.no_grad():
        out = pipeline.generator(vectors["x"], vectors["t"].float() / T, vectors["y"])
    assert relative_error(out, vectors["forward_out"]) < spec["tolerance"]["forward_rel_l2"]


def test_guided_forward_first_three_channels(case):
    spec, vectors, pipeline = case
    T = pipeline.objective_config.num_timesteps
    x, t, y = vectors["cfg_input_x"], vectors["cfg_input_t"].float() / T, vectors["cfg_input_y"]
    half = x.shape[0] // 2
    with torch.no_grad():
        guided = guided_prediction(pipeline.generator, x[:half], t[:half], y[:half], pipeline.num_classes,
                                   spec["cfg_scale"], channels=3)
    expected = vectors["forward_with_cfg_out"][:half]
    assert relative_error(guided, expected) < spec["tolerance"]["forward_rel_l2"]
    # the official function returns the guided channels twice; the other channels of its second half
    # are the unconditional output
    second = vectors["forward_with_cfg_out"][half:]
    assert torch.allclose(second[:, :3], expected[:, :3])
    with torch.no_grad():
        uncond = pipeline.generator(x[half:], t[half:], y[half:])
    assert relative_error(uncond[:, 3:], second[:, 3:]) < spec["tolerance"]["forward_rel_l2"]


def test_ddim_sample(case):
    spec, vectors, pipeline = case
    steps = int(spec["diffusion"]["respacing"])
    sampler = DDPMSamplerConfig(solver="ddim", num_steps=steps, eta=0.0, cfg_scale=spec["cfg_scale"], cfg_channels=3)
    sample = pipeline.objective.sample(pipeline.generator, vectors["y"], tuple(vectors["ddim_noise"].shape[1:]), sampler,
                                       noise=vectors["ddim_noise"])
    assert relative_error(sample, vectors["ddim_sample"]) < spec["tolerance"]["sample_rel_l2"]
