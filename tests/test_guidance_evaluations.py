"""Guidance runs the unconditional pass only where it applies, and the evaluation count that the report and bench print
is the number of network evaluations the samplers really make."""

from __future__ import annotations

import pytest
import torch

from effigen.models.dit import DIT_PRESETS, DiT, DiTConfig
from effigen.objectives.ddpm import DDPMConfig, DDPMSamplerConfig, GaussianDiffusion
from effigen.objectives.flow_matching import FlowSamplerConfig, RectifiedFlow, RectifiedFlowConfig
from effigen.samplers import guided_prediction


class Counting(torch.nn.Module):
    """Counts network evaluations per sample (a doubled guided batch counts twice)."""

    def __init__(self, network, batch):
        super().__init__()
        self.network, self.batch, self.evaluations = network, batch, 0

    def forward(self, x, t, labels, **kwargs):
        self.evaluations += x.shape[0] / self.batch
        return self.network(x, t, labels, **kwargs)


def _network(learn_sigma=False):
    torch.manual_seed(0)
    return DiT(DiTConfig(**{**DIT_PRESETS["DiT-Test"], "depth": 1, "hidden_size": 32, "input_size": 8,
                            "num_classes": 10, "learn_sigma": learn_sigma})).eval()


@pytest.mark.parametrize("settings", [
    dict(solver="euler", num_steps=6), dict(solver="euler", num_steps=6, cfg_interval=(0.0, 0.7)),
    dict(solver="heun", num_steps=5, cfg_interval=(0.0, 0.7)),
    dict(solver="heun", num_steps=8, cfg_interval=(0.0, 0.7), cfg_interval_at="step_start"),
    dict(solver="euler_maruyama", num_steps=7, cfg_interval=(0.3, 0.6), last_step=0.04),
    dict(solver="euler", num_steps=4, cfg_scale=1.0), dict(solver="heun", num_steps=4, cfg_interval=(0.9, 1.0)),
])
def test_flow_evaluation_count_is_what_the_sampler_does(settings):
    objective = RectifiedFlow(RectifiedFlowConfig(), num_classes=10)
    sampler = FlowSamplerConfig(**{"cfg_scale": 2.0, **settings})
    model = Counting(_network(), batch=3)
    objective.sample(model, torch.tensor([1, 2, 3]), (3, 8, 8), sampler, torch.Generator().manual_seed(0))
    assert model.evaluations == objective.evaluations_per_sample(sampler)
    if sampler.cfg_interval is not None and sampler.cfg_scale != 1.0:  # fewer than twice every step
        assert objective.evaluations_per_sample(sampler) < 2 * objective.evaluations_per_sample(
            FlowSamplerConfig(**{**settings, "cfg_scale": 1.0}))


@pytest.mark.parametrize("interval", [None, (0.0, 0.5)])
def test_ddpm_evaluation_count_is_what_the_sampler_does(interval):
    objective = GaussianDiffusion(DDPMConfig(learn_sigma=True), num_classes=10)
    sampler = DDPMSamplerConfig(solver="ddim", num_steps=6, cfg_scale=2.0, cfg_interval=interval)
    model = Counting(_network(learn_sigma=True), batch=2)
    objective.sample(model, torch.tensor([1, 2]), (3, 8, 8), sampler, torch.Generator().manual_seed(0))
    assert model.evaluations == objective.evaluations_per_sample(sampler) == (12 if interval is None else 9)


def test_outside_the_interval_the_output_is_the_conditional_one():
    network = _network()
    x, labels = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    t = torch.full((2,), 0.9)
    out = guided_prediction(network, x, t, labels, 10, 3.0, interval=(0.0, 0.7))
    assert torch.equal(out, network(x, t, labels))
    inside = guided_prediction(network, x, torch.full((2,), 0.5), labels, 10, 3.0, interval=(0.0, 0.7))
    cond, uncond = network(x, torch.full((2,), 0.5), labels), network(x, torch.full((2,), 0.5), torch.full_like(labels, 10))
    torch.testing.assert_close(inside, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-6)
