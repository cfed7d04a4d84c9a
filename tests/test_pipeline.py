import pytest
import torch

from effigen.io import CheckpointError
from effigen.models.dit import DiT
from effigen.objectives.flow_matching import FlowSamplerConfig, RectifiedFlowConfig
from effigen.pipeline import Pipeline

from conftest import randomize


@pytest.fixture
def pipeline(tiny_dit_config):
    network = randomize(DiT(tiny_dit_config))
    return Pipeline("dit-flow", network, RectifiedFlowConfig(), FlowSamplerConfig(solver="heun", num_steps=3, cfg_scale=2.0),
                    {"dataset": "test", "class_names": ["a", "b", "c", "d"]})


def test_save_load_round_trip_gives_identical_samples(pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    assert (tmp_path / "pipe" / "generator" / "model.safetensors").is_file()
    loaded = Pipeline.from_pretrained(tmp_path / "pipe")
    labels = [0, 1, 2, 3, 1]
    a = pipeline(labels, seed=7)
    b = loaded(labels, seed=7)
    assert a.shape == (5, 3, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert loaded.info["class_names"] == ["a", "b", "c", "d"]
    assert loaded.sampler_config == pipeline.sampler_config


def test_same_seed_same_images_any_batch_size_and_generator(pipeline):
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    a = pipeline(labels, seed=3, batch_size=6)
    assert torch.allclose(a, pipeline(labels, seed=3, batch_size=4), atol=1e-5)
    assert torch.equal(a, pipeline(labels, generator=torch.Generator().manual_seed(3), batch_size=6))
    assert not torch.equal(a, pipeline(labels, seed=4, batch_size=6))


def test_sampler_overrides_and_pil_output(pipeline):
    images = pipeline([0, 1], output_type="pil", num_steps=2, solver="euler", cfg_scale=1.0)
    assert len(images) == 2 and images[0].size == (8, 8)
    assert pipeline.number_of_evaluations() == (2 * 3 - 1) * 2
    assert pipeline.number_of_evaluations(solver="euler", cfg_scale=1.0) == 3
    with pytest.raises(Exception, match="unknown sampler setting 'steps'"):
        pipeline([0], steps=4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\]"):
        pipeline([4])


def test_folder_errors(pipeline, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Pipeline.from_pretrained(tmp_path / "nothing")
    pipeline.save_pretrained(tmp_path / "pipe")
    (tmp_path / "pipe" / "generator" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        Pipeline.from_pretrained(tmp_path / "pipe")
    pipeline.save_pretrained(tmp_path / "pipe")  # atomic overwrite of an existing folder
    (tmp_path / "pipe" / "model_index.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Pipeline.from_pretrained(tmp_path / "pipe")


def test_sample_cli_writes_grid_and_folder(pipeline, tmp_path, run_cli, capsys):
    pipeline.save_pretrained(tmp_path / "pipe")
    code, out, err = run_cli(["sample", "--from", tmp_path / "pipe", "--classes", "1,3", "--num", "6", "--seed", "0",
                              "--out", tmp_path / "grid.png"], capsys)
    assert code == 0, err
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)  # 3 per row (one class per row), 8 px + 2 px padding
    code, out, err = run_cli(["sample", "--from", tmp_path / "pipe", "--num", "3", "--out", tmp_path / "pngs"], capsys)
    assert code == 0 and len(list((tmp_path / "pngs").glob("*.png"))) == 3
    code, out, err = run_cli(["sample", "--from", tmp_path / "missing", "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "does not exist" in err
