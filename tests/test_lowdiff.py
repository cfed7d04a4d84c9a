"""LowDiff cascade (objectives/lowdiff.py, models/lowdiff.py): resolution schedule, conditioning in both modes,
per-stage step budgets, noise augmentation, and clear errors."""

from __future__ import annotations

import pytest
import torch

from effigen.models.dit import DiT, DiTConfig
from effigen.models.lowdiff import LowDiffConfig, LowDiffNet
from effigen.objectives.lowdiff import (LowDiffCascade, LowDiffObjectiveConfig, LowDiffSamplerConfig, downsample,
                                        upsample)
from effigen.rng import BatchRandom

TINY = dict(depth=1, hidden_size=32, num_heads=2, patch_size=2, rope=True, any_resolution=True)


def make(mode="concat", resolutions=(4, 8, 16), **objective):
    torch.manual_seed(0)
    net = LowDiffNet(LowDiffConfig(input_size=resolutions[-1], in_channels=1, num_classes=3, resolutions=resolutions,
                                   mode=mode, backbone_config=TINY))
    return net, LowDiffCascade(LowDiffObjectiveConfig(**objective), num_classes=3)


class Recorder(torch.nn.Module):
    """Wraps the network and records each call's stage, input and condition."""

    def __init__(self, net):
        super().__init__()
        self.net, self.config, self.calls = net, net.config, []

    def forward(self, x, t, labels, stage, cond=None, aug_level=None):
        self.calls.append(dict(stage=stage, x=x.clone(), t=t.clone(), cond=None if cond is None else cond.clone(),
                               aug_level=aug_level))
        return self.net(x, t, labels, stage=stage, cond=cond, aug_level=aug_level)


def test_schedule_errors_name_the_problem():
    with pytest.raises(ValueError, match="ends at 16, but the data"):
        LowDiffConfig(input_size=32, resolutions=(8, 16))
    with pytest.raises(ValueError, match="increase strictly"):
        LowDiffConfig(input_size=32, resolutions=(16, 8, 32))
    with pytest.raises(ValueError, match="cannot be reached from 32"):
        LowDiffConfig(input_size=32, resolutions=(12, 32))
    with pytest.raises(ValueError, match="patch_size 4"):
        LowDiffNet(LowDiffConfig(input_size=32, resolutions=(2, 32), backbone_config={**TINY, "patch_size": 4}))


def test_loss_runs_every_stage_at_its_resolution_with_the_right_condition():
    net, objective = make("concat", cond_aug_max=0.5, time_sampling="uniform")
    rec = Recorder(net)
    x0 = torch.rand(3, 1, 16, 16) * 2 - 1
    out = objective.loss(rec, {"images": x0, "labels": torch.tensor([0, 1, 2])}, BatchRandom.local(0, 3))
    assert [c["stage"] for c in rec.calls] == [0, 1, 2]
    assert [c["x"].shape[-1] for c in rec.calls] == [4, 8, 16]
    assert rec.calls[0]["cond"] is None  # stage 0: no condition
    for k in (1, 2):
        cond, s = rec.calls[k]["cond"], rec.calls[k]["aug_level"]
        assert cond.shape == rec.calls[k]["x"].shape
        assert bool((s >= 0).all() and (s < 0.5).all())  # s ~ U(0, cond_aug_max)
        # the condition is the noised upsample of the previous resolution: (1 - s) up + s eps
        up = upsample(downsample(x0, net.config.resolutions[k - 1]), net.config.resolutions[k])
        eps = (cond - (1 - s).view(-1, 1, 1, 1) * up) / s.view(-1, 1, 1, 1)
        assert eps.std() > 0.5  # a real noise draw, not the image
    assert set(out) >= {"loss", "mse_4px", "mse_8px", "mse_16px"}
    manual = (out["mse_4px"] + out["mse_8px"] + out["mse_16px"]) / 3
    torch.testing.assert_close(out["loss"].detach(), manual)
    out["loss"].backward()
    assert net.stage_embed.grad is not None


def test_no_noise_augmentation_gives_the_exact_upsample():
    net, objective = make("concat", cond_aug_max=0.0)
    rec = Recorder(net)
    x0 = torch.rand(2, 1, 16, 16)
    objective.loss(rec, {"images": x0, "labels": torch.tensor([0, 1])}, BatchRandom.local(1, 2))
    torch.testing.assert_close(rec.calls[2]["cond"], upsample(downsample(x0, 8), 16))


def test_init_mode_has_no_condition_input_and_trains_late_stages_below_the_start_time():
    net, objective = make("init", train_start_time=0.4, time_sampling="uniform")
    assert net.config.backbone_in_channels == 1 + 1
    rec = Recorder(net)
    objective.loss(rec, {"images": torch.rand(8, 1, 16, 16), "labels": torch.zeros(8, dtype=torch.long)},
                   BatchRandom.local(2, 8))
    assert all(c["cond"] is None for c in rec.calls)
    assert bool((rec.calls[1]["t"] <= 0.4).all() and (rec.calls[2]["t"] <= 0.4).all())
    with pytest.raises(ValueError, match="takes no condition"):
        net(torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), stage=1, cond=torch.zeros(1, 1, 8, 8))


def test_wrong_stage_shape_is_a_clear_error():
    net, _ = make("concat")
    assert net.config.backbone_in_channels == 2 * 1 + 1 + 1
    with pytest.raises(ValueError, match="stage 1 takes"):
        net(torch.zeros(1, 1, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long), stage=1)


@pytest.mark.parametrize("mode", ["concat", "init"])
def test_sampler_spends_each_stage_budget_at_its_resolution(mode):
    net, objective = make(mode)
    rec = Recorder(net)
    sampler = LowDiffSamplerConfig(solver="euler", stage_steps=(3, 2, 1), cond_aug=0.2, start_time=0.5)
    out = objective.sample(rec, torch.tensor([0, 2]), (1, 16, 16), sampler, torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 16, 16)
    assert [c["stage"] for c in rec.calls] == [0, 0, 0, 1, 1, 2]
    assert [c["x"].shape[-1] for c in rec.calls] == [4, 4, 4, 8, 8, 16]
    assert objective.evaluations_per_stage(net, sampler) == [3, 2, 1]
    assert objective.evaluations_per_sample(sampler, net) == 6
    if mode == "concat":
        assert rec.calls[3]["cond"].shape == (2, 1, 8, 8)
        assert float(rec.calls[3]["aug_level"][0]) == pytest.approx(0.2)
        assert rec.calls[3]["t"][0] == 1.0  # every stage integrates from noise
    else:
        assert rec.calls[3]["cond"] is None
        assert float(rec.calls[3]["t"][0]) == pytest.approx(0.5)  # the chain starts at t*
        assert float(rec.calls[0]["t"][0]) == 1.0


def test_guidance_doubles_the_condition_with_the_batch():
    net, objective = make("concat")
    sampler = LowDiffSamplerConfig(solver="heun", stage_steps=(1, 1, 2), cfg_scale=2.0)
    out = objective.sample(net, torch.tensor([1]), (1, 16, 16), sampler, torch.Generator().manual_seed(0))
    assert out.shape == (1, 1, 16, 16) and torch.isfinite(out).all()
    assert objective.evaluations_per_stage(net, sampler) == [2, 2, 6]


def test_step_budget_validation():
    net, objective = make()
    with pytest.raises(ValueError, match="positive integers"):
        LowDiffSamplerConfig(stage_steps=(3, 0, 1))
    with pytest.raises(ValueError, match="2 entries but the cascade has 3 stages"):
        objective.sample(net, torch.tensor([0]), (1, 16, 16), LowDiffSamplerConfig(stage_steps=(3, 2)))
    assert LowDiffSamplerConfig(num_steps=7).steps_for(3) == (7, 7, 7)
    with pytest.raises(ValueError, match="cannot produce"):
        objective.sample(net, torch.tensor([0]), (1, 32, 32), LowDiffSamplerConfig(stage_steps=(1, 1, 1)))
    with pytest.raises(ValueError, match="'euler' or 'heun'"):
        init_net, init_obj = make("init")
        init_obj.sample(init_net, torch.tensor([0]), (1, 16, 16),
                        LowDiffSamplerConfig(solver="euler_maruyama", stage_steps=(1, 1, 1)))


def test_any_resolution_dit_matches_the_fixed_grid_at_its_size_and_runs_elsewhere():
    torch.manual_seed(0)
    net = DiT(DiTConfig(input_size=16, in_channels=1, num_classes=3, **TINY))
    for block in net.blocks:  # non-zero adaLN so the blocks do something
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.1)
    t, y = torch.rand(2), torch.tensor([0, 1])
    assert net(torch.randn(2, 1, 8, 8), t, y).shape == (2, 1, 8, 8)
    # at 8 px the RoPE positions are those of the top-left 4x4 tokens of the 16 px grid: a token's rotation
    # depends on its (row, column) only
    rope8, rope16 = net._rope_for(torch.zeros(1, 1, 8, 8)), net._rope_for(torch.zeros(1, 1, 16, 16))
    torch.testing.assert_close(rope8.freqs_cos.view(4, 4, -1), rope16.freqs_cos.view(8, 8, -1)[:4, :4])
    with pytest.raises(ValueError, match="rope=True"):
        DiTConfig(any_resolution=True)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        net(torch.randn(1, 1, 7, 7), t[:1], y[:1])


def test_latent_grid_cascade():
    """KL-VAE latents (4 channels, 8x8 cells) as the experiment builds them: resolutions count latent cells."""
    torch.manual_seed(0)
    net = LowDiffNet(LowDiffConfig(input_size=8, in_channels=4, num_classes=3, resolutions=(2, 4, 8),
                                   backbone_config={**TINY, "patch_size": 1}))
    objective = LowDiffCascade(LowDiffObjectiveConfig(), num_classes=3)
    out = objective.loss(net, {"images": torch.randn(2, 4, 8, 8), "labels": torch.tensor([0, 1])}, BatchRandom.local(0, 2))
    assert set(out) >= {"mse_2px", "mse_4px", "mse_8px"} and torch.isfinite(out["loss"])
    sample = objective.sample(net, torch.tensor([2]), (4, 8, 8), LowDiffSamplerConfig(solver="euler", stage_steps=(2, 1, 1)))
    assert sample.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("mode", ["concat", "init"])
def test_dico_backbone_runs_the_cascade(mode):
    torch.manual_seed(0)
    net = LowDiffNet(LowDiffConfig(input_size=16, in_channels=1, num_classes=3, resolutions=(4, 8, 16), mode=mode,
                                   backbone="DiCo", backbone_config=dict(hidden_size=8, depth=[1, 1, 1, 1, 1])))
    objective = LowDiffCascade(LowDiffObjectiveConfig(), num_classes=3)
    batch = {"images": torch.rand(4, 1, 16, 16) * 2 - 1, "labels": torch.tensor([0, 1, 2, 0])}
    loss = objective.loss(net, batch, BatchRandom.local(0, 4))["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert net.backbone.final_layer.out_proj.weight.grad.abs().sum() > 0  # zero-init output layer: its grad flows
    rec = Recorder(net)
    out = objective.sample(rec, torch.tensor([0, 2]), (1, 16, 16), LowDiffSamplerConfig(solver="euler",
                           stage_steps=(2, 1, 1)), torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    assert [c["x"].shape[-1] for c in rec.calls] == [4, 4, 8, 16]
    with pytest.raises(ValueError, match="multiples of 4"):
        LowDiffNet(LowDiffConfig(input_size=16, in_channels=1, resolutions=(2, 16), backbone="DiCo",
                                 backbone_config=dict(hidden_size=8, depth=[1] * 5)))(
            torch.zeros(1, 1, 2, 2), torch.zeros(1), torch.zeros(1, dtype=torch.long), stage=0)
