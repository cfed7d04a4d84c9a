"""Neon (arXiv 2510.03597, effigen.post.neon): the merge formula, the resumable synthetic set, the w/cfg selection
with early stopping, and end-to-end runs on a tiny DiT (through `effigen neon`'s run()) and tiny VAR, HMAR and
raster-AR models with their tokenizer, producing loadable merged folders and sweep tables."""

from __future__ import annotations

import json
import math

import pytest
import torch

from effigen.cli.neon import run as neon_cli
from effigen.cli.sample import run as sample_cli
from effigen.training.run import build_and_train
from effigen.config import ConfigError
from effigen.data import DataConfig, build_dataset
from effigen.training.experiment import build_experiment_dict
from effigen.io import load_weights, read_json
from effigen.models.gpt import GPT, GPT_PRESETS, GPTConfig
from effigen.models.hmar import HMAR, HMAR_PRESETS, HMARConfig
from effigen.models.var import VAR, VAR_PRESETS, VARConfig
from effigen.objectives.hmar import HMARObjectiveConfig
from effigen.objectives.next_scale import NextScaleConfig
from effigen.objectives.next_token import NextTokenConfig
from effigen.objectives.vq_tokenizer import MSVQ_PRESETS
from effigen.pipeline import Pipeline
from effigen.post import neon
from effigen.post.neon import NeonConfig, generate_synthetic_set, merge_state_dicts, run_neon
from effigen.samplers.hmar import HMARSamplerConfig
from effigen.samplers.next_scale import NextScaleSamplerConfig
from effigen.samplers.next_token import NextTokenSamplerConfig
from effigen.tokenizers.msvq import MultiScaleVQ, MultiScaleVQConfig

from conftest import randomize


@pytest.fixture(autouse=True)
def reference_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFIGEN_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------- merge
def test_merge_is_base_plus_w_times_base_minus_finetuned_and_keeps_base_where_not_finite():
    inf, nan = math.inf, math.nan
    base = {"a": torch.tensor([1.0, 2.0, inf, -inf, 3.0]), "b": torch.tensor([[1.0, -2.0], [3.0, 4.0]]),
            "steps": torch.tensor([5, 6]), "mask": torch.tensor([True, False]), "only_base": torch.tensor([7.0]),
            "half": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    tuned = {"a": torch.tensor([0.0, 4.0, 0.0, 1.0, nan]), "b": torch.tensor([[0.0, nan], [3.0, 2.0]]),
             "steps": torch.tensor([9, 9]), "mask": torch.tensor([False, True]),
             "half": torch.tensor([0.0, 2.0], dtype=torch.bfloat16)}
    stats = {}
    merged = merge_state_dicts(base, tuned, 0.5, stats=stats)
    assert torch.equal(merged["a"], torch.tensor([1.5, 1.0, inf, -inf, 3.0]))  # inf and nan entries keep the base
    assert torch.equal(merged["b"], torch.tensor([[1.5, -2.0], [3.0, 5.0]]))
    assert torch.equal(merged["steps"], base["steps"]) and merged["steps"].dtype == torch.int64  # non-float: base
    assert torch.equal(merged["mask"], base["mask"])
    assert torch.equal(merged["only_base"], base["only_base"])  # missing from the fine-tune: base
    assert merged["half"].dtype == torch.bfloat16 and torch.equal(merged["half"].float(), torch.tensor([1.5, 2.0]))
    assert stats == {"merged": 3, "copied": 3, "nonfinite_kept": 4}
    # w = -1 is the fine-tuned model itself wherever that is finite
    back = merge_state_dicts(base, tuned, -1.0)
    assert torch.equal(back["a"], torch.tensor([0.0, 4.0, inf, -inf, 3.0]))
    # without the skip the non-finite values propagate
    assert torch.isnan(merge_state_dicts(base, tuned, 0.5, skip_nonfinite=False)["a"][4])
    with pytest.raises(ValueError, match="same network"):
        merge_state_dicts({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, 1.0)


def test_w0_returns_the_base_weights_exactly():
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 5, generator=generator), "z": torch.tensor([-0.0, 0.0, 1e-30]),
            "h": torch.randn(3, generator=generator).to(torch.bfloat16), "inf": torch.tensor([-math.inf])}
    tuned = {k: (v.float() + 1).to(v.dtype) for k, v in base.items()}
    merged = merge_state_dicts(base, tuned, 0.0)
    for key, value in base.items():
        assert merged[key].dtype == value.dtype and torch.equal(merged[key], value)
        assert torch.equal(merged[key].signbit(), value.signbit())  # -0.0 stays -0.0
        assert merged[key].data_ptr() != value.data_ptr()  # a copy: changing it leaves the base alone


# ------------------------------------------------------------------------------------------------- tiny models
def tiny_token_folder(path, method: str = "var", seed: int = 0) -> Pipeline:
    """A tiny token generator on digits at 8 px with its (untrained) VQ tokenizer, saved as a pipeline folder."""
    torch.manual_seed(seed)
    scales = (4,) if method == "raster-ar" else (1, 2, 4)
    tokenizer = MultiScaleVQ(MultiScaleVQConfig(**{**MSVQ_PRESETS["MSVQ-Test"], "scales": scales, "resolution": 8,
                                                   "share_quant_resi": 1 if method == "raster-ar" else 2})).eval()
    shapes = dict(num_classes=10, vocab_size=32, latent_channels=4, scales=scales)
    sampler = dict(cfg_scale=1.5, top_k=0, top_p=0.0)
    if method == "var":
        network, objective = VAR(VARConfig(**VAR_PRESETS["VAR-Test"], **shapes)), NextScaleConfig()
        sampler = NextScaleSamplerConfig(**sampler)
    elif method == "hmar":
        network, objective = HMAR(HMARConfig(**HMAR_PRESETS["HMAR-Test"], **shapes)), HMARObjectiveConfig()
        sampler = HMARSamplerConfig(**sampler, mask_schedule="off")
    else:
        shapes.pop("latent_channels")  # the GPT sees token ids only
        network, objective = GPT(GPTConfig(**GPT_PRESETS["GPT-Test"], **shapes)), NextTokenConfig()
        sampler = NextTokenSamplerConfig(**sampler)
    network = randomize(network, seed, std=0.05).eval()
    pipeline = Pipeline(method, network, objective, sampler,
                        {"dataset": "digits", "resolution": 8, "class_names": [str(i) for i in range(10)]}, tokenizer)
    pipeline.save_pretrained(path)
    return pipeline


def test_synthetic_set_is_class_balanced_seeded_and_resumes_a_missing_chunk(tmp_path):
    pipeline = tiny_token_folder(tmp_path / "var")
    root = tmp_path / "synthetic"
    record = generate_synthetic_set(pipeline, root, 24, seed=3, chunk_size=8, progress=False)
    assert record["complete"] and record["images_generated_this_run"] == 24
    dataset = build_dataset(DataConfig(name="folder", root=str(root), resolution=8, holdout_fraction=0.0))
    assert dataset.num_classes == 10 and len(dataset) == 24
    assert torch.bincount(dataset.labels).tolist() == [3, 3, 3, 3, 2, 2, 2, 2, 2, 2]
    # image i has label i % 10 and sits in that class's folder (zero-padded names keep the label order)
    assert (root / "00007" / "0000017.png").is_file()
    images = {p.name: p.read_bytes() for p in root.rglob("*.png")}
    # a killed run: one chunk incomplete -> only that chunk is drawn again, identically
    (root / "00001" / "0000011.png").unlink()
    record_file = root / "neon_synthetic.json"
    record_file.write_text(json.dumps({**read_json(record_file), "complete": False}))
    again = generate_synthetic_set(pipeline, root, 24, seed=3, chunk_size=8, progress=False)
    assert again["images_generated_this_run"] == 8
    assert {p.name: p.read_bytes() for p in root.rglob("*.png")} == images
    # complete: nothing is drawn; other settings: an error, never a mixed set
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    generate_synthetic_set(pipeline, root, 24, seed=3, chunk_size=8, progress=False)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == before
    with pytest.raises(ConfigError, match="other settings"):
        generate_synthetic_set(pipeline, root, 24, seed=4, chunk_size=8, progress=False)


def test_sweep_picks_the_lowest_fid_stops_early_and_reuses_scored_rows(tmp_path, monkeypatch):
    pipeline = tiny_token_folder(tmp_path / "var")
    base = {k: v.clone() for k, v in pipeline.generator.state_dict().items()}
    tuned = {k: v + 0.01 if v.is_floating_point() else v for k, v in base.items()}
    fids = {(1.5, 0.0): 10.0, (1.5, 0.5): 9.0, (1.5, 1.0): 9.5, (1.5, 2.0): 12.0, (1.5, 3.0): 1.0,
            (3.0, 0.0): 8.0, (3.0, 0.5): 8.5, (3.0, 1.0): 7.0, (3.0, 2.0): 7.5, (3.0, 3.0): 7.8}
    calls = []

    def fake_score(pipe, extractor, reference_feats, num, seed, precision, batch_size, cfg_scale):
        head = pipe.generator.state_dict()["head.weight"]
        w = next(w for w in (0.0, 0.5, 1.0, 2.0, 3.0)
                 if torch.equal(head, merge_state_dicts(base, tuned, w)["head.weight"]))
        calls.append((cfg_scale, w))
        return {"fid": fids[(cfg_scale, w)], "precision": 0.5, "recall": 0.5}

    monkeypatch.setattr(neon, "score", fake_score)
    config = NeonConfig(weights=(0.5, 1.0, 2.0, 3.0), cfg_scales=(1.5, 3.0), early_stop=1.0, eval_samples=10,
                        progress=False)
    result = neon.sweep(pipeline, base, tuned, config, tmp_path / "sweep.json", {"x": 1})
    # cfg 1.5 stops at w = 2 (12 > 9 + 1) and never sees w = 3; cfg 3 runs to the end
    assert calls == [(1.5, 0.0), (1.5, 0.5), (1.5, 1.0), (1.5, 2.0), (3.0, 0.0), (3.0, 0.5), (3.0, 1.0), (3.0, 2.0),
                     (3.0, 3.0)]
    assert (result["best"]["cfg_scale"], result["best"]["w"]) == (3.0, 1.0)
    assert result["base_saved_cfg"]["fid"] == 10.0 and result["base_best"]["cfg_scale"] == 3.0
    assert all(torch.equal(pipeline.generator.state_dict()[k], v) for k, v in base.items())  # the base is restored
    assert "| 3.0 | 1 | 7.000 **best** |" in neon.markdown_table(result)
    calls.clear()
    again = neon.sweep(pipeline, base, tuned, config, tmp_path / "sweep.json", {"x": 1})
    assert calls == [] and again["rows"] == result["rows"]
    with pytest.raises(ConfigError, match="other settings"):
        neon.sweep(pipeline, base, tuned, config, tmp_path / "sweep.json", {"x": 2})


# ------------------------------------------------------------------------------------------------- end to end
def test_neon_cli_on_a_tiny_dit_writes_a_loadable_merged_folder_and_resumes(tmp_path, capsys):
    smoke = build_experiment_dict("smoke", overrides=[f"--trainer.output_dir={tmp_path / 'smoke'}"])
    base = build_and_train(smoke, quiet=True)["pipeline"]
    base_weights = load_weights(f"{base}/generator/model.safetensors")
    out = tmp_path / "neon"
    args = ["--from", base, "--out", str(out), "--num-synthetic", "32", "--finetune-steps", "2", "--batch-size", "8",
            "--lr", "1e-3", "--w", "0.5,1", "--cfg-scales", "1.5,3", "--eval-samples", "20", "--precision", "fp32",
            "--quiet", "--trainer.grad_clip=0.5"]
    assert neon_cli(args) == 0
    assert "neon: best w" in capsys.readouterr().out
    # 1. the synthetic set: 32 images, 10 classes, as a folder dataset
    assert len(list((out / "synthetic").rglob("*.png"))) == 32
    assert len([p for p in (out / "synthetic").iterdir() if p.is_dir()]) == 10
    # 2. the fine-tune ran through the trainer from the base weights, with the extra override
    run_config = (out / "finetune" / "config.yaml").read_text()
    assert f"init_from: {base}" in run_config and "grad_clip: 0.5" in run_config and "name: folder" in run_config
    assert read_json(out / "finetune" / "checkpoints" / "step_0000002" / "train_state" / "state.json")["step"] == 2
    tuned = load_weights(out / "finetune" / "final" / "generator" / "model.safetensors")
    moved = max((tuned[k] - base_weights[k]).abs().max().item() for k in base_weights)
    assert 0 < moved < 1e-2  # two small steps away from the base, not from a fresh initialisation
    # 3-4. the sweep table and the merged folder at its best row
    table = read_json(out / "sweep.json")
    assert sorted((r["cfg_scale"], r["w"]) for r in table["rows"]) == [(c, w) for c in (1.5, 3.0) for w in (0, 0.5, 1)]
    assert all(math.isfinite(r["fid"]) for r in table["rows"])
    best = min(table["rows"], key=lambda r: r["fid"])
    assert (table["best"]["cfg_scale"], table["best"]["w"]) == (best["cfg_scale"], best["w"])
    assert (out / "sweep.md").read_text().count("\n") == 2 + 6
    merged = Pipeline.from_pretrained(out / "final")
    assert merged.sampler_config.cfg_scale == best["cfg_scale"] and merged.info["neon"]["w"] == best["w"]
    expected = merge_state_dicts(base_weights, tuned, best["w"])
    assert all(torch.equal(merged.generator.state_dict()[k], expected[k]) for k in expected)
    assert all(torch.equal(load_weights(f"{base}/generator/model.safetensors")[k], v) for k, v in base_weights.items())
    assert sample_cli(["--from", str(out / "final"), "--num", "4", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
    summary = read_json(out / "neon.json")
    assert summary["cost"]["finetune_images"] == 16 and summary["cost"]["synthetic_images"] == 32
    # rerun: nothing is generated, trained or scored again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "synthetic").rglob("*.png")}
    metrics = (out / "finetune" / "metrics.jsonl").read_text()
    assert neon_cli(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "synthetic").rglob("*.png")} == stamps
    assert (out / "finetune" / "metrics.jsonl").read_text() == metrics
    assert read_json(out / "sweep.json")["rows"] == table["rows"]
    with pytest.raises(ConfigError, match="other settings"):
        neon_cli([a if a != "32" else "40" for a in args])


@pytest.mark.parametrize("method", ["var", "hmar", "raster-ar"])
def test_neon_on_token_models_uses_the_folders_tokenizer(tmp_path, method):
    base = tmp_path / method
    network_class = type(tiny_token_folder(base, method).generator)
    out = tmp_path / "neon"
    summary = run_neon(base, out, NeonConfig(num_synthetic=20, finetune_steps=2, batch_size=4, learning_rate=1e-3,
                                             weights=(1.0,), eval_samples=20, precision="fp32", progress=False))
    assert f"tokenizer: {base}" in (out / "finetune" / "config.yaml").read_text()
    rows = read_json(out / "sweep.json")["rows"]
    assert [(r["cfg_scale"], r["w"]) for r in rows] == [(1.5, 0.0), (1.5, 1.0)]
    merged = Pipeline.from_pretrained(out / "final")
    assert merged.method.name == method and isinstance(merged.generator, network_class)
    assert isinstance(merged.tokenizer, MultiScaleVQ)
    ours, theirs = load_weights(out / "final" / "tokenizer" / "model.safetensors"), load_weights(
        base / "tokenizer" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    base_state = load_weights(base / "generator" / "model.safetensors")
    tuned = load_weights(out / "finetune" / "final" / "generator" / "model.safetensors")
    assert any(not torch.equal(base_state[k], tuned[k]) for k in base_state)
    expected = merge_state_dicts(base_state, tuned, summary["w"])
    assert all(torch.equal(merged.generator.state_dict()[k], expected[k]) for k in expected)
    images = merged([0, 9], seed=0)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
