"""The Trainer's run folder under faults: the time-based schedule and its resume, non-finite weights (never written,
never loaded), leftovers of interrupted writes, metrics after a resume, two runs into one folder, unwritable
folders, a full disk and a corrupt state.json. A tiny linear network trains on a tiny tensor dataset here, so every
test drives the Trainer directly, in a few steps, with a fake clock where time matters."""

import errno
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from effigen.config import ConfigError
from effigen.io import (
    CheckpointError, CheckpointWriteError, DirectoryLock, NonFiniteWeightsError, OutputDirectoryError, RunLockedError,
    atomic_directory, check_finite, load_state_dict_strict, save_weights,
)
from effigen.training import trainer as trainer_module
from effigen.training.trainer import Trainer, TrainerConfig, learning_rate_factor, list_checkpoints

from conftest import REPO


class FakeClock:
    """Training time that advances by `tick` seconds per loss evaluation (one per step here)."""

    def __init__(self, start: float = 0.0, tick: float = 1.0):
        self.now, self.tick = start, tick

    def __call__(self) -> float:
        return self.now


class TinyObjective:
    def __init__(self, clock: FakeClock | None = None):
        self.clock = clock
        self.calls = 0

    def loss(self, model, batch, random):
        self.calls += 1
        if self.clock is not None:
            self.clock.now += self.clock.tick
        images = batch["images"].flatten(1)
        noise = random.randn(images.shape[1])  # a draw of (seed, step): replayed exactly on resume
        prediction = model(images + 0.1 * noise)
        return {"loss": ((prediction - images.flip(1)) ** 2).mean()}


class TinyData(torch.utils.data.Dataset):
    num_classes, class_names = 1, ["x"]

    def __init__(self, n: int = 16):
        self.images = torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 0


def save_folder(path: Path, ema_state: dict, extra) -> None:
    with atomic_directory(path) as tmp:
        (tmp / "generator").mkdir()
        save_weights(ema_state, tmp / "generator" / "model.safetensors")
        extra(tmp)


def make_trainer(output_dir: Path, clock: FakeClock | None = None, **settings) -> Trainer:
    config = TrainerConfig(**{
        "output_dir": str(output_dir), "max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32",
        "device": "cpu", "progress": False, "log_every": 1, "checkpoint_every": 0, "ema_decay": 0.9, **settings})
    torch.manual_seed(0)
    network = nn.Linear(12, 12)
    return Trainer(config, network, TinyObjective(clock), TinyData(), save_folder, clock=clock)


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def killed_at(trainer: Trainer, step: int) -> Trainer:
    """Make `trainer.train()` die (like kill -9 would stop it) when it is about to run step `step + 1`."""
    original = trainer.train_step

    def train_step(batches):
        if trainer.step == step:
            raise KeyboardInterrupt("simulated kill")
        return original(batches)

    trainer.train_step = train_step
    return trainer


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def poison(path: Path) -> str:
    """Overwrite the first value of the first float32 tensor of a safetensors file with NaN (a flipped bit's effect)."""
    raw = bytearray(path.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    start = 8 + size + header[name]["data_offsets"][0]
    raw[start:start + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(raw))
    return name


# ---------------------------------------------------------------------------------------------- time schedule

def test_time_schedule_reaches_the_floor_exactly_when_the_budget_is_spent(tmp_path):
    # 1 s per step, a 6 s budget, warm-up 2 steps: the cosine runs over the 4 s after warm-up, whatever max_steps says
    clock = FakeClock()
    trainer = make_trainer(tmp_path, clock, max_steps=1000, max_minutes=0.1, warmup_steps=2, schedule="cosine",
                           min_learning_rate_ratio=0.1, schedule_clock="time")
    summary = trainer.train()
    assert summary["steps"] == 6 and summary["stopped_early"] and summary["train_seconds"] == 6.0
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    # the logged rate is the one the next step uses, set from the training time at the end of this step
    expected = [1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0 / 4))] + [
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in (3, 4, 5, 6)]
    assert [r["learning_rate"] for r in records] == pytest.approx([1e-2 * f for f in expected], rel=1e-12)
    assert records[-1]["learning_rate"] == pytest.approx(1e-2 * 0.1, rel=1e-12)  # the floor, at the budget
    state = json.loads((list_checkpoints(tmp_path)[-1] / "train_state" / "state.json").read_text())
    assert state["train_seconds"] == 6.0 and state["warmup_seconds"] == 2.0 and state["schedule_clock"] == "time"
    # the step-based schedule of the same run would still be near its top at the budget's end
    assert learning_rate_factor(6, TrainerConfig(**{**trainer.config.__dict__, "schedule_clock": "steps"})) > 0.9


def test_time_schedule_follows_slower_steps(tmp_path):
    # 2 s per step: half as many steps in the same budget, and still the floor at its end
    clock = FakeClock(tick=2.0)
    trainer = make_trainer(tmp_path, clock, max_steps=1000, max_minutes=0.1, schedule="cosine",
                           min_learning_rate_ratio=0.0, schedule_clock="time")
    assert trainer.train()["steps"] == 3
    assert [r["learning_rate"] for r in metrics(tmp_path)] == pytest.approx(
        [1e-2 * 0.5 * (1 + math.cos(math.pi * s / 3)) for s in (1, 2, 3)], abs=1e-15)


@pytest.mark.parametrize("budget_clock", ["cpu", "wall"])
def test_budget_clock_cpu_counts_the_process_cpu_time(tmp_path, monkeypatch, budget_clock):
    # the process's CPU clock advances 1 s per step (as on a machine where this run has the core to itself), the wall
    # clock runs at its own pace (a tiny run takes far less than the 6 s budget): only budget_clock=cpu stops at 6 s
    import effigen.training.trainer as trainer_module

    cpu = FakeClock()
    monkeypatch.setattr(trainer_module.time, "process_time", cpu)
    config = dict(max_steps=20, max_minutes=0.1, budget_clock=budget_clock)
    trainer = make_trainer(tmp_path, None, **config)
    trainer.objective.clock = cpu
    summary = trainer.train()
    assert summary["budget_clock"] == budget_clock
    if budget_clock == "cpu":
        assert summary["steps"] == 6 and summary["stopped_early"] and summary["budget_seconds_this_run"] == 6.0
        assert summary["seconds"] < 6.0  # the logged and reported elapsed time stays wall time
    else:
        assert summary["steps"] == 20 and not summary["stopped_early"]


def test_time_schedule_resumes_exactly(tmp_path):
    settings = dict(max_steps=1000, max_minutes=0.1, warmup_steps=2, schedule="cosine", min_learning_rate_ratio=0.1,
                    schedule_clock="time", checkpoint_every=3)
    make_trainer(tmp_path / "straight", FakeClock(), **settings).train()
    with pytest.raises(KeyboardInterrupt):
        killed_at(make_trainer(tmp_path / "resumed", FakeClock(), **settings), 4).train()
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step_0000003"]
    resumed = make_trainer(tmp_path / "resumed", FakeClock(start=1000.0), **settings)  # another clock origin
    summary = resumed.train()
    assert summary["steps"] == 6 and summary["steps_this_run"] == 3 and summary["train_seconds"] == 6.0
    straight_records, resumed_records = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed_records] == [1, 2, 3, 4, 5, 6]  # step 4 was logged before the kill: once
    assert [r["learning_rate"] for r in resumed_records] == [r["learning_rate"] for r in straight_records]
    a = file_bytes(list_checkpoints(tmp_path / "straight")[-1])
    b = file_bytes(list_checkpoints(tmp_path / "resumed")[-1])
    for name in ("generator/model.safetensors", "train_state/model.safetensors"):
        assert a[name] == b[name], name


def test_steps_schedule_ignores_the_clock(tmp_path):
    clock = FakeClock(tick=7.0)  # would exhaust any time schedule; the steps clock does not look at it
    trainer = make_trainer(tmp_path, clock, max_steps=6, warmup_steps=2, schedule="cosine", min_learning_rate_ratio=0.1)
    trainer.train()
    assert [r["learning_rate"] for r in metrics(tmp_path)] == pytest.approx(
        [1e-2 * learning_rate_factor(s, trainer.config) for s in range(1, 7)], rel=1e-12)


def test_time_schedule_needs_a_budget_and_a_time_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="max_minutes"):
        make_trainer(tmp_path, schedule_clock="time", schedule="cosine")
    with pytest.raises(ConfigError, match="max_minutes"):
        make_trainer(tmp_path, max_minutes=0.0)
    # an old (or steps-clock) checkpoint cannot continue under the time clock; it still resumes under steps
    make_trainer(tmp_path, max_steps=2, checkpoint_every=2).train()
    state_file = list_checkpoints(tmp_path)[-1] / "train_state" / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("schedule_clock", "train_seconds", "warmup_seconds"):  # as written before the option existed
        del state[key]
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="schedule_clock"):
        make_trainer(tmp_path, FakeClock(), max_steps=4, max_minutes=1.0, schedule_clock="time").train()
    assert make_trainer(tmp_path, max_steps=4).train()["steps_this_run"] == 2


# ---------------------------------------------------------------------------------------------- non-finite weights

def test_check_finite_names_the_source_and_the_tensors():
    network = nn.Linear(3, 3)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    check_finite(state, "ok.safetensors")
    state["bias"][1] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"model\.safetensors .*NaN or inf.*bias"):
        load_state_dict_strict(network, state, "model.safetensors")
    assert torch.isfinite(network.bias).all()  # nothing was loaded
    assert issubclass(NonFiniteWeightsError, CheckpointError)  # the CLI prints it in one line, exit code 2


def test_resume_refuses_a_checkpoint_with_nan_weights(tmp_path):
    make_trainer(tmp_path, max_steps=2, checkpoint_every=2).train()
    weights = list_checkpoints(tmp_path)[-1] / "train_state" / "model.safetensors"
    name = poison(weights)
    with pytest.raises(CheckpointError, match="NaN") as failure:
        make_trainer(tmp_path, max_steps=4).train()
    assert str(weights) in str(failure.value) and name in str(failure.value)


def test_resume_refuses_nan_ema_weights(tmp_path):
    make_trainer(tmp_path, max_steps=2, checkpoint_every=2).train()
    weights = list_checkpoints(tmp_path)[-1] / "generator" / "model.safetensors"
    poison(weights)
    with pytest.raises(CheckpointError, match="NaN") as failure:
        make_trainer(tmp_path, max_steps=4).train()
    assert str(weights) in str(failure.value)


def test_pipeline_refuses_nan_weights(tmp_path):
    from effigen.training.experiment import build_experiment_dict
    from effigen.pipeline import Pipeline
    from effigen.training.run import build_and_train

    config = build_experiment_dict("smoke", overrides=[f"--trainer.output_dir={tmp_path}", "--trainer.max_steps=1"])
    summary = build_and_train(config, quiet=True)
    weights = Path(summary["pipeline"]) / "generator" / "model.safetensors"
    poison(weights)
    with pytest.raises(CheckpointError, match="NaN") as failure:
        Pipeline.from_pretrained(summary["pipeline"])
    assert str(weights) in str(failure.value)


@pytest.mark.parametrize("where", ["network", "ema"])
def test_no_checkpoint_is_written_with_nan_weights(tmp_path, where):
    trainer = make_trainer(tmp_path, max_steps=2, checkpoint_every=2)
    trainer.train()
    good = list_checkpoints(tmp_path)
    before = {p.name: file_bytes(p) for p in good}
    with torch.no_grad():
        (trainer.network if where == "network" else trainer.ema.network).weight[0, 0] = float("nan")
    trainer.step += 1
    with pytest.raises(NonFiniteWeightsError, match="weight") as failure:
        trainer.save_checkpoint()
    assert f"last good checkpoint is {good[-1]}" in str(failure.value)
    assert list_checkpoints(tmp_path) == good
    assert {p.name: file_bytes(p) for p in good} == before
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


# ---------------------------------------------------------------------------------------------- the run folder

def test_leftovers_of_interrupted_writes_are_cleaned_at_start(tmp_path):
    make_trainer(tmp_path, max_steps=2, checkpoint_every=2).train()
    checkpoints = tmp_path / "checkpoints"
    # a write killed half-way (.tmp), and one killed between its two renames (.old of a folder now missing)
    (checkpoints / ".tmp-step_0000004-0123abcd" / "train_state").mkdir(parents=True)
    (checkpoints / ".tmp-latest-89abcdef").write_text("step_0000004\n")
    os.replace(checkpoints / "step_0000002", checkpoints / ".old-step_0000002-deadbeef")
    (tmp_path / ".tmp-final-00112233").mkdir()
    keep = [checkpoints / "notes.txt", checkpoints / ".tmp-mine", tmp_path / ".tmp-x-NOTHEX12"]
    for path in keep:
        path.write_text("not effigen's")
    summary = make_trainer(tmp_path, max_steps=3).train()
    assert summary["steps_this_run"] == 1  # resumed from the restored step_0000002
    leftovers = sorted(p.name for p in [*checkpoints.iterdir(), *tmp_path.iterdir()] if p.name.startswith((".tmp", ".old")))
    assert leftovers == [".tmp-mine", ".tmp-x-NOTHEX12"]
    assert all(p.read_text() == "not effigen's" for p in keep)


def test_metrics_hold_each_step_once_after_a_resume(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        killed_at(make_trainer(tmp_path, max_steps=8, checkpoint_every=4), 6).train()
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a line torn by the kill
    make_trainer(tmp_path, max_steps=8, checkpoint_every=4).train()
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6, 7, 8]


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import sys; from effigen.io import DirectoryLock; DirectoryLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); sys.stdin.read()")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        trainer = make_trainer(tmp_path, max_steps=2)
        with pytest.raises(RunLockedError, match=f"another effigen run \\(pid {holder.pid}\\) is training into"):
            trainer.train()
        assert trainer.objective.calls == 0 and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # the holder is gone (its lock file stays): the next run trains, and releases the lock when it ends
    assert make_trainer(tmp_path, max_steps=2).train()["steps"] == 2
    other = _hold_lock(tmp_path)  # the lock was released when that run ended
    other.communicate(input="")
    assert other.returncode == 0
    assert issubclass(RunLockedError, CheckpointError)


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    with DirectoryLock(tmp_path):  # e.g. a run-builder that locks before it builds the trainer
        assert make_trainer(tmp_path, max_steps=1).train()["steps"] == 1
    assert make_trainer(tmp_path, max_steps=2).train()["steps"] == 2


@pytest.mark.parametrize("case", ["parent is a file", "output_dir is a file", "checkpoints is a file"])
def test_an_unwritable_output_directory_fails_before_training(tmp_path, case):
    (tmp_path / "file").write_text("x")
    output_dir = {"parent is a file": tmp_path / "file" / "run", "output_dir is a file": tmp_path / "file",
                  "checkpoints is a file": tmp_path / "run"}[case]
    if case == "checkpoints is a file":
        output_dir.mkdir()
        (output_dir / "checkpoints").write_text("x")
    trainer = make_trainer(output_dir, max_steps=2)
    with pytest.raises(OutputDirectoryError, match="cannot write into the") as failure:
        trainer.train()
    message = str(failure.value)
    assert "\n" not in message and str(output_dir) in message and "--trainer.output_dir" in message
    assert trainer.objective.calls == 0  # no step was lost


def test_a_full_disk_mid_run_names_the_cause_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=4, checkpoint_every=2)
    original, calls = trainer_module.save_weights, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the second checkpoint's train_state
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_weights", full_disk)
    with pytest.raises(CheckpointWriteError) as failure:
        trainer.train()
    message = str(failure.value)
    good = tmp_path / "checkpoints" / "step_0000002"
    assert "disk is full" in message and str(tmp_path / "checkpoints" / "step_0000004") in message
    assert f"last good checkpoint is {good}" in message
    assert list_checkpoints(tmp_path) == [good]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    monkeypatch.undo()
    assert make_trainer(tmp_path, max_steps=4, checkpoint_every=2).train()["steps_this_run"] == 2


@pytest.mark.parametrize("content", ["{\"step\": 2, \"images_se", "[]", "{\"batch_size\": 4}"])
def test_a_corrupt_state_json_is_named(tmp_path, content):
    make_trainer(tmp_path, max_steps=2, checkpoint_every=2).train()
    state_file = list_checkpoints(tmp_path)[-1] / "train_state" / "state.json"
    state_file.write_text(content)
    with pytest.raises(CheckpointError, match="corrupt") as failure:
        make_trainer(tmp_path, max_steps=4).train()
    assert str(state_file) in str(failure.value)
