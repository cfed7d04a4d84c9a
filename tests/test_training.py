import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effigen.training.run import build_and_train
from effigen.config import ConfigError
from effigen.training.experiment import build_experiment_dict
from effigen.io import CheckpointError, load_weights
from effigen.training import trainer as trainer_module
from effigen.training.trainer import TrainerConfig, learning_rate_factor, list_checkpoints

from conftest import REPO


def smoke(tmp_path, *overrides):
    return build_experiment_dict("smoke", overrides=[f"--trainer.output_dir={tmp_path}", *overrides])


def test_a_few_steps_lower_the_loss_on_one_batch(tmp_path, monkeypatch):
    # 8 images, batch 8: every step sees the same batch, so the loss must fall.
    config = smoke(tmp_path, "--trainer.max_steps=40", "--trainer.learning_rate=3e-3", "--trainer.log_every=1",
                   "--trainer.checkpoint_every=0", "--trainer.precision=bf16")
    config["data"].update(name="digits", resolution=8)
    config["network"] = {"patch_size": 2}
    import effigen.training.run as train_run

    original = train_run.build_dataset
    monkeypatch.setattr(train_run, "build_dataset", lambda data_config, split="train": _Head(original(data_config, split), 8))
    summary = build_and_train(config, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert summary["steps"] == 40
    assert last < 0.7 * first, (first, last)
    written = json.loads((tmp_path / "summary.json").read_text())  # the run folder records its own summary
    assert written["steps"] == 40 and written["images_seen"] == summary["images_seen"]
    assert written["pipeline"] == str(tmp_path / "final") and written["final_loss"] == pytest.approx(records[-1]["loss"])


class _Head(torch.utils.data.Dataset):
    def __init__(self, dataset, n):
        self.dataset, self.n = dataset, n
        self.num_classes, self.class_names = dataset.num_classes, dataset.class_names

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.dataset[i]


def test_learning_rate_schedule():
    config = TrainerConfig(max_steps=110, warmup_steps=10, schedule="cosine", min_learning_rate_ratio=0.1)
    assert learning_rate_factor(0, config) == pytest.approx(0.1)
    assert learning_rate_factor(9, config) == pytest.approx(1.0)
    assert learning_rate_factor(60, config) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate_factor(110, config) == pytest.approx(0.1)
    assert learning_rate_factor(50, TrainerConfig(schedule="constant")) == 1.0


def _final_state(folder: Path, component: str = "generator"):
    checkpoint = list_checkpoints(folder)[-1]
    return (load_weights(checkpoint / "train_state" / "model.safetensors"),
            load_weights(checkpoint / component / "model.safetensors"),
            torch.load(checkpoint / "train_state" / "optimizer.pt", weights_only=True)["optimizer"])


def test_exact_resume_after_a_kill(tmp_path, monkeypatch):
    settings = ["--trainer.max_steps=8", "--trainer.schedule=cosine", "--trainer.warmup_steps=2",
                "--trainer.checkpoint_every=4", "--trainer.ema_decay=0.9", "--data.horizontal_flip=true"]
    build_and_train(smoke(tmp_path / "straight", *settings), quiet=True)

    original_step = trainer_module.Trainer.train_step

    def killed_after_five(self, batches):
        if self.step == 5:
            raise KeyboardInterrupt("simulated kill")
        return original_step(self, batches)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        build_and_train(smoke(tmp_path / "resumed", *settings), quiet=True)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step_0000004"]
    monkeypatch.setattr(trainer_module.Trainer, "train_step", original_step)
    summary = build_and_train(smoke(tmp_path / "resumed", *settings), quiet=True)
    assert summary["steps_this_run"] == 4

    straight, resumed = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    for a, b in zip(straight[:2], resumed[:2]):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    for key, state in straight[2]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, resumed[2]["state"][key][name])


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    build_and_train(smoke(tmp_path, "--trainer.max_steps=2"), quiet=True)
    good = list_checkpoints(tmp_path)[-1]
    before = load_weights(good / "generator" / "model.safetensors")

    import effigen.training.trainer as t

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(t, "save_weights", crash)  # train_state/ write dies half-way through the folder
    with pytest.raises(CheckpointError, match="simulated") as failure:  # named, with the cause and the good one
        build_and_train(smoke(tmp_path, "--trainer.max_steps=4"), quiet=True)
    assert f"last good checkpoint is {good}" in str(failure.value)
    assert list_checkpoints(tmp_path) == [good]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    after = load_weights(good / "generator" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.undo()
    summary = build_and_train(smoke(tmp_path, "--trainer.max_steps=4"), quiet=True)  # resumes from the good one
    assert summary["steps_this_run"] == 2


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(tmp_path):
    build_and_train(smoke(tmp_path, "--trainer.max_steps=2"), quiet=True)
    checkpoint = list_checkpoints(tmp_path)[-1]
    weights = checkpoint / "train_state" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        build_and_train(smoke(tmp_path, "--trainer.max_steps=4"), quiet=True)
    # another network shape or global batch: the run builder refuses it from config.yaml before loading anything ...
    other = tmp_path / "other"
    build_and_train(smoke(other, "--trainer.max_steps=2"), quiet=True)
    with pytest.raises(ConfigError, match="network.hidden_size: 64 -> 32"):
        build_and_train(smoke(other, "--trainer.max_steps=4", "--network.hidden_size=32"), quiet=True)
    with pytest.raises(ConfigError, match="trainer.batch_size: 8 -> 4"):
        build_and_train(smoke(other, "--trainer.max_steps=4", "--trainer.batch_size=4"), quiet=True)
    # ... and the Trainer itself names the mismatch when its checkpoint does not fit (a run without a config.yaml)
    (other / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="shape mismatches|does not match"):
        build_and_train(smoke(other, "--trainer.max_steps=4", "--network.hidden_size=32"), quiet=True)


def _torchrun(args, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "effigen", "train", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(tmp_path, parallel):
    settings = ["--preset", "smoke", "--trainer.max_steps=3", "--trainer.checkpoint_every=0",
                "--trainer.batch_size=8", "--trainer.device=cpu", f"--trainer.parallel={parallel}"]
    _torchrun([*settings, f"--trainer.output_dir={tmp_path / 'single'}"], 1)
    _torchrun([*settings, f"--trainer.output_dir={tmp_path / 'multi'}"], 2)
    single, multi = _final_state(tmp_path / "single"), _final_state(tmp_path / "multi")
    for a, b in zip(single[:2], multi[:2]):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=1e-5, msg=key)
    start = single[0]["final_layer.linear.weight"]
    assert start.abs().sum() > 0  # training moved the zero-initialised output layer


@pytest.mark.parametrize("preset", ["mnist-dit", "mnist-dit-ddpm", "mnist-sit", "mnist-lightningdit", "shapes-dit"])
def test_every_recipe_trains_and_samples_end_to_end(tmp_path, preset):
    from effigen.pipeline import Pipeline

    config = build_experiment_dict(preset, overrides=[
        f"--trainer.output_dir={tmp_path}", "--trainer.max_steps=2", "--trainer.batch_size=8", "--trainer.progress=false",
        "--trainer.sample_every=0", "--trainer.checkpoint_every=0", "--data.resolution=16", "--network.depth=1",
        "--network.hidden_size=48", "--sampler.num_steps=3", "--data.num_images=64"])
    summary = build_and_train(config, quiet=True)
    images = Pipeline.from_pretrained(summary["pipeline"])([0, 1], seed=0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_tokenizer_and_var_two_processes_equal_one_process(tmp_path):
    """DDP == one process for the token family. The tokenizer is compared with one process that accumulates the same
    two half-batches (its conv biases before GroupNorm get near-zero gradients that Adam turns into +-lr steps, so a
    whole-batch single process differs by rounding); VAR on that tokenizer with one process on the whole batch."""
    tokenizer = ["--preset", "mnist-msvq", "--network_preset=MSVQ-Test", "--network.base_channels=16",
                 "--data.resolution=8", "--trainer.max_steps=4", "--trainer.checkpoint_every=0", "--trainer.batch_size=8",
                 "--trainer.device=cpu", "--trainer.precision=fp32", "--trainer.sample_every=0", "--trainer.warmup_steps=1",
                 "--objective.restart_every=0", "--objective.perceptual_weight=0"]
    _torchrun([*tokenizer, "--trainer.grad_accumulation=2", f"--trainer.output_dir={tmp_path / 'tok1'}"], 1)
    _torchrun([*tokenizer, f"--trainer.output_dir={tmp_path / 'tok2'}"], 2)
    single, multi = _final_state(tmp_path / "tok1", "tokenizer"), _final_state(tmp_path / "tok2", "tokenizer")
    for a, b in zip(single[:2], multi[:2]):
        for key in a:
            if not key.endswith("ema_vocab_hit_SV"):  # usage EMA: updated per micro-batch vs once per step
                torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=1e-5, msg=key)
    var = ["--preset", "mnist-var", f"--tokenizer={tmp_path / 'tok1' / 'final'}", "--network_preset=VAR-Test",
           "--data.resolution=8", "--trainer.max_steps=3", "--trainer.checkpoint_every=0", "--trainer.batch_size=8",
           "--trainer.device=cpu", "--trainer.precision=fp32", "--trainer.sample_every=0", "--trainer.warmup_steps=1"]
    _torchrun([*var, f"--trainer.output_dir={tmp_path / 'var1'}"], 1)
    _torchrun([*var, f"--trainer.output_dir={tmp_path / 'var2'}"], 2)
    single, multi = _final_state(tmp_path / "var1"), _final_state(tmp_path / "var2")
    for a, b in zip(single[:2], multi[:2]):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=1e-5, msg=key)
