"""Resuming a run with changed settings (`effigen.training.resume`): safe changes are allowed and reported, every
other difference is refused with the full list and the way out, and the stored config is read only from a run that
holds checkpoints."""

import copy

import pytest
import yaml

from effigen.config import ConfigError
from effigen.training.experiment import build_experiment_dict, parse_experiment
from effigen.training.resume import (
    SAFE_KEYS, ResumeConfigError, check_resume_compatible, read_stored_config,
)


@pytest.fixture(scope="module")
def stored():
    """A run's config.yaml as `effigen train` writes it: `config.to_dict()` through YAML."""
    config = parse_experiment(build_experiment_dict("smoke", overrides=["--trainer.output_dir=runs/a"]))
    return yaml.safe_load(yaml.safe_dump(config.to_dict(), sort_keys=False))


def changed(config: dict, **settings) -> dict:
    """A copy with `section__key=value` settings changed (or added)."""
    out = copy.deepcopy(config)
    for name, value in settings.items():
        section, key = name.split("__")
        if key:
            out.setdefault(section, {})[key] = value
        else:
            out[section] = value
    return out


def test_the_same_settings_resume_silently(stored):
    new = parse_experiment(build_experiment_dict("smoke", overrides=["--trainer.output_dir=runs/a"])).to_dict()
    assert check_resume_compatible(stored, new) == []
    new["trainer"]["betas"] = tuple(new["trainer"]["betas"])  # as a dataclass holds it; YAML gives a list back
    assert check_resume_compatible(stored, new) == []


def test_safe_changes_are_allowed_and_reported(stored):
    new = changed(stored, trainer__max_steps=8, trainer__max_minutes=30.0, trainer__log_every=5, trainer__sample_every=2,
                  trainer__checkpoint_every=3, trainer__keep_checkpoints=5, trainer__progress=True,
                  trainer__tensorboard=True, trainer__num_workers=2, trainer__device="cpu",
                  trainer__output_dir="./runs/a", trainer__resume=True, sampler__num_steps=50, sampler__cfg_scale=4.0)
    report = check_resume_compatible(stored, new)
    assert "trainer.max_steps: 4 -> 8" in report
    assert "trainer.max_minutes: null -> 30.0" in report
    assert "sampler.num_steps: 4 -> 50" in report and "sampler.cfg_scale: 1.5 -> 4.0" in report
    assert "trainer.output_dir: runs/a -> ./runs/a" in report
    assert len(report) == 13  # resume was already true: not a change
    assert {line.split(":")[0] for line in report} <= SAFE_KEYS | {"sampler.num_steps", "sampler.cfg_scale"}


@pytest.mark.parametrize("section, key, value, line", [
    ("trainer", "learning_rate", 0.002, "trainer.learning_rate: 0.001 -> 0.002"),
    ("objective", "prediction", "data", "objective.prediction: velocity -> data"),
    ("trainer", "seed", 1, "trainer.seed: 0 -> 1"),
    ("network", "hidden_size", 32, "network.hidden_size: 64 -> 32"),
    ("data", "name", "digits", "data.name: mnist -> digits"),
    ("trainer", "batch_size", 16, "trainer.batch_size: 8 -> 16"),
    ("trainer", "schedule", "cosine", "trainer.schedule: constant -> cosine"),
    ("trainer", "precision", "bf16", "trainer.precision: fp32 -> bf16"),
    ("method", "", "dit-ddpm", "method: dit-flow -> dit-ddpm"),
    ("tokenizer", "", "runs/vae/final", "tokenizer: null -> runs/vae/final"),
    ("init_from", "", "runs/base/final", "init_from: null -> runs/base/final"),
])
def test_each_training_setting_is_refused(stored, section, key, value, line):
    with pytest.raises(ResumeConfigError) as failure:
        check_resume_compatible(stored, changed(stored, **{f"{section}__{key}": value}), where="runs/a")
    message = str(failure.value)
    assert f"\n  {line}\n" in message
    assert "cannot resume the run in runs/a" in message and "new --trainer.output_dir" in message
    assert "runs/a/checkpoints" in message  # the other way out: restart it from step 0


def test_every_difference_is_listed_at_once_and_safe_ones_do_not_hide_them(stored):
    new = changed(stored, trainer__learning_rate=0.002, objective__prediction="data", network__depth=3,
                  trainer__max_steps=100)
    with pytest.raises(ConfigError) as failure:  # a ConfigError: the CLI prints it in one go and exits 2
        check_resume_compatible(stored, new)
    listed = [line.strip() for line in str(failure.value).splitlines() if line.startswith("  ")]
    assert listed == ["network.depth: 2 -> 3", "objective.prediction: velocity -> data",
                      "trainer.learning_rate: 0.001 -> 0.002"]


def test_keys_added_or_removed_are_differences(stored):
    with pytest.raises(ResumeConfigError, match=r"objective.new_option: \(not set\) -> 3"):
        check_resume_compatible(stored, changed(stored, objective__new_option=3))
    without = copy.deepcopy(stored)
    del without["objective"]["label_dropout"]
    with pytest.raises(ResumeConfigError, match=r"objective.label_dropout: 0.1 -> \(not set\)"):
        check_resume_compatible(stored, without)
    # an optional setting absent on one side and null on the other is the same
    assert check_resume_compatible(changed(stored, objective__extra=None), stored) == []


def test_trainer_options_added_since_the_run_compare_as_their_defaults(stored):
    older = copy.deepcopy(stored)
    del older["trainer"]["schedule_clock"]  # a config.yaml written before the option existed
    assert check_resume_compatible(older, stored) == []
    with pytest.raises(ResumeConfigError, match="trainer.schedule_clock: steps -> time"):
        check_resume_compatible(older, changed(stored, trainer__schedule_clock="time", trainer__max_minutes=1.0))


def test_numbers_compare_by_value_and_booleans_by_type(stored):
    assert check_resume_compatible(changed(stored, trainer__learning_rate=1), changed(stored, trainer__learning_rate=1.0)) == []
    with pytest.raises(ResumeConfigError, match="network.qk_norm: false -> 0"):
        check_resume_compatible(stored, changed(stored, network__qk_norm=0))


# ---------------------------------------------------------------------------------------------- the stored config

def _run_folder(tmp_path, config: dict, checkpoint: bool = True):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if checkpoint:
        (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)
    return tmp_path


def test_read_stored_config_only_when_the_run_holds_checkpoints(tmp_path, stored):
    assert read_stored_config(tmp_path / "absent") is None
    folder = _run_folder(tmp_path, stored, checkpoint=False)
    assert read_stored_config(folder) is None  # never checkpointed: may restart with any settings
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / ".tmp-step_0000002-0123abcd").mkdir()  # an interrupted write is not a checkpoint
    assert read_stored_config(folder) is None
    (folder / "checkpoints" / "step_0000002").mkdir()
    assert read_stored_config(folder) == stored
    (folder / "config.yaml").unlink()  # a Trainer run outside `effigen train`: nothing to compare with
    assert read_stored_config(folder) is None


@pytest.mark.parametrize("text", ["method: [unclosed\n", "- a list\n- of things\n", "just text\n", "\xff\xfe"])
def test_a_corrupt_config_yaml_is_named(tmp_path, stored, text):
    folder = _run_folder(tmp_path, stored)
    (folder / "config.yaml").write_bytes(text.encode("latin-1"))
    with pytest.raises(ResumeConfigError, match="corrupt") as failure:
        read_stored_config(folder)
    message = str(failure.value)
    assert str(folder / "config.yaml") in message and "new --trainer.output_dir" in message
    assert "\n" not in message


def test_the_config_yaml_of_a_real_run(tmp_path):
    from effigen.training.run import build_and_train

    overrides = [f"--trainer.output_dir={tmp_path}", "--trainer.max_steps=2", "--trainer.checkpoint_every=2"]
    build_and_train(build_experiment_dict("smoke", overrides=overrides), quiet=True)
    stored = read_stored_config(tmp_path)

    def new(*more):
        return parse_experiment(build_experiment_dict("smoke", overrides=[*overrides, *more])).to_dict()

    assert check_resume_compatible(stored, new()) == []
    assert check_resume_compatible(stored, new("--trainer.max_steps=4")) == ["trainer.max_steps: 2 -> 4"]
    with pytest.raises(ResumeConfigError, match="objective.prediction: velocity -> data"):
        check_resume_compatible(stored, new("--objective.prediction=data"), where=tmp_path)


def test_effigen_train_refuses_changed_settings_before_writing_anything(tmp_path, capsys):
    """The run builder checks a resumed run's settings, and holds the run folder's lock, before it writes config.yaml."""
    from effigen.cli.main import main
    from effigen.io import DirectoryLock

    common = ["--preset", "smoke", f"--trainer.output_dir={tmp_path}", "--trainer.checkpoint_every=2"]
    assert main(["train", *common, "--trainer.max_steps=2"]) == 0
    written = (tmp_path / "config.yaml").read_text()
    for change, shown in (("--trainer.learning_rate=0.002", "trainer.learning_rate: 0.001 -> 0.002"),
                          ("--objective.prediction=data", "objective.prediction: velocity -> data"),
                          ("--trainer.seed=1", "trainer.seed: 0 -> 1"),
                          ("--network.hidden_size=32", "network.hidden_size: 64 -> 32")):
        capsys.readouterr()
        assert main(["train", *common, "--trainer.max_steps=2", change]) == 2
        assert shown in capsys.readouterr().err
        assert (tmp_path / "config.yaml").read_text() == written  # nothing was overwritten
    # more steps is a safe change: the run resumes and says what changed
    assert main(["train", *common, "--trainer.max_steps=4"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {tmp_path} with trainer.max_steps: 2 -> 4" in out and "resumed from" in out
    assert "max_steps: 4" in (tmp_path / "config.yaml").read_text()


def test_a_second_run_into_a_locked_folder_is_refused_before_it_writes(tmp_path, capsys):
    import subprocess
    import sys
    import textwrap

    from effigen.cli.main import main

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from effigen.io import DirectoryLock
        with DirectoryLock({str(tmp_path)!r}):
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", "--preset", "smoke", f"--trainer.output_dir={tmp_path}"]) == 2
        assert f"another effigen run (pid {holder.pid}) is training into {tmp_path}" in capsys.readouterr().err
        assert not (tmp_path / "config.yaml").exists()
    finally:
        holder.communicate("")
