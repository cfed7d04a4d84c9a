"""Tests for effigen.bench and `effigen bench`: FLOPs against an analytic count, the JSON record, --vs,
--precision both, memory measurement, and errors. No wall-clock thresholds: timings are only checked
for being positive and consistent with each other."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from effigen.bench import benchmark_pipeline, compare, count_flops, measure_matmul_peak, measure_peak_memory
from effigen.cli.main import main
from effigen.models.dit import DiT, DiTConfig
from effigen.nn.attention import attention_backend
from effigen.objectives.flow_matching import FlowSamplerConfig, RectifiedFlowConfig
from effigen.pipeline import Pipeline

FAST = ["--device", "cpu", "--peak-size", "128", "--peak-seconds", "0.05",
        "--repeats", "2", "--warmup", "1", "--batch-size", "2"]


def tiny_config(depth: int = 1) -> DiTConfig:
    return DiTConfig(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=depth, num_heads=2, num_classes=4)


def make_pipeline(depth: int = 1, **sampler) -> Pipeline:
    torch.manual_seed(0)
    settings = FlowSamplerConfig(**{"solver": "euler", "num_steps": 2, "cfg_scale": 2.0, **sampler})
    return Pipeline("dit-flow", DiT(tiny_config(depth)).eval(), RectifiedFlowConfig(), settings)


def dit_forward_flops(c: DiTConfig) -> int:
    """Matmul / conv / attention FLOPs of one DiT forward for one sample, from the architecture alone
    (2 FLOPs per multiply-add; element-wise work not counted)."""
    D, p, C = c.hidden_size, c.patch_size, c.in_channels
    L = (c.input_size // p) ** 2
    H = int(D * c.mlp_ratio)
    patch_embed = 2 * L * (C * p * p) * D  # conv with kernel = stride = p
    time_mlp = 2 * (256 * D + D * D)  # 256 sinusoidal features -> D -> D
    block = (2 * D * 6 * D  # adaLN modulation
             + 2 * L * D * 3 * D  # qkv
             + 2 * 2 * L * L * D  # q k^T and attn @ v over all heads
             + 2 * L * D * D  # out projection
             + 2 * 2 * L * D * H)  # mlp fc1 + fc2
    final = 2 * D * 2 * D + 2 * L * D * (p * p * c.out_channels)
    return patch_embed + time_mlp + c.depth * block + final


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    return {"A": make_pipeline(1).save_pretrained(root / "a"), "B": make_pipeline(2).save_pretrained(root / "b")}


# ------------------------------------------------------------------------------------------------ FLOPs
def test_forward_flops_match_analytic_count_with_either_attention_backend() -> None:
    network = DiT(tiny_config(2)).eval()
    x, t, y = torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([0, 1, 4])
    expected = 3 * dit_forward_flops(network.config)
    with torch.no_grad():
        sdpa, by_op = count_flops(lambda: network(x, t, y))
        with attention_backend("manual"):
            manual, _ = count_flops(lambda: network(x, t, y))
    assert sdpa == manual == expected
    assert any("attention" in op for op in by_op)  # the CPU SDPA kernel is counted, not silently skipped


def test_attention_backward_is_counted_as_torch_counts_sdpa_backward() -> None:
    q, k, v = (torch.randn(2, 3, L, 8, requires_grad=True) for L in (5, 7, 7))
    total, by_op = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward())
    product = 2 * 2 * 3 * 5 * 7 * 8  # one (5 x 8) @ (8 x 7) product per (batch, head)
    assert by_op["aten._scaled_dot_product_flash_attention_for_cpu"] == 2 * product
    assert by_op["aten._scaled_dot_product_flash_attention_for_cpu_backward"] == 5 * product  # scores recomputed
    assert total == 7 * product


@pytest.mark.parametrize(
    "sampler, evaluations",
    [
        (dict(solver="euler", num_steps=2, cfg_scale=1.0), 2),
        (dict(solver="euler", num_steps=2, cfg_scale=2.0), 4),  # CFG doubles the batch
        (dict(solver="heun", num_steps=3, cfg_scale=1.0), 5),  # 2N - 1
    ],
)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_flops_per_image_equal_evaluations_times_analytic_forward(sampler, evaluations, precision) -> None:
    pipeline = make_pipeline(1)
    result = benchmark_pipeline(pipeline, batch_size=3, precision=precision, repeats=1, warmup=0,
                                peak_flops_per_second={precision: 1e9}, **sampler)
    forward = dit_forward_flops(pipeline.generator.config)
    assert result["evaluations_per_image"] == evaluations == pipeline.number_of_evaluations(**sampler)
    assert result["flops_per_image"] == evaluations * forward
    assert result["flops_per_evaluation"] == forward
    assert sum(result["flops_by_op_per_image"].values()) == pytest.approx(result["flops_per_image"])
    assert result["achieved_flops_per_second"] == pytest.approx(result["flops_per_image"] * result["images_per_second"])
    assert result["peak_fraction"] == pytest.approx(result["achieved_flops_per_second"] / 1e9)
    assert result["sampler"]["solver"] == sampler["solver"] and result["sampler"]["num_steps"] == sampler["num_steps"]


def test_parameters_and_latency_statistics() -> None:
    pipeline = make_pipeline(1)
    result = benchmark_pipeline(pipeline, batch_size=2, repeats=3, warmup=1, peak_flops_per_second={"fp32": 1e9})
    assert result["parameters"] == sum(p.numel() for p in pipeline.generator.parameters())
    assert len(result["latencies_s"]) == 3
    assert result["latency_min_s"] <= result["latency_median_s"] <= result["latency_max_s"]
    assert result["images_per_second"] == pytest.approx(2 / result["latency_median_s"])


# ------------------------------------------------------------------------------------- peak and memory
def test_measure_matmul_peak_is_positive_and_checks_precision() -> None:
    for precision in ("fp32", "bf16"):
        peak = measure_matmul_peak(precision, "cpu", size=128, seconds=0.02)
        assert math.isfinite(peak) and peak > 0
    with pytest.raises(ValueError, match="precision"):
        measure_matmul_peak("fp8", "cpu", size=16, seconds=0.01)


@pytest.mark.parametrize("method", ["hwm", "poll"])
def test_cpu_peak_memory_sees_a_known_allocation(method) -> None:
    size = 64 * 2**20

    def allocate():
        buffer = torch.ones(size // 4)  # written, so every page is resident
        time.sleep(0.05)  # held long enough for a 1 ms poller
        del buffer

    try:
        memory = measure_peak_memory(allocate, "cpu", method=method)
    except ValueError as error:
        # the high-water-mark reset may be refused by the kernel; the poller must always work on Linux,
        # and the automatic choice must then fall back to it
        assert method == "hwm", f"the RSS poller failed: {error}"
        memory = measure_peak_memory(allocate, "cpu")
    assert 0.9 * size <= memory["peak_memory_bytes"] <= 2 * size
    assert memory["peak_memory_total_bytes"] >= memory["peak_memory_bytes"]
    assert memory["memory_method"]


def test_compare_is_first_over_second() -> None:
    a = {"images_per_second": 10.0, "latency_median_s": 0.1, "peak_memory_bytes": 100, "flops_per_image": 4.0,
         "parameters": 6, "peak_fraction": 0.2}
    b = {**a, "images_per_second": 5.0, "latency_median_s": 0.2, "peak_memory_bytes": 0, "flops_per_image": 2.0}
    ratios = compare(a, b)
    assert ratios["images_per_second"] == 2.0 and ratios["latency"] == 0.5 and ratios["flops_per_image"] == 2.0
    assert ratios["peak_memory"] is None and ratios["parameters"] == 1.0


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_json_record_has_every_field(folders, tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--from", str(folders["A"]), *FAST, "--steps", "3", "--threads", "1",
                     "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "images/s" in printed and "FLOPs/image" in printed and "A fp32" in printed
    record = json.loads(out.read_text())
    assert record["settings"]["batch_size"] == 2 and record["settings"]["sampler_overrides"] == {"num_steps": 3}
    env = record["environment"]
    assert env["torch_version"] == torch.__version__ and env["device"] == "cpu" and env["date"]
    assert env["threads"] == 1 and record["settings"]["threads"] == 1
    assert record["matmul_peak_flops_per_second"]["fp32"] > 0
    (result,) = record["results"]
    positive = ["parameters", "evaluations_per_image", "latency_median_s", "latency_min_s", "latency_max_s",
                "images_per_second", "images_per_second_best", "peak_memory_total_bytes", "flops_per_image",
                "flops_per_evaluation", "achieved_flops_per_second", "matmul_peak_flops_per_second", "peak_fraction"]
    for key in positive:
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert isinstance(result["peak_memory_bytes"], int) and result["peak_memory_bytes"] >= 0
    assert isinstance(result["parameters"], int) and isinstance(result["evaluations_per_image"], int)
    assert result["evaluations_per_image"] == 6  # 3 Euler steps x 2 for CFG
    assert result["flops_per_image"] == 6 * dit_forward_flops(tiny_config(1))
    assert len(result["latencies_s"]) == 2 and result["precision"] == "fp32" and result["name"] == "A"
    assert result["path"] == str(folders["A"].resolve()) and isinstance(result["memory_method"], str)
    assert record["comparisons"] == []


def test_cli_vs_prints_both_entries_and_ratios(folders, tmp_path, capsys) -> None:
    out = tmp_path / "vs.json"
    argv = ["bench", "--from", str(folders["A"]), "--vs", str(folders["B"]), *FAST, "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"A = {folders['A']}" in printed and f"B = {folders['B']}" in printed
    assert "A fp32" in printed and "B fp32" in printed and "ratios A / B" in printed
    record = json.loads(out.read_text())
    assert [r["name"] for r in record["results"]] == ["A", "B"]
    (comparison,) = record["comparisons"]
    ratios = comparison["ratios"]
    assert comparison["kind"] == "vs"
    assert set(ratios) >= {"images_per_second", "latency", "peak_memory", "flops_per_image"}
    expected = dit_forward_flops(tiny_config(1)) / dit_forward_flops(tiny_config(2))
    assert ratios["flops_per_image"] == pytest.approx(expected)
    a, b = record["results"]
    assert ratios["images_per_second"] == pytest.approx(a["images_per_second"] / b["images_per_second"])
    assert ratios["latency"] == pytest.approx(a["latency_median_s"] / b["latency_median_s"])
    assert f"{expected:.3f}x" in printed


def test_cli_precision_both_prints_bf16_over_fp32(folders, tmp_path, capsys) -> None:
    out = tmp_path / "both.json"
    assert main(["bench", "--from", str(folders["A"]), *FAST, "--precision", "both", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "A fp32" in printed and "A bf16" in printed and "ratios bf16 / fp32" in printed
    record = json.loads(out.read_text())
    fp32, bf16 = record["results"]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert fp32["flops_per_image"] == bf16["flops_per_image"]
    assert set(record["matmul_peak_flops_per_second"]) == {"fp32", "bf16"}
    (comparison,) = record["comparisons"]
    assert comparison["kind"] == "precision" and comparison["ratios"]["flops_per_image"] == 1.0


def test_cli_bad_from_names_the_folder(tmp_path, capsys) -> None:
    missing = tmp_path / "no_such_pipeline"
    assert main(["bench", "--from", str(missing)]) == 2
    error = capsys.readouterr().err
    assert str(missing) in error and "does not exist" in error
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["bench", "--from", str(empty)]) == 2
    error = capsys.readouterr().err
    assert str(empty) in error and "model_index.json" in error


def test_cli_bad_vs_and_bad_override_fail_before_timing(folders, tmp_path, capsys) -> None:
    assert main(["bench", "--from", str(folders["A"]), "--vs", str(tmp_path / "gone")]) == 2
    assert "--vs" in capsys.readouterr().err
    assert main(["bench", "--from", str(folders["A"]), "--solver", "rk9"]) == 2
    assert "solver" in capsys.readouterr().err
