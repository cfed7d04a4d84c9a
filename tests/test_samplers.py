import math

import pytest
import torch

from effigen.samplers import euler_sample, guided_prediction, heun_sample, make_time_grid, number_of_evaluations


def linear_field(rate: float):
    # dx/dt = rate * x, so integrating from t = 1 to t = 0 gives x(0) = x(1) * exp(-rate).
    return lambda x, t: rate * x


@pytest.mark.parametrize("solver, order", [(euler_sample, 1), (heun_sample, 2)])
def test_solver_order_on_linear_ode(solver, order):
    rate = 1.3
    x1 = torch.ones(1, 1, dtype=torch.float64) * 2.0
    exact = x1 * math.exp(-rate)

    def error(steps):
        field = lambda x, t: rate * x  # noqa: E731
        return (solver(field, x1.clone(), make_time_grid(steps)) - exact).abs().item()

    errors = [error(n) for n in (8, 16, 32)]
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    # halving the step divides the global error by 2**order
    for ratio in ratios:
        assert abs(math.log2(ratio) - order) < 0.25, (errors, ratios)


def test_heun_last_step_is_euler_and_counts_evaluations():
    calls = []

    def field(x, t):
        calls.append(float(t[0]))
        return torch.zeros_like(x)

    heun_sample(field, torch.zeros(1, 1), make_time_grid(3))
    assert len(calls) == number_of_evaluations("heun", 3) == 5
    assert 0.0 not in calls  # never evaluated at t = 0
    assert number_of_evaluations("euler", 7) == 7


def test_time_grid_and_shift():
    grid = make_time_grid(4)
    assert torch.allclose(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = make_time_grid(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert (shifted[1:-1] > grid[1:-1]).all()  # more time spent near noise
    assert torch.allclose(shifted[2], torch.tensor(3 * 0.5 / (1 + 2 * 0.5), dtype=torch.float64))
    with pytest.raises(ValueError):
        make_time_grid(0)


def fake_model(x, t, labels):
    # conditional output = 2 + label, unconditional (label 9) = 1, per channel
    return torch.ones_like(x) + (labels != 9).float().view(-1, 1, 1, 1) * (1 + labels.float().view(-1, 1, 1, 1))


def test_guidance_conventions():
    x = torch.zeros(2, 4, 2, 2)
    t = torch.tensor([0.2, 0.8])
    labels = torch.tensor([0, 1])
    cond = fake_model(x, t, labels)
    assert torch.equal(guided_prediction(fake_model, x, t, labels, 9, 1.0), cond)
    guided = guided_prediction(fake_model, x, t, labels, 9, 3.0)
    assert torch.allclose(guided, 1 + 3.0 * (cond - 1))  # uncond + s (cond - uncond)
    interval = guided_prediction(fake_model, x, t, labels, 9, 3.0, interval=(0.0, 0.5))
    assert torch.allclose(interval[0], guided[0]) and torch.allclose(interval[1], cond[1])
    first3 = guided_prediction(fake_model, x, t, labels, 9, 3.0, channels=3)
    assert torch.allclose(first3[:, :3], guided[:, :3]) and torch.allclose(first3[:, 3:], cond[:, 3:])
