import pytest
import torch
from torch import nn

from effigen.objectives.flow_matching import FlowSamplerConfig, RectifiedFlow, RectifiedFlowConfig
from effigen.rng import BatchRandom


class Oracle(nn.Module):
    """The exact velocity field for a single data point x0: v(x_t, t) = (x_t - x0) / t."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels):
        return (x - self.x0) / t.view(-1, 1, 1, 1)


def test_oracle_velocity_has_zero_loss_and_euler_reaches_the_data_exactly():
    x0 = torch.randn(1, 3, 4, 4)
    objective = RectifiedFlow(RectifiedFlowConfig(time_sampling="uniform"), num_classes=2)
    batch = {"images": x0.repeat(6, 1, 1, 1), "labels": torch.zeros(6, dtype=torch.long)}
    out = objective.loss(Oracle(x0), batch, BatchRandom.local(0, 6))
    assert out["loss"].item() < 1e-10
    # straight paths: one Euler step from pure noise lands on x0
    sample = objective.sample(Oracle(x0), torch.zeros(2, dtype=torch.long), (3, 4, 4),
                              FlowSamplerConfig(solver="euler", num_steps=1), torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample, x0.repeat(2, 1, 1, 1))


def test_interpolant_and_target():
    """x_t = (1 - t) x0 + t eps and v = eps - x0: a model returning its input's deviation checks both."""
    seen = {}

    class Spy(nn.Module):
        def forward(self, x, t, labels):
            seen.update(x=x, t=t, labels=labels)
            return torch.zeros_like(x)

    x0 = torch.randn(4, 3, 2, 2)
    random = BatchRandom.local(3, 4)
    objective = RectifiedFlow(RectifiedFlowConfig(time_sampling="uniform", label_dropout=0.5), num_classes=5)
    out = objective.loss(Spy(), {"images": x0, "labels": torch.tensor([0, 1, 2, 3])}, random)
    replay = BatchRandom.local(3, 4)
    noise, t, drop = replay.randn(3, 2, 2), replay.rand(), replay.rand() < 0.5
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x"], (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(out["loss"], ((noise - x0) ** 2).mean())
    assert torch.equal(seen["labels"] == 5, drop)


def test_logit_normal_times_are_in_the_open_interval():
    objective = RectifiedFlow(RectifiedFlowConfig(), num_classes=2)
    t = objective.sample_time(BatchRandom.local(0, 10000))
    assert (t > 0).all() and (t < 1).all() and abs(t.median().item() - 0.5) < 0.02


def test_batch_random_is_split_invariant():
    whole = BatchRandom(1, 7, 0, global_size=8, offset=0, local_size=8).randn(3)
    halves = [BatchRandom(1, 7, 0, global_size=8, offset=o, local_size=4).randn(3) for o in (0, 4)]
    assert torch.equal(torch.cat(halves), whole)
    assert not torch.equal(whole, BatchRandom(1, 8, 0, global_size=8, offset=0, local_size=8).randn(3))


class GaussianField(nn.Module):
    """Exact predictions for 1-D-per-pixel Gaussian data x0 ~ N(m, s^2) under a path (alpha, sigma):
    x_t ~ N(alpha m, alpha^2 s^2 + sigma^2); E[x0 | x_t] and E[eps | x_t] are linear in x_t."""

    def __init__(self, objective, m=0.7, s=0.3):
        super().__init__()
        self.objective, self.m, self.s = objective, m, s

    def forward(self, x, t, labels):
        alpha, sigma, d_alpha, d_sigma = self.objective.path.coefficients(t, x.dim())
        var = alpha**2 * self.s**2 + sigma**2
        centered = x - alpha * self.m
        x0 = self.m + alpha * self.s**2 / var * centered
        eps = sigma / var * centered
        kind = self.objective.config.prediction
        if kind == "data":
            return x0
        if kind == "velocity":
            return d_alpha * x0 + d_sigma * eps
        return eps if kind == "noise" else -eps / sigma


@pytest.mark.parametrize("path", ["linear", "gvp"])
@pytest.mark.parametrize("prediction, solver", [("velocity", "heun"), ("velocity", "euler_maruyama"),
                                                ("noise", "heun"), ("score", "euler_maruyama"), ("data", "heun")])
def test_samplers_recover_a_gaussian(path, prediction, solver):
    objective = RectifiedFlow(RectifiedFlowConfig(path=path, prediction=prediction), num_classes=1)
    field = GaussianField(objective)
    sampler = FlowSamplerConfig(solver=solver, num_steps=100 if solver == "euler_maruyama" else 20, last_step=0.01)
    samples = objective.sample(field, torch.zeros(2000, dtype=torch.long), (1, 1, 1), sampler,
                               torch.Generator().manual_seed(0)).flatten()
    assert abs(samples.mean().item() - 0.7) < 0.03
    assert abs(samples.std().item() - 0.3) < 0.03


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_prediction_conversions_are_consistent(path):
    x0, eps = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    t = torch.rand(5) * 0.9 + 0.05
    for prediction in ("velocity", "noise", "score", "data"):
        objective = RectifiedFlow(RectifiedFlowConfig(path=path, prediction=prediction), num_classes=1)
        alpha, sigma, d_alpha, d_sigma = objective.path.coefficients(t, 4)
        x_t = alpha * x0 + sigma * eps
        network_output = x0 if prediction == "data" else objective.target(x0, eps, t)
        velocity, noise = objective.velocity_and_noise(network_output, x_t, t)
        torch.testing.assert_close(velocity, d_alpha * x0 + d_sigma * eps, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(noise, eps, atol=1e-4, rtol=1e-4)
