import math

import numpy as np
import pytest
import torch
from torch import nn

from effigen.objectives.ddpm import DDPMConfig, DDPMSamplerConfig, GaussianDiffusion, normal_kl
from effigen.rng import BatchRandom
from effigen.samplers.diffusion import DiffusionSchedule, beta_schedule, space_timesteps


def test_linear_and_cosine_schedules():
    betas = beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    cosine = DiffusionSchedule.create("cosine", 1000)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for k in (0, 100, 500, 900):  # alpha_bar_k = f((k + 1) / T) / f(0) (iDDPM eq. 17)
        assert cosine.alphas_cumprod[k] == pytest.approx(f((k + 1) / 1000) / f(0), rel=1e-6)


def test_respacing_keeps_alpha_bar_at_kept_steps():
    kept = space_timesteps(1000, 25)
    assert kept[:4] == [0, 42, 83, 125] and kept[-1] == 999 and len(kept) == 25
    full = DiffusionSchedule.create("linear", 1000)
    respaced = DiffusionSchedule.create("linear", 1000, 25)
    assert np.allclose(respaced.alphas_cumprod, full.alphas_cumprod[kept])
    assert respaced.network_time(torch.tensor([1])).item() == pytest.approx(42 / 1000)
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


class SinglePointOracle(nn.Module):
    """The exact prediction for a data set of one point x0: eps = (x_k - sqrt(ab) x0) / sqrt(1 - ab), or the
    velocity sqrt(ab) eps - sqrt(1 - ab) x0, or x0 itself."""

    def __init__(self, x0, schedule, learn_sigma=False, prediction="noise"):
        super().__init__()
        self.x0, self.schedule, self.learn_sigma, self.prediction = x0, schedule, learn_sigma, prediction

    def forward(self, x, t, labels):
        k = (t * self.schedule.num_original).round().long()
        ab = torch.from_numpy(self.schedule.alphas_cumprod).float()[k].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        if self.prediction == "velocity":
            eps = ab.sqrt() * eps - (1 - ab).sqrt() * self.x0
        elif self.prediction == "data":
            eps = self.x0.expand_as(x)
        if self.learn_sigma:  # v = -1 selects the posterior variance: the KL term is then exactly 0
            return torch.cat([eps, -torch.ones_like(eps)], dim=1)
        return eps


@pytest.mark.parametrize("prediction", ["noise", "velocity", "data"])
@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_oracle_sampling_reaches_the_data(solver, prediction):
    x0 = torch.rand(1, 3, 4, 4) * 2 - 1
    objective = GaussianDiffusion(DDPMConfig(learn_sigma=False, prediction=prediction), num_classes=2)
    oracle = SinglePointOracle(x0, objective.schedule, prediction=prediction)
    sample = objective.sample(oracle, torch.zeros(2, dtype=torch.long), (3, 4, 4),
                              DDPMSamplerConfig(solver=solver, num_steps=10), torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample, x0.expand(2, -1, -1, -1), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("prediction", ["noise", "velocity", "data"])
def test_oracle_loss_is_zero_and_vb_term_vanishes_with_the_posterior_variance(prediction):
    x0 = torch.rand(1, 3, 4, 4) * 2 - 1
    objective = GaussianDiffusion(DDPMConfig(learn_sigma=True, prediction=prediction), num_classes=2)
    oracle = SinglePointOracle(x0, objective.schedule, learn_sigma=True, prediction=prediction)
    batch = {"images": x0.repeat(16, 1, 1, 1), "labels": torch.zeros(16, dtype=torch.long)}
    random = BatchRandom.local(5, 16)
    out = objective.loss(oracle, batch, random)
    assert out["mse"].item() < 1e-6
    # the posterior variance with the exact mean: the KL part of the bound is 0 (k = 0 keeps the decoder NLL)
    assert out["vb"].item() < 0.05
    index = BatchRandom.local(5, 16).randint(1000)
    vb = objective.variational_bound(batch["images"], None or _noisy(objective, x0, index), index,
                                     torch.zeros(16, 3, 4, 4), -torch.ones(16, 3, 4, 4))
    assert torch.isfinite(vb).all()


def _noisy(objective, x0, index):
    ab = torch.from_numpy(objective.schedule.alphas_cumprod).float()[index].view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(len(index), *x0.shape[1:])


@pytest.mark.parametrize("prediction", ["velocity", "data"])
def test_predictions_convert_to_noise_and_their_loss_weights_the_x0_error_by_snr(prediction):
    objective = GaussianDiffusion(DDPMConfig(learn_sigma=False, prediction=prediction), num_classes=2)
    x0, noise = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    alpha_bar = torch.tensor([0.9999, 0.9, 0.5, 0.1, 1e-3, 4e-5], dtype=torch.float64).view(-1, 1, 1, 1)
    x0, noise = x0.double(), noise.double()
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    target = objective.target(x0, noise, alpha_bar)
    torch.testing.assert_close(objective.to_noise(target, x_t, alpha_bar), noise)
    # an x0 error d, seen through each parameterisation: |eps error|^2 = SNR |d|^2, |v error|^2 = (SNR + 1) |d|^2
    d = 0.01 * torch.randn_like(x0)
    snr = alpha_bar / (1 - alpha_bar)
    eps_of = lambda x0_hat: (x_t - alpha_bar.sqrt() * x0_hat) / (1 - alpha_bar).sqrt()  # noqa: E731
    wrong = objective.target(x0 + d, eps_of(x0 + d), alpha_bar)
    error = ((wrong - target) ** 2).flatten(1).sum(1) / (d**2).flatten(1).sum(1)
    expected = (snr + 1).flatten() if prediction == "velocity" else torch.ones(6, dtype=torch.float64)
    torch.testing.assert_close(error, expected)


def test_normal_kl_identities():
    mean, logvar = torch.randn(10), torch.randn(10)
    assert torch.allclose(normal_kl(mean, logvar, mean, logvar), torch.zeros(10), atol=1e-7)
    # KL(N(0,1) || N(1,1)) = 1/2
    assert normal_kl(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.zeros(1)).item() == pytest.approx(0.5)


def test_learned_sigma_needs_doubled_channels():
    objective = GaussianDiffusion(DDPMConfig(learn_sigma=True), num_classes=2)
    oracle = SinglePointOracle(torch.zeros(1, 3, 4, 4), objective.schedule, learn_sigma=False)
    with pytest.raises(ValueError, match="learn_sigma"):
        objective.loss(oracle, {"images": torch.zeros(2, 3, 4, 4), "labels": torch.zeros(2, dtype=torch.long)},
                       BatchRandom.local(0, 2))


def test_dit_ddpm_trains_from_the_cli_config(tmp_path):
    from effigen.training.run import build_and_train
    from effigen.training.experiment import build_experiment_dict
    from effigen.pipeline import Pipeline

    config = build_experiment_dict("smoke", overrides=[f"--trainer.output_dir={tmp_path}", "--method=dit-ddpm",
                                                        "--sampler.solver=ddim", "--sampler.num_steps=4"])
    config["sampler"].pop("time_shift", None)
    summary = build_and_train(config, quiet=True)
    pipeline = Pipeline.from_pretrained(summary["pipeline"])
    assert pipeline.generator.config.learn_sigma and pipeline.method.name == "dit-ddpm"
    images = pipeline([0, 1], seed=0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
