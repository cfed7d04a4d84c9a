"""Pipeline folders name any number of components, rebuilt by class name through one table; folders written before
named components (commit e1f2641, tests/fixtures/legacy-e1f2641) load and sample exactly as they did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from effigen.io import CheckpointError
from effigen.models.dit import DIT_PRESETS, DiT, DiTConfig
from effigen.pipeline import Pipeline
from effigen.registry import COMPONENTS, Method, build_objective, get_method, register_method
from effigen.tokenizers.kl_vae import KLVAE

LEGACY = Path(__file__).parent / "fixtures" / "legacy-e1f2641"


@pytest.mark.parametrize("name", ["dit-flow", "dit-flow-latent", "var"])
def test_folders_written_before_named_components_sample_as_they_did(name):
    expected = load_file(str(LEGACY / "expected.safetensors"))[name]
    pipeline = Pipeline.from_pretrained(LEGACY / name)
    torch.testing.assert_close(pipeline([1, 7], seed=0), expected, rtol=1e-5, atol=1e-6)  # thread-count rounding only


def test_legacy_tokenizer_folder_reconstructs_as_it_did():
    pipeline = Pipeline.from_pretrained(LEGACY / "msvq")
    assert pipeline.generator is None and set(pipeline.components) == {"tokenizer"}
    images = torch.linspace(-1, 1, 2 * 3 * 8 * 8).view(2, 3, 8, 8)
    torch.testing.assert_close(pipeline.tokenizer.reconstruct(images), load_file(str(LEGACY / "expected.safetensors"))["msvq"],
                               rtol=1e-5, atol=1e-6)


def _tiny_dit(**overrides) -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(**{**DIT_PRESETS["DiT-Test"], "depth": 1, "hidden_size": 32, "input_size": 16,
                            "num_classes": 10, **overrides}))


def test_any_number_of_named_components_round_trip(tmp_path):
    method = get_method("dit-flow")
    objective = method.objective_class.config_class()
    sampler = method.objective_class.sampler_config_class(num_steps=2)
    guidance = _tiny_dit(hidden_size=16)
    teacher = _tiny_dit()
    pipeline = Pipeline("dit-flow", _tiny_dit(), objective, sampler, {"class_names": list("0123456789")},
                        components={"guidance_model": guidance, "teacher": teacher})
    pipeline.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["components"] == {"generator": "DiT", "tokenizer": None, "guidance_model": "DiT", "teacher": "DiT"}
    for name in ("generator", "guidance_model", "teacher"):
        assert (tmp_path / "p" / name / "config.json").is_file() and (tmp_path / "p" / name / "model.safetensors").is_file()
    loaded = Pipeline.from_pretrained(tmp_path / "p")
    assert set(loaded.components) == {"generator", "guidance_model", "teacher"}
    assert loaded.components["guidance_model"].config.hidden_size == 16
    for key, value in guidance.state_dict().items():
        assert torch.equal(loaded.components["guidance_model"].state_dict()[key], value)
    assert torch.equal(loaded([3], seed=1), pipeline([3], seed=1))


def test_objectives_receive_the_components_they_name():
    seen = {}

    class NeedsGuide:
        config_class = sampler_config_class = dict
        extra_components = ("guidance_model",)

        def __init__(self, config, num_classes, guidance_model=None):
            seen["guidance_model"] = guidance_model

    guide = _tiny_dit()
    build_objective(Method("x", DiT, NeedsGuide, {}, "test"), {}, 10, components={"guidance_model": guide})
    assert seen["guidance_model"] is guide


def test_bad_component_names_and_classes_are_named_errors(tmp_path):
    method = get_method("dit-flow")
    args = (method.objective_class.config_class(), method.objective_class.sampler_config_class())
    with pytest.raises(ValueError, match="component name '../x'"):
        Pipeline("dit-flow", _tiny_dit(), *args, components={"../x": _tiny_dit()})
    with pytest.raises(ValueError, match="train_state"):
        Pipeline("dit-flow", _tiny_dit(), *args, components={"train_state": _tiny_dit()})
    folder = tmp_path / "p"
    shutil.copytree(LEGACY / "dit-flow", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["components"]["teacher"] = "NoSuchNet"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="component 'teacher'.*unknown component class 'NoSuchNet'"):
        Pipeline.from_pretrained(folder)
    index["components"]["teacher"] = "DiT"  # listed but its subfolder is missing
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="teacher/config.json is missing"):
        Pipeline.from_pretrained(folder)
    index["components"] = {"generator": "KLVAE"}  # a generator of the wrong class for the method
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="generates with a DiT, the folder's generator is a KLVAE"):
        Pipeline.from_pretrained(folder)


def test_registered_methods_and_components_join_the_tables():
    class Widget(torch.nn.Module):
        config_class = dict

    try:
        method = register_method(Method("widget-test", Widget, object, {}, "a test"))
        assert get_method("widget-test") is method and COMPONENTS["Widget"] is Widget
        with pytest.raises(ValueError, match="already registered"):
            register_method(Method("widget-test", Widget, object, {"x": 1}, "another"))
    finally:
        from effigen import registry

        registry.METHODS.pop("widget-test", None)
        registry.COMPONENTS.pop("Widget", None)
    assert COMPONENTS["KLVAE"] is KLVAE and COMPONENTS["DiT"] is DiT


def test_init_from_accepts_a_post_training_wrapper_of_its_base_methods():
    from effigen.config import ConfigError
    from effigen.training.experiment import check_init_from

    class QuantizedDiT(torch.nn.Module):  # a wrapper network of another class than the folder's generator
        config_class = dict

    wrapper = Method("quantized-test", QuantizedDiT, object, {}, "a test", base_methods=("dit-flow", "dit-ddpm"))
    assert check_init_from(str(LEGACY / "dit-flow"), wrapper)["method"] == "dit-flow"
    with pytest.raises(ConfigError, match="holds a VAR generator .method var.; method quantized-test starts from a "
                                          "QuantizedDiT or a folder of dit-flow, dit-ddpm"):
        check_init_from(str(LEGACY / "var"), wrapper)
    plain = Method("plain-test", QuantizedDiT, object, {}, "a test")
    with pytest.raises(ConfigError, match="starts from a QuantizedDiT$"):
        check_init_from(str(LEGACY / "dit-flow"), plain)


def test_pipeline_calls_check_their_sizes():
    pipeline = Pipeline.from_pretrained(LEGACY / "dit-flow")
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            pipeline([1], batch_size=bad)
    var = Pipeline.from_pretrained(LEGACY / "var")
    with pytest.raises(ValueError, match="at least one image"):
        var.edit(torch.zeros(0, 3, 8, 8), torch.zeros(1, 1, 8, 8))
