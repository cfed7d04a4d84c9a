"""Low-bit quantization (nn/quant.py, models/quantized.py, post/quantize.py, `effigen quantize`): quantizer round trips
and straight-through gradients, packing, the integer kernel against the simulated one, QALoRA's merge re-quantization,
per-timestep step sizes selected from the sampler's t, and the command end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import effigen.registry  # noqa: F401  (sets the QuantizedNetwork class resolver)
from effigen.models.dit import DiT, DiTConfig
from effigen.models.quantized import QuantizedConfig, QuantizedNetwork, boundary_layers, quantizable_layers
from effigen.nn.quant import (QuantLayer, TimestepContext, fake_quant, mse_weight_params, pack_codes, quant_codes,
                              unpack_codes)
from effigen.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).parent))
from conftest import randomize  # noqa: E402
from test_distill import make_teacher  # noqa: E402


# ------------------------------------------------------------------------------------------------ quantizers
def test_values_on_the_grid_round_trip_and_the_rest_round_to_the_nearest_level():
    delta, zp = torch.tensor(0.1), torch.tensor(8.0)
    on_grid = (torch.arange(16) - 8) * 0.1
    torch.testing.assert_close(fake_quant(on_grid, delta, zp, 4), on_grid)
    x = torch.tensor([0.04, 0.06, -0.26, 5.0, -5.0])
    torch.testing.assert_close(fake_quant(x, delta, zp, 4), torch.tensor([0.0, 0.1, -0.3, 0.7, -0.8]))


def test_straight_through_gradients_inside_the_range_and_zero_outside():
    x = torch.tensor([0.03, -0.21, 0.5, 9.0, -9.0], requires_grad=True)
    delta = torch.tensor(0.1, requires_grad=True)
    fake_quant(x, delta, torch.tensor(8.0), 4).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))
    # LSQ: d/d delta of (round(x/d) + zp - zp) d inside the range is round(x/d) - x/d; clipped values give the level
    expected = (0.0 - 0.3) + (-2.0 + 2.1) + (5.0 - 5.0) + 7.0 + (-8.0)
    assert float(delta.grad) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("count", [1, 7, 64])
def test_packing_round_trip(bits, count):
    codes = torch.randint(0, 2 ** bits, (count,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-count // (8 // bits))
    assert torch.equal(unpack_codes(packed, bits, (count,)), codes.to(torch.int32))


def test_packing_rejects_codes_out_of_range_and_wrong_sizes():
    with pytest.raises(ValueError, match=r"\[0, 15\] for 4 bits"):
        pack_codes(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, (8,))


def test_mse_weight_init_is_no_worse_than_the_full_range_per_channel():
    torch.manual_seed(0)
    w = torch.randn(6, 32)
    delta, zp = mse_weight_params(w, 4)
    full = (w.max(1).values - w.min(1).values) / 15
    err = (fake_quant(w, delta[:, None], zp[:, None], 4) - w).pow(2).sum(1)
    full_zp = torch.round(-w.min(1).values / full)
    full_err = (fake_quant(w, full[:, None], full_zp[:, None], 4) - w).pow(2).sum(1)
    assert bool((err <= full_err + 1e-6).all()) and err.sum() < 0.95 * full_err.sum()  # Gaussian tails: clipping pays


# ------------------------------------------------------------------------------------------------ the layer
def make_layer(w_bits=4, a_bits=8, steps=3, conv=False):
    torch.manual_seed(0)
    float_layer = nn.Conv2d(6, 10, 3, padding=1) if conv else nn.Linear(24, 40)
    context = TimestepContext()
    layer = QuantLayer.from_float(float_layer, w_bits, a_bits, steps, context)
    layer.set_activation_params(torch.tensor([0.01, 0.02, 0.04][:steps]), torch.tensor([100.0, 128.0, 140.0][:steps]))
    if a_bits <= 4:
        layer.set_activation_params(torch.tensor([0.2, 0.3, 0.5][:steps]), torch.tensor([7.0, 8.0, 9.0][:steps]))
    return float_layer, layer, context


@pytest.mark.parametrize("same_t", [True, False])
@pytest.mark.parametrize("w_bits,a_bits", [(4, 8), (8, 8), (4, 4), (2, 8), (8, 6)])
def test_integer_kernel_equals_the_simulated_product(w_bits, a_bits, same_t):
    _, layer, context = make_layer(w_bits, a_bits)
    x = torch.randn(3, 5, 24) * 2
    if same_t:  # one step size for the call: the fused quantize kernel
        context.set(torch.tensor([1, 1, 1]), torch.tensor([2, 2, 2]), torch.tensor([0.25, 0.25, 0.25]))
    else:  # samples at different t: per-row step sizes
        context.set(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2]), torch.tensor([0.0, 0.5, 1.0]))
    layer.eval()
    with torch.no_grad():
        integer = layer(x)  # inference: the int8 GEMM path
    with torch.enable_grad():
        simulated = layer(x)  # grad mode: the float fake-quant path
    torch.testing.assert_close(integer, simulated.detach(), rtol=1e-5, atol=1e-5)


def test_quantized_layer_is_close_to_the_float_layer_at_8_bits():
    float_layer, layer, context = make_layer(8, 8, steps=1)
    layer.set_activation_params(torch.tensor([8.0 / 255]), torch.tensor([128.0]))  # covers [-4, 4]
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(1)).clamp(-3.9, 3.9)
    with torch.no_grad():
        error = (layer(x) - float_layer(x)).abs().max() / float_layer(x).abs().max()
    assert error < 0.03


def test_per_timestep_layers_need_a_timestep():
    _, layer, _ = make_layer()
    with pytest.raises(RuntimeError, match="no timestep was given"):
        layer(torch.randn(2, 24))


@pytest.mark.parametrize("conv", [False, True])
def test_lora_merge_requantizes_into_the_same_output(conv):
    _, layer, context = make_layer(conv=conv)
    layer.add_lora(4)
    codes_before = layer.weight_codes().clone()
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    x = torch.randn(2, 6, 5, 5) if conv else torch.randn(2, 24)
    context.set(torch.tensor([1, 1]), torch.tensor([1, 1]), torch.zeros(2))
    with torch.enable_grad():
        trained = layer(x).detach()  # W = quantize(deq(W) + B A) every forward
    layer.merge_lora()
    assert layer.lora_A is None and not torch.equal(layer.weight_codes(), codes_before)
    with torch.no_grad():
        merged = layer(x)
    torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5)
    assert set(layer.state_dict()) == {"w_packed", "w_delta", "w_zp", "bias", "a_delta", "a_zp"}


def test_lora_gradients_flow_through_the_requantization():
    _, layer, context = make_layer()
    layer.add_lora(4)
    context.set(torch.tensor([0]), torch.tensor([0]), torch.zeros(1))
    layer(torch.randn(1, 24)).pow(2).sum().backward()
    assert layer.lora_B.grad.abs().sum() > 0 and layer.a_delta.grad[0] != 0 and layer.a_delta.grad[1:].eq(0).all()


# ------------------------------------------------------------------------------------------------ the network
def tiny_quantized(policy="interpolate", grid=(0.0, 0.5, 1.0)):
    torch.manual_seed(0)
    config = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    net = randomize(DiT(config))
    layers = {name: (4, 8) for name in quantizable_layers(net)}
    from effigen.config import config_to_dict

    q = QuantizedNetwork.from_float(net, "DiT", config_to_dict(config), layers, list(grid), policy)
    for i, layer in enumerate(q.quant_layers().values()):
        layer.set_activation_params(torch.tensor([0.02, 0.04, 0.08]) * (1 + i / 10), torch.tensor([128.0, 120.0, 110.0]))
    return net, q.eval()


def test_boundary_layers_of_a_dit_are_its_patch_embedding_and_output_projection():
    net, _ = tiny_quantized()
    assert boundary_layers(net) == ("x_embedder.proj", "final_layer.linear")


def test_the_sampler_time_selects_the_row_and_times_between_rows_interpolate():
    _, q = tiny_quantized()
    index0, index1, frac = q.timestep_rows(torch.tensor([0.0, 0.5, 1.0, 0.75, 0.1]))
    torch.testing.assert_close(q.context.select(torch.tensor([7.0]), 5), torch.full((5,), 7.0))  # one row: no t needed
    q.context.set(index0, index1, frac)
    torch.testing.assert_close(q.context.select(torch.tensor([10.0, 20.0, 30.0]), 5),
                               torch.tensor([10.0, 20.0, 30.0, 25.0, 12.0]))


def test_outputs_follow_the_row_of_their_own_timestep():
    _, q = tiny_quantized()
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    with torch.no_grad():
        both = q(x, torch.tensor([0.0, 1.0]), labels)
        first = q(x[:1], torch.tensor([0.0]), labels[:1])
        second = q(x[1:], torch.tensor([1.0]), labels[1:])
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        other_row = q(x[:1], torch.tensor([1.0]), labels[:1])
    assert not torch.allclose(other_row, first)


def test_strict_policy_names_the_calibrated_steps_and_nearest_takes_the_closest_row():
    _, strict = tiny_quantized("strict")
    x, labels = torch.randn(1, 1, 8, 8), torch.tensor([0])
    with torch.no_grad():
        strict(x, torch.tensor([0.5]), labels)  # on the grid: fine
        with pytest.raises(ValueError, match=r"calibrated for 3 sampling steps.*re-quantize"):
            strict(x, torch.tensor([0.3]), labels)
    _, nearest = tiny_quantized("nearest")
    assert [int(i) for i in nearest.timestep_rows(torch.tensor([0.3, 0.2, 0.9]))[0]] == [1, 0, 2]


def test_config_reads_the_base_settings_through_and_checks_its_own():
    _, q = tiny_quantized()
    assert q.config.input_size == 8 and q.config.num_classes == 3 and q.base_network_class is DiT
    with pytest.raises(ValueError, match="increase strictly"):
        QuantizedConfig(base_class="DiT", time_grid=[0.5, 0.1])
    with pytest.raises(ValueError, match="timestep_policy"):
        QuantizedConfig(base_class="DiT", timestep_policy="counter")


# ------------------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from effigen.cli.quantize import run

    root = tmp_path_factory.mktemp("quantize")
    teacher = make_teacher(root / "teacher")  # dit-flow, Heun 3 steps, cfg 2
    args = ["--from", teacher, "--calib-images", "8", "--no-progress"]
    assert run([*map(str, args), "--bits", "w4a8", "--mode", "ptq", "--out", str(root / "ptq")]) == 0
    assert run([*map(str, args), "--bits", "w4a4", "--epochs", "2", "--batch-size", "2", "--lora-rank", "4",
                "--out", str(root / "edm")]) == 0
    return root


def test_quantized_folders_load_sample_and_are_smaller(folders):
    full = Pipeline.from_pretrained(folders / "teacher")
    reference = full([0, 1, 2], seed=0)
    for name in ("ptq", "edm"):
        pipe = Pipeline.from_pretrained(folders / name)
        assert isinstance(pipe.generator, QuantizedNetwork) and pipe.method.name == "dit-flow"
        assert pipe.sampler_config == full.sampler_config
        images = pipe([0, 1, 2], seed=0)
        assert images.shape == reference.shape and torch.isfinite(images).all()
        assert 0 < (images - reference).abs().mean() < 0.5
        size = lambda f: sum(p.stat().st_size for p in (f / "generator").iterdir())  # noqa: E731
        assert size(folders / name) < 0.6 * size(folders / "teacher")
    info = Pipeline.from_pretrained(folders / "edm").info["quantization"]
    assert info["settings"]["bits"] == "w4a4" and info["efficientdm"]["updates"] == 2 * info["calls_per_trajectory"]
    # first and last layers at 8 bits, the rest at the requested widths
    layers = Pipeline.from_pretrained(folders / "edm").generator.config.layers
    assert layers["x_embedder.proj"] == [8, 8] and layers["final_layer.linear"] == [8, 8]
    assert layers["blocks.0.attn.qkv"] == [4, 4]


def test_efficientdm_changes_the_weights_it_fine_tunes(folders):
    ptq = Pipeline.from_pretrained(folders / "ptq").generator
    edm = Pipeline.from_pretrained(folders / "edm").generator
    a, b = ptq.quant_layers()["blocks.0.attn.qkv"], edm.quant_layers()["blocks.0.attn.qkv"]
    assert a.w_bits == 4 and b.w_bits == 4
    # activation tables were learned per timestep: rows differ after distillation (all started equal)
    assert not torch.allclose(b.a_delta, b.a_delta[0].expand_as(b.a_delta))


def test_another_step_count_interpolates_and_strict_folders_refuse_it(folders, tmp_path):
    from effigen.cli.quantize import run

    pipe = Pipeline.from_pretrained(folders / "ptq")
    assert torch.isfinite(pipe([0], seed=0, num_steps=5)).all()
    teacher = folders / "teacher"
    assert run(["--from", str(teacher), "--bits", "w8a8", "--mode", "ptq", "--calib-images", "4", "--no-progress",
                "--timestep-policy", "strict", "--out", str(tmp_path / "strict")]) == 0
    strict = Pipeline.from_pretrained(tmp_path / "strict")
    strict([0], seed=0)  # the calibrated sampler
    with pytest.raises(ValueError, match="is not a calibrated timestep"):
        strict([0], seed=0, num_steps=5)


def test_bad_requests_are_clear_errors(folders, run_cli, capsys, tmp_path):
    code, _, err = run_cli(["quantize", "--from", folders / "teacher", "--bits", "w3a8", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "weight bits must be 2, 4 or 8" in err
    code, _, err = run_cli(["quantize", "--from", folders / "teacher", "--bits", "int4", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "like w4a8" in err
    code, _, err = run_cli(["quantize", "--from", folders / "ptq", "--bits", "w4a8", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "already quantized" in err
    code, _, err = run_cli(["quantize", "--from", tmp_path / "missing", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "does not exist" in err
