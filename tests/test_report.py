"""effigen.report: the results-page writer on fake results (fast), the recipe plumbing, and the smoke budget end to end
(slow: a minute of training per method)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from effigen.report import (
    BUDGETS,
    RECIPES,
    RECIPES_BY_NAME,
    RECIPES_DIR,
    Report,
    available_presets,
    pareto_front,
    parse_training_log,
    presets_in,
    recipe_command,
    selected_recipes,
    write_page,
)


def fake_row(name, fid, status="ok", **extra):
    row = {"name": name, "kind": "generator", "status": status, "seed": 0, "generator_parameters": 5_030_000,
           "tokenizer_parameters": 0, "images_seen": 51_200, "train_seconds": 600.0,
           "metrics": {"fid": fid, "precision": 0.8, "recall": 0.7, "is": 9.1}, "command": f"bash benchmarks/results/{name}.sh"}
    row.update(extra)
    return row


def test_pareto_front_keeps_only_undominated_points():
    points = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (0.5, 9.0), (4.0, 1.0), (2.0, 3.5)]
    assert pareto_front(points) == [3, 0, 1, 4]  # (3, 4) and (2, 3.5) are beaten by (2, 3)
    assert pareto_front([]) == []


def test_write_page_table_failures_spread_plot_and_grids(tmp_path):
    from PIL import Image

    grid = tmp_path / "grid.png"
    Image.new("RGB", (64, 64)).save(grid)
    results = [
        {"name": "tokenizer-msvq", "kind": "tokenizer", "status": "trained", "images_seen": 9_600, "train_seconds": 360.0,
         "command": "bash benchmarks/results/tokenizer-msvq.sh"},
        fake_row("dit-flow", 1.25, grid=str(grid)),
        fake_row("var", 0.40, generator_parameters=5_050_000, tokenizer_parameters=1_000_000, grid=str(grid)),
        fake_row("raster-ar", 0.9, generator_parameters=7_000_000),
        {"name": "hmar", "kind": "generator", "status": "failed", "reason": "exit code 1",
         "error_tail": "RuntimeError: boom at step 3", "command": "bash benchmarks/results/hmar.sh"},
        {"name": "lightningdit-latent", "status": "skipped", "reason": "preset not available: mnist-lightningdit-latent"},
        fake_row("dit-flow-seed1", 1.45, seed=1, replicate_of="dit-flow"),
    ]
    speed = {"rows": {"dit-flow": {"images_per_second": 20.0, "evaluations_per_image": 100, "peak_memory_bytes": 50 * 2**20,
                                   "flops_per_image": 2e9},
                      "var": {"images_per_second": 60.0, "evaluations_per_image": 14, "peak_memory_bytes": 300 * 2**20,
                              "flops_per_image": 2.5e9},
                      "raster-ar": {"images_per_second": 50.0, "evaluations_per_image": 128, "peak_memory_bytes": 2**27,
                                    "flops_per_image": 1.6e9}},
             "environment": {"cpu_name": "Test CPU", "cpu_count": 2, "torch_version": "2.x", "date": "2026-01-02T00:00:00"}}
    page = write_page(results, speed, tmp_path / "docs" / "results.md", tmp_path / "docs" / "images" / "results",
                      BUDGETS["full"], ["python -m effigen.cli.report --budget full"])
    text = page.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    rows = {line.split("|")[1].strip(): line for line in table[1:]}
    # every generator of the main table is there, failed and skipped ones included; the replicate is not a row
    assert {"dit-flow", "var", "raster-ar", "hmar", "lightningdit-latent"} <= set(rows)
    assert "dit-flow-seed1" not in rows
    assert "| 0.400 |" in rows["var"] and "| 60.0 | 14 | 300 | 2.500 |" in rows["var"]
    assert "**failed**: exit code 1" in rows["hmar"] and "preset not available" in rows["lightningdit-latent"]
    assert "RuntimeError: boom at step 3" in text  # the error tail is shown
    assert "raster-ar (7.00M)" in text  # off the parameter target, said so
    assert "dit-flow (5.03M)" not in text
    assert "FID 1.450 against 1.250" in text and "0.200" in text  # the spread statement
    assert "Test CPU" in text and "2026-01-02" in text and "bash benchmarks/results/hmar.sh" in text
    images = tmp_path / "docs" / "images" / "results"
    assert (images / "fid-vs-time.png").stat().st_size > 1000
    assert (images / "dit-flow.png").is_file() and (images / "var.png").is_file()
    assert "](images/results/fid-vs-time.png)" in text and "](images/results/var.png)" in text
    assert "—" in rows["hmar"]  # no figures for a failed method


def test_recipes_exist_and_name_their_presets():
    presets = available_presets()
    for recipe in RECIPES:
        script = RECIPES_DIR / recipe.script
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
        assert "BUDGET_MINUTES" in text and "OUT=" in text and "SEED" in text
        if not recipe.base:  # every training call counts its minutes on the report's clock
            assert text.count("--trainer.max_minutes=") == text.count('--trainer.budget_clock="${BUDGET_CLOCK:-wall}"'), \
                recipe.name
            # and runs its learning-rate schedule on the report's schedule clock, with the step count only a cap
            assert text.count("--trainer.max_minutes=") == text.count(
                '--trainer.schedule_clock="${SCHEDULE_CLOCK:-steps}" --trainer.max_steps="$(( STEP_CAP * '), recipe.name
        names = presets_in(script)
        if recipe.base:  # post-processing of another recipe's pipeline: no preset, its base must exist
            assert recipe.base in {r.name for r in RECIPES} and "$BASE" in text, recipe.name
            continue
        assert names, recipe.name
        if recipe.name not in ("tokenizer-klvae", "lightningdit-latent"):  # presets being added separately
            assert set(names) <= presets, (recipe.name, names)
    assert presets_in(RECIPES_DIR / "hmar.sh") == ["mnist-hmar", "mnist-hmar-mask"]
    syntax = subprocess.run(["bash", "-n", *[str(RECIPES_DIR / r.script) for r in RECIPES]], capture_output=True)
    assert syntax.returncode == 0, syntax.stderr


def test_post_processing_recipes_bring_their_base_and_get_its_folder(tmp_path):
    chosen = [r.name for r in selected_recipes("dit-flow-w4a8", spread=False)]
    assert chosen == ["dit-flow", "dit-flow-w4a8"]
    report = Report(out=tmp_path, budget=BUDGETS["smoke"], recipes=selected_recipes("dit-flow-w4a4", spread=False))
    env = report.env_for(RECIPES_BY_NAME["dit-flow-w4a4"])
    assert env["BASE"] == str(tmp_path / "runs" / "dit-flow" / "final") and env["BITS"] == "w4a4"
    command = recipe_command(RECIPES_BY_NAME["dit-flow-w4a4"], env)
    assert "BITS=w4a4" in command and "MODE=efficientdm" in command and "bash benchmarks/results/efficientdm.sh" in command


def test_selection_puts_tokenizers_first_and_adds_the_replicate():
    names = [r.name for r in selected_recipes("var,dit-flow,raster-ar")]
    assert names == ["tokenizer-msvq", "tokenizer-vq", "var", "dit-flow", "raster-ar", "dit-flow-seed1"]
    assert [r.name for r in selected_recipes("hmar", spread=True)] == ["tokenizer-msvq", "hmar"]
    with pytest.raises(ValueError, match="unknown method"):
        selected_recipes("dit-flow,nope")


def test_page_command_reproduces_the_selection(tmp_path):
    def command(**kwargs):
        recipes = kwargs.pop("recipes")
        return Report(out=tmp_path, budget=BUDGETS["full"], recipes=recipes, log=lambda m: None, **kwargs).page_commands()[0]

    assert "--methods" not in command(recipes=selected_recipes(None)) and "--resume" not in command(recipes=selected_recipes(None))
    line = command(recipes=selected_recipes("dit-ddpm,sit", spread=False), resume=True)
    assert "--methods dit-ddpm,sit" in line and "--resume" in line and "--no-spread" not in line  # nothing to spread
    line = command(recipes=selected_recipes("dit-flow,var", spread=False), jobs=1)
    assert "--methods dit-flow,var" in line and "--no-spread" in line and "--jobs 1" in line
    assert "--no-spread" not in command(recipes=selected_recipes("dit-flow,var", spread=True))


def test_missing_preset_and_failed_prerequisite_are_recorded_not_run(tmp_path):
    report = Report(out=tmp_path, budget=BUDGETS["smoke"], recipes=selected_recipes("lightningdit-latent"),
                    log=lambda m: None)
    presets = available_presets() - {"mnist-klvae", "mnist-lightningdit-latent"}
    tokenizer, generator = report.recipes
    assert "preset not available: mnist-klvae" in report.blocked_reason(tokenizer, presets)
    report.results["tokenizer-klvae"] = {"status": "failed"}
    assert "preset not available" in report.blocked_reason(generator, presets)
    assert "prerequisite tokenizer-klvae did not train" in report.blocked_reason(generator, presets | {"mnist-lightningdit-latent"})


def test_parse_training_log_sums_stages():
    text = ("effigen train: hmar (HMAR), 5.12M parameters, mnist\ntrained 30 steps (30 this run) in 45.5s: 21.1 images/s, "
            "final loss 5.2\neffigen train: hmar (HMAR), 5.12M parameters (1.2M trained), mnist\n"
            "trained 10 steps (10 this run) in 14.5s: 22.0 images/s, final loss nan\n")
    parsed = parse_training_log(text)
    assert parsed["train_seconds"] == pytest.approx(60.0) and parsed["train_calls"] == 2
    assert parsed["parameters_reported_m"] == [5.12, 5.12]
    assert parsed["final_loss"] != parsed["final_loss"]  # nan: the driver calls this diverged
    assert "train_cpu_seconds" not in parsed
    cpu = parse_training_log(text.replace("final loss 5.2\n", "final loss 5.2\nbudget clock: 40.0 CPU seconds this run "
                                          "(trainer.budget_clock=cpu)\n") + "budget clock: 12.5 CPU seconds this run\n")
    assert cpu["train_cpu_seconds"] == pytest.approx(52.5) and cpu["train_seconds"] == pytest.approx(60.0)


def test_report_budgets_count_cpu_time_and_pass_the_clock(tmp_path):
    report = Report(out=tmp_path, budget=BUDGETS["full"], recipes=selected_recipes("dit-flow", spread=False))
    assert BUDGETS["full"].clock == "cpu" and report.env_for(RECIPES_BY_NAME["dit-flow"])["BUDGET_CLOCK"] == "cpu"
    env = report.env_for(RECIPES_BY_NAME["dit-flow"])
    assert env["SCHEDULE_CLOCK"] == "time"
    # every generator gets the common budget; a tokenizer may get a stated multiple of the tokenizer budget
    assert all(r.minutes_scale == 1.0 for r in RECIPES if r.kind == "generator")
    assert report.env_for(RECIPES_BY_NAME["tokenizer-detailflow"])["BUDGET_MINUTES"] == "18"
    assert report.env_for(RECIPES_BY_NAME["tokenizer-msvq"])["BUDGET_MINUTES"] == "6"
    # the page's exact command carries both clocks, so a user's rerun trains the same way
    command = recipe_command(RECIPES_BY_NAME["dit-flow"], env)
    assert "BUDGET_CLOCK=cpu" in command and "SCHEDULE_CLOCK=time" in command


@pytest.mark.parametrize("schedule,cap", [("steps", 1), ("time", 4)])
def test_recipes_schedule_clock_sets_the_trainer_and_the_step_cap(tmp_path, schedule, cap):
    """Run a recipe with `echo` as effigen: the trainer gets the schedule clock, and max_steps is the estimate (steps)
    or 4x it (time: the budget ends the run, the cosine spans the budget)."""
    env = {**os.environ, "EFFIGEN": "echo", "SCHEDULE_CLOCK": schedule, "BUDGET_MINUTES": "10",
           "STEPS_PER_MINUTE": "57", "BUDGET_CLOCK": "cpu", "OUT": str(tmp_path / "var")}
    done = subprocess.run(["bash", str(RECIPES_DIR / "var.sh")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert f"--trainer.schedule_clock={schedule}" in done.stdout
    assert f"--trainer.max_steps={cap * 571}" in done.stdout and "--trainer.warmup_steps=57" in done.stdout


@pytest.mark.slow
def test_smoke_budget_end_to_end(tmp_path):
    """The driver on the smoke budget for one method and its second seed: trains, evaluates, benchmarks, writes."""
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "effigen.cli.report", "--budget", "smoke", "--methods", "dit-flow",
                           "--num-images", "100", "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "results" / "dit-flow.json").read_text())
    assert record["status"] == "ok", record
    assert abs(record["generator_parameters"] / 5.05e6 - 1) < 0.10
    assert record["images_seen"] > 0 and 0 < record["metrics"]["fid"] < 1e4
    speed = json.loads((out / "results" / "speed.json").read_text())
    assert set(speed["rows"]) == {"dit-flow", "dit-flow-seed1"}
    text = (out / "results.md").read_text()
    assert "| dit-flow |" in text and "**Spread**" in text
    assert (out / "images" / "results" / "fid-vs-time.png").is_file()
    assert (out / "images" / "results" / "dit-flow.png").is_file()
    # --resume reuses everything: no training, no new evaluation
    again = subprocess.run([sys.executable, "-m", "effigen.cli.report", "--budget", "smoke", "--methods", "dit-flow",
                            "--num-images", "100", "--out", str(out), "--resume"], capture_output=True, text=True,
                           timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0 and "training" not in again.stdout and "evaluating" not in again.stdout, again.stdout
