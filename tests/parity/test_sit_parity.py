"""`effigen convert sit-official` checked on REPA's parity vectors.

No SiT folder exists among the parity vectors, but REPA's `models/sit.py` is SiT's `models.py` network (same blocks,
keys and forward) plus projectors and without the learned-sigma half, and REPA's SDE sampler is SiT's `sample.py SDE`
recipe (Euler-Maruyama, sigma diffusion with norm 1, a Mean last step of 0.04) written in the other time direction.
So each repa-official folder also gives a SiT checkpoint in SiT's own layout: its EMA weights without the projectors,
with a learned-sigma half added to the output layer, saved as SiT's `train.py` does (`{'model', 'ema', 'opt',
'args'}`, `args` an argparse.Namespace) and as the released bare state dict. Run in SiT's conventions (t_SiT = 1 - t,
velocity x_data - noise), the converted network must give REPA's recorded forward outputs. No official SiT sample
is recorded: the converted folder's SDE is checked against SiT's SDE written out in SiT's own time direction from
its formulas (a transcription, not official outputs), from the same noise, at the manifest's sampler tolerance."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from effigen.convert.repa_official import official_sampler as repa_sampler
from effigen.convert.sit_official import convert_sit_official, load_official_checkpoint, official_sampler
from effigen.models.dit import DiT
from effigen.pipeline import Pipeline

from .common import (assert_max_abs, discover, folder, manifest, max_abs_error, repa_heads_argument, replay_noise,
                     vectors_path)

pytestmark = pytest.mark.parity


def sit_state(repa_state: dict[str, torch.Tensor], spec) -> dict[str, torch.Tensor]:
    """REPA's SiT weights in SiT's layout: no projectors, a learned-sigma half in the output layer (rows ordered
    (patch row, patch column, channel) over 2C channels; SiT's forward keeps the first C)."""
    state = {k: v.clone() for k, v in repa_state.items() if not k.startswith("projectors.")}
    C, p = spec["sit"]["in_channels"], spec["sit"]["patch_size"]
    generator = torch.Generator().manual_seed(0)
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        value = state[key].view(p * p, C, -1)
        sigma = torch.randn(value.shape, generator=generator)
        state[key] = torch.cat([value, sigma], dim=1).reshape(p * p * 2 * C, *state[key].shape[1:])
    return state


@pytest.fixture(params=discover("repa-official"))
def case(request, tmp_path):
    path = folder(request.param)
    spec = manifest(path)
    repa_state, _, _, _ = load_official_checkpoint(path / spec["checkpoint"])
    state = sit_state(repa_state, spec)
    args = argparse.Namespace(model="custom", image_size=spec["sit"]["input_size"] * 8, num_classes=spec["sit"]["num_classes"],
                              path_type="Linear", prediction="velocity", loss_weight=None, global_batch_size=256)
    perturbed = {k: v + 0.1 for k, v in state.items()}  # 'model' differs from 'ema'; 'ema' must be taken
    checkpoint = tmp_path / "0400000.pt"
    torch.save({"model": perturbed, "ema": state, "opt": {}, "args": args}, checkpoint)
    out = convert_sit_official(checkpoint, tmp_path / "converted", repa_heads_argument(path, spec))
    return path, spec, load_file(str(vectors_path(path, spec))), Pipeline.from_pretrained(out), state, tmp_path


def test_config_and_translated_weights(case):
    _, spec, _, pipeline, state, _ = case
    config, sit = pipeline.generator.config, spec["sit"]
    assert (config.hidden_size, config.depth, config.num_heads, config.patch_size, config.in_channels) == (
        sit["hidden_size"], sit["depth"], sit["num_heads"], sit["patch_size"], sit["in_channels"])
    assert config.input_size == sit["input_size"] and config.num_classes == sit["num_classes"]
    assert not config.learn_sigma and (config.time_offset, config.time_scale) == (1.0, -1.0)
    C, p = sit["in_channels"], sit["patch_size"]
    kept = state["final_layer.linear.weight"].view(p * p, 2 * C, -1)[:, :C].reshape(p * p * C, -1)
    assert torch.equal(pipeline.generator.final_layer.linear.weight, -kept)  # velocity sign, sigma rows dropped
    assert pipeline.info["weights"] == "ema" and pipeline.info["official_args"]["path_type"] == "Linear"


def test_forward_velocity_in_sits_time(case):
    _, spec, v, pipeline, _, _ = case
    with torch.no_grad():  # SiT's v(x, t_SiT) = -effigen's v(x, 1 - t_SiT)
        out = -pipeline.generator(v["x"], 1 - v["t"], v["y"])
        null = -pipeline.generator(v["x"], 1 - v["t"], torch.full_like(v["y"], pipeline.num_classes))
    assert_max_abs(spec, "forward_out", out, v["forward_out"])
    assert_max_abs(spec, "forward_null_out", null, v["forward_null_out"])


def sit_network(pipeline):
    """SiT's own network, in its own time and sign (t_SiT: 0 = noise; velocity x_data - noise): the converted weights
    with the translation undone. `test_forward_velocity_in_sits_time` ties it to REPA's recorded forward."""
    network = DiT(replace(pipeline.generator.config, time_scale=1.0, time_offset=0.0))
    state = dict(pipeline.generator.state_dict())
    state["final_layer.linear.weight"] = -state["final_layer.linear.weight"]
    state["final_layer.linear.bias"] = -state["final_layer.linear.bias"]
    network.load_state_dict(state)
    return network.eval()


@torch.no_grad()
def sit_reference_sde(network, z, y, null, num_steps, draws, cfg_scale, norm=1.0, last_step_size=0.04):
    """SiT's `sample.py SDE` written out from its formulas (transport.py `sample_sde`, integrators.py `sde`, path.py
    ICPlan; Linear path, velocity model): Euler-Maruyama on t = linspace(0, 1 - last_step_size, num_steps) (t = 0 noise),
    drift v + w * score with score = (t v - x) / (1 - t) and w = norm * (1 - t) ("sigma" form), noise sqrt(2 w) dW,
    then the "Mean" last step x + drift * last_step_size; `forward_with_cfg` guides the first 3 channels. float64
    state, the network in float32; `draws[i]` is the noise of step i."""

    def drift(x, t):
        x32, t32 = x.float(), torch.full((x.shape[0],), float(t))
        out = network(torch.cat([x32, x32]), torch.cat([t32, t32]), torch.cat([y, torch.full_like(y, null)])).double()
        cond, uncond = out.chunk(2)
        v = torch.cat([uncond[:, :3] + cfg_scale * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)
        score = (t * v - x) / (1 - t)
        return v + norm * (1 - t) * score

    t = torch.linspace(0, 1 - last_step_size, num_steps, dtype=torch.float64)
    dt, x = t[1] - t[0], z.double()
    for i, ti in enumerate(t[:-1]):
        x = x + drift(x, ti) * dt + torch.sqrt(2 * norm * (1 - ti)) * torch.sqrt(dt) * draws[i].double()
    return (x + drift(x, t[-1]) * last_step_size).float()


def test_sit_sde_recipe(case, monkeypatch):
    """The folder's sampler (SiT's recipe in effigen's time: 250 steps, cfg 1.5 on 3 channels, no interval, diffusion
    norm 2, last step 0.04) against SiT's SDE written out in SiT's own time, from the same noise; and its grid,
    diffusion and last step are REPA's SDE's."""
    _, spec, v, pipeline, _, _ = case
    s = pipeline.sampler_config
    assert (s.solver, s.num_steps, s.cfg_scale, s.cfg_channels, s.cfg_interval) == ("euler_maruyama", 249, 1.5, 3, None)
    n = spec["sampler"]["sde_num_steps"]
    sit, repa = official_sampler(n), repa_sampler("sde", n)
    assert (sit.num_steps, sit.diffusion_norm, sit.last_step) == (repa.num_steps, repa.diffusion_norm, repa.last_step)
    draws, noise, y = v["sde_noise_draws"], v["sample_noise"], v["sample_y"]
    expected = sit_reference_sde(sit_network(pipeline), noise, y, pipeline.num_classes, n, draws, s.cfg_scale)
    generator, used = replay_noise(monkeypatch, draws)
    sample = pipeline.objective.sample(pipeline.generator, y, tuple(noise.shape[1:]), pipeline.sampler_settings(
        num_steps=sit.num_steps), generator, noise=noise)
    monkeypatch.undo()
    assert len(used) == draws.shape[0] * draws.shape[1]
    tol = spec["tolerance"]["max_abs"]["sde_cfg_sample"] / float(v["sde_cfg_sample"].abs().max()) * float(expected.abs().max())
    assert max_abs_error(sample, expected) <= tol  # the manifest's sampler rule: 1e-4 of the largest value


def test_released_state_dict_and_command(case, capsys):
    from effigen.cli.main import main

    path, spec, v, pipeline, state, tmp_path = case
    torch.save(state, tmp_path / "SiT-custom.pt")  # the released file: the state dict itself
    heads = repa_heads_argument(path, spec)
    flags = ["--num-heads", str(heads)] if heads else []
    assert main(["convert", "sit-official", "--ckpt", str(tmp_path / "SiT-custom.pt"), "--out", str(tmp_path / "cli"),
                 *flags]) == 0
    released = Pipeline.from_pretrained(tmp_path / "cli")
    assert released.info["weights"] == "state dict" and released.info["official_args"] is None
    for key, value in released.generator.state_dict().items():
        assert torch.equal(value, pipeline.generator.state_dict()[key])
    assert max_abs_error(released.generator(v["x"], 1 - v["t"], v["y"]).detach(), -v["forward_out"]) <= (
        spec["tolerance"]["max_abs"]["forward_out"])
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "sit-official", "--ckpt", str(tmp_path / "SiT-custom.pt"), "--out", str(tmp_path / "x"),
              "--keep-projectors"])
    assert exit_.value.code == 2
    assert "only repa-official takes --keep-projectors" in capsys.readouterr().err
