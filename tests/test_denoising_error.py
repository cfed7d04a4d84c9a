"""benchmarks/denoising_error.py: with exact single-point models, every parameterisation's x_0 estimate at a given SNR
is the data point, and DDPM and flow models see the same noisy image up to their path's scale."""

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from effigen.objectives.ddpm import DDPMConfig, GaussianDiffusion
from effigen.objectives.flow_matching import RectifiedFlow, RectifiedFlowConfig

_spec = importlib.util.spec_from_file_location(
    "denoising_error", Path(__file__).resolve().parents[1] / "benchmarks" / "denoising_error.py")
denoising_error = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(denoising_error)


class DDPMPointOracle(nn.Module):
    def __init__(self, x0, objective):
        super().__init__()
        self.x0, self.objective = x0, objective

    def forward(self, x, t, labels):
        schedule = self.objective.schedule
        k = (t * schedule.num_original).round().long()
        ab = torch.from_numpy(schedule.alphas_cumprod).float()[k].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        return self.objective.target(self.x0.expand_as(x), eps, ab)


class FlowPointOracle(nn.Module):
    def __init__(self, x0, objective):
        super().__init__()
        self.x0, self.objective = x0, objective

    def forward(self, x, t, labels):
        self.seen_t = t
        alpha, sigma, _, _ = self.objective.path.coefficients(t, x.dim())
        eps = (x - alpha * self.x0) / sigma
        return self.objective.target(self.x0.expand_as(x), eps, t) if self.objective.config.prediction != "data" \
            else self.x0.expand_as(x)


@pytest.mark.parametrize("model", ["ddpm-noise", "ddpm-velocity", "ddpm-data", "flow-linear-velocity",
                                   "flow-gvp-velocity", "flow-linear-noise", "flow-linear-data"])
def test_exact_models_recover_the_data_at_every_snr(model):
    x0 = torch.rand(1, 3, 4, 4) * 2 - 1
    if model.startswith("ddpm"):
        objective = GaussianDiffusion(DDPMConfig(learn_sigma=False, prediction=model.split("-")[1]), 2)
        oracle = DDPMPointOracle(x0, objective)
    else:
        _, path, prediction = model.split("-")
        objective = RectifiedFlow(RectifiedFlowConfig(path=path, prediction=prediction), 2)
        oracle = FlowPointOracle(x0, objective)
    pipeline = SimpleNamespace(objective=objective, generator=oracle)
    batch = x0.expand(3, -1, -1, -1)
    noise, labels = torch.randn(3, 3, 4, 4), torch.zeros(3, dtype=torch.long)
    for log_snr in (-6.0, -2.0, 0.0, 4.0):
        estimate, used = denoising_error.x0_estimate(pipeline, batch, noise, labels, math.exp(log_snr))
        torch.testing.assert_close(estimate, batch, atol=2e-3, rtol=1e-3)
        # DDPM rounds to its nearest step; flow paths hit the SNR exactly
        assert abs(math.log(used) - log_snr) < (0.05 if model.startswith("ddpm") else 1e-6)
        if model.startswith("flow"):  # the model was asked at the t of its path that has this SNR
            alpha, sigma, _, _ = objective.path.coefficients(oracle.seen_t, 1)
            assert torch.allclose(torch.log(alpha**2 / sigma**2), torch.full_like(alpha, log_snr), atol=1e-4)
