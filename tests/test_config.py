import json

import pytest

from effigen.config import ConfigError, apply_overrides, config_from_dict, load_config_file, save_config_file
from effigen.data import DataConfig
from effigen.training.experiment import EXPERIMENT_PRESETS, build_experiment_config, build_experiment_dict, parse_experiment
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
        if "init_from" in preset:  # a second stage (mnist-bfm-fra): without the first stage's folder, how to get it
            with pytest.raises(ConfigError, match="run the previous stage first"):
                build_experiment_config(preset=name, overrides=[f"--init_from={tmp_path / 'none'}"])
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


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), ".nan", ".inf"])
def test_non_finite_numbers_are_rejected_naming_the_key(value):
    # NaN used to pass every float setting (a NaN guidance scale sampled black images with exit 0); infinity is
    # refused too: no setting uses it as "no limit" (that is null where a setting allows it)
    from effigen.config import parse_value
    from effigen.objectives.flow_matching import FlowSamplerConfig

    raw = parse_value(value) if isinstance(value, str) else value
    with pytest.raises(ConfigError, match=r"sampler\.cfg_scale: .* is not a finite number"):
        config_from_dict(FlowSamplerConfig, {"cfg_scale": raw}, "sampler")
    with pytest.raises(ConfigError, match=r"trainer\.learning_rate: .* is not a finite number"):
        config_from_dict(TrainerConfig, {"learning_rate": raw}, "trainer")
    with pytest.raises(ConfigError, match=r"trainer\.max_minutes: .* is not a finite number"):  # float | None
        config_from_dict(TrainerConfig, {"max_minutes": raw}, "trainer")
    with pytest.raises(ConfigError, match="not a finite number"):
        build_experiment_config(preset="smoke", overrides=[f"--objective.label_dropout={value}"])
    assert config_from_dict(TrainerConfig, {"max_minutes": None, "learning_rate": 1e300}).learning_rate == 1e300


def test_no_preset_or_default_uses_a_non_finite_number():
    import math

    def walk(value):
        if isinstance(value, float):
            assert math.isfinite(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for name in EXPERIMENT_PRESETS:
        walk(EXPERIMENT_PRESETS[name])


def test_sampler_configs_check_their_ranges():
    from effigen.objectives.ddpm import DDPMSamplerConfig
    from effigen.objectives.flow_matching import FlowSamplerConfig
    from effigen.samplers.hmar import HMARSamplerConfig
    from effigen.samplers.next_scale import NextScaleSamplerConfig
    from effigen.samplers.next_token import NextTokenSamplerConfig

    token_samplers = (NextScaleSamplerConfig, HMARSamplerConfig, NextTokenSamplerConfig)
    bad = [(cls, key, value, valid) for cls in token_samplers for key, value, valid in (
        ("top_k", -1, ">= 0"), ("top_p", 1.5, "<= 1"), ("top_p", -0.1, ">= 0"), ("temperature", -1.0, ">= 0"),
        ("cfg_scale", -0.5, ">= 0"))]
    bad += [(HMARSamplerConfig, "mask_guidance_ratio", -1.0, ">= 0")]
    bad += [(cls, key, value, valid) for cls in (FlowSamplerConfig, DDPMSamplerConfig) for key, value, valid in (
        ("num_steps", 0, ">= 1"), ("num_steps", -3, ">= 1"), ("cfg_scale", -1.0, ">= 0"),
        ("cfg_interval", (0.6, 0.2), "low <= high"), ("cfg_interval", (-0.1, 0.5), "0 <= low"),
        ("cfg_channels", 0, ">= 1"))]
    from effigen.objectives.distilled import DistilledSamplerConfig

    bad += [(DistilledSamplerConfig, "num_steps", 0, ">= 1")]
    bad += [(FlowSamplerConfig, "time_shift", 0.0, "> 0"), (FlowSamplerConfig, "sample_eps", 1.0, "< 1"),
            (FlowSamplerConfig, "last_step", -0.1, ">= 0"), (DDPMSamplerConfig, "eta", 1.5, "<= 1")]
    for cls, key, value, valid in bad:
        with pytest.raises(ValueError, match=f"{key} = .* is out of range: it must be .*{valid}"):
            cls(**{key: value})
        with pytest.raises(ConfigError, match=f"sampler: {key} = "):  # a folder's or an override's value
            config_from_dict(cls, {key: list(value) if isinstance(value, tuple) else value}, "sampler")
    # the edges of the ranges are valid settings
    for cls in token_samplers:
        cls(top_k=0, top_p=0.0, cfg_scale=0.0, temperature=0.0)
        cls(top_k=1, top_p=1.0)
    FlowSamplerConfig(num_steps=1, cfg_scale=0.0, cfg_interval=(0.0, 1.0), cfg_channels=3, sample_eps=0.0, last_step=0.0)
    DDPMSamplerConfig(num_steps=1, eta=1.0, cfg_interval=(0.3, 0.3))
