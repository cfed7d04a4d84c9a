import json

import pytest

from effigen.config import ConfigError, apply_overrides, config_from_dict, load_config_file, save_config_file
from effigen.data import DataConfig
from effigen.experiment import EXPERIMENT_PRESETS, build_experiment_config, build_experiment_dict, parse_experiment
from effigen.models.dit import DiTConfig
from effigen.training.trainer import TrainerConfig


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as error:
        config_from_dict(DiTConfig, {"detph": 4})
    message = str(error.value)
    assert "'detph'" in message and "depth" in message and "hidden_size" in message


def test_wrong_types_are_rejected_and_lossless_ones_coerced():
    with pytest.raises(ConfigError, match="expected an integer"):
        config_from_dict(DiTConfig, {"depth": "four"})
    with pytest.raises(ConfigError, match="expected true/false"):
        config_from_dict(TrainerConfig, {"compile": "yes"})
    with pytest.raises(ConfigError, match="not one of"):
        config_from_dict(TrainerConfig, {"precision": "fp8"})
    config = config_from_dict(TrainerConfig, {"learning_rate": 1, "betas": [0.9, 0.95], "max_minutes": None})
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.betas == (0.9, 0.95)


def test_overrides_parse_values_by_type():
    data = apply_overrides({"trainer": {"max_steps": 5}}, ["--trainer.max_steps=8", "--trainer.learning_rate=1e-4",
                                                             "--trainer.compile=true", "--network.depth=3"])
    assert data == {"trainer": {"max_steps": 8, "learning_rate": 1e-4, "compile": True}, "network": {"depth": 3}}
    with pytest.raises(ConfigError, match="--section.key=value"):
        apply_overrides({}, ["--trainer.max_steps"])


def test_every_preset_parses(tmp_path):
    for name in EXPERIMENT_PRESETS:
        preset = EXPERIMENT_PRESETS[name]
        if "tokenizer" in preset:  # needs a trained tokenizer: without one, an error that says how to get it
            with pytest.raises(ConfigError, match="train one first"):
                build_experiment_config(preset=name, overrides=[f"--tokenizer={tmp_path / 'none'}"])
            continue
        config = build_experiment_config(preset=name)
        resolution = getattr(config.network, "input_size", None) or config.network.resolution
        assert resolution == config.data.resolution


def test_bad_override_in_experiment_names_section_and_keys():
    with pytest.raises(ConfigError) as error:
        build_experiment_config(preset="smoke", overrides=["--trainer.max_step=3"])
    assert "max_step" in str(error.value) and "max_steps" in str(error.value)
    with pytest.raises(ConfigError, match="unknown section"):
        parse_experiment({"method": "dit-flow", "trainr": {}})
    with pytest.raises(ConfigError, match="unknown method"):
        parse_experiment({"method": "nope"})
    with pytest.raises(ConfigError, match="network_preset"):
        build_experiment_config(preset="smoke", overrides=["--network_preset=DiT-Q/9"])


def test_network_follows_data_and_rejects_contradictions():
    config = build_experiment_config(preset="smoke", overrides=["--data.resolution=24"], num_classes=7)
    assert config.network.input_size == 24 and config.network.num_classes == 7
    with pytest.raises(ConfigError, match="disagrees with the data"):
        build_experiment_config(preset="smoke", overrides=["--network.input_size=64"])
    with pytest.raises(ConfigError, match="multiple of"):
        build_experiment_config(preset="smoke", overrides=["--data.resolution=18"])  # patch 4


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_round_trip(tmp_path, suffix):
    config = build_experiment_config(preset="smoke")
    path = tmp_path / f"experiment{suffix}"
    save_config_file(config, path)
    loaded = parse_experiment(load_config_file(path))
    assert loaded == config
    rebuilt = build_experiment_config(config_file=str(path), overrides=["--trainer.max_steps=9"])
    assert rebuilt.trainer.max_steps == 9 and rebuilt.network == config.network


def test_invalid_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")


def test_cli_reports_config_errors_before_work(run_cli, capsys, tmp_path):
    code, out, err = run_cli(["train", "--preset", "smoke", f"--trainer.output_dir={tmp_path}/run", "--trainer.bogus=1"], capsys)
    assert code == 2 and "bogus" in err and "max_steps" in err
    assert not (tmp_path / "run").exists()  # failed before any work


def test_presets_command_lists_presets(run_cli, capsys):
    code, out, _ = run_cli(["presets"], capsys)
    assert code == 0 and "mnist-dit" in out and "DiT-XL/2" in out
    code, out, _ = run_cli(["presets", "smoke"], capsys)
    assert json.loads(out)["method"] == "dit-flow"
