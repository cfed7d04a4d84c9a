"""VAR next-scale prediction: the KV-cached sampler against the teacher-forced pass, guidance, the block-causal
mask, token sampling utilities, zero-shot editing (EditSpec, Pipeline.edit, `effigen edit`), training end to end
on a tiny trained tokenizer, and the official-checkpoint converter on non-official sizes. Parity with the
official code itself is tests/parity/test_var_parity.py."""

from __future__ import annotations

import json

import pytest
import torch

from effigen.training.run import build_and_train
from effigen.config import ConfigError
from effigen.convert.var_official import convert_var_official
from effigen.training.experiment import build_experiment_dict, parse_experiment
from effigen.io import CheckpointError, load_weights
from effigen.models.var import VAR, VAR_PRESETS, VARConfig, block_causal_mask
from effigen.objectives.next_scale import NextScaleConfig, NextScalePrediction
from effigen.objectives.vq_tokenizer import MSVQ_PRESETS
from effigen.pipeline import Pipeline
from effigen.samplers.next_scale import EditSpec, NextScaleSamplerConfig, sample_next_scale
from effigen.samplers.tokens import (SampleNoise, filter_logits, guidance_weight, guided_logits, sample_tokens)
from effigen.tokenizers.msvq import MultiScaleVQ, MultiScaleVQConfig

from conftest import randomize

SCALES = (1, 2, 4)
SPLIT = [1, 4, 16]


def tiny_models(seed: int = 0) -> tuple[MultiScaleVQ, VAR]:
    torch.manual_seed(seed)
    tokenizer = MultiScaleVQ(MultiScaleVQConfig(**MSVQ_PRESETS["MSVQ-Test"], resolution=8)).eval()
    config = VARConfig(**VAR_PRESETS["VAR-Test"], num_classes=4, vocab_size=32, latent_channels=4, scales=SCALES)
    network = randomize(VAR(config), seed, std=0.05).eval()  # non-zero adaLN gates, non-flat logits
    return tokenizer, network


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def greedy(cfg: float = 1.0, **overrides) -> NextScaleSamplerConfig:
    return NextScaleSamplerConfig(**{"cfg_scale": cfg, "top_k": 1, "top_p": 0.0, **overrides})


def record_logits(monkeypatch, network) -> list[torch.Tensor]:
    records, original = [], network.logits

    def logits(h, cond):
        out = original(h, cond)
        records.append(out.detach().clone())
        return out

    monkeypatch.setattr(network, "logits", logits)
    return records


def record_code_maps(monkeypatch, tokenizer) -> list[torch.Tensor]:
    records, original = [], tokenizer.quantize.next_input

    def next_input(si, f_hat, h):
        records.append(h.detach().clone())
        return original(si, f_hat, h)

    monkeypatch.setattr(tokenizer.quantize, "next_input", next_input)
    return records


def teacher_forced(network, tokenizer, labels, indices) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = network(labels, tokenizer.quantize.teacher_forcing_input(indices))
    return list(torch.split(logits, SPLIT, dim=1))


def var_pipeline(seed: int = 0, **sampler) -> Pipeline:
    tokenizer, network = tiny_models(seed)
    settings = NextScaleSamplerConfig(**{"cfg_scale": 1.5, "top_k": 0, "top_p": 0.0, **sampler})
    return Pipeline("var", network, NextScaleConfig(), settings, {"class_names": list("abcd")}, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------- sampler vs teacher forcing
def test_kv_cached_greedy_sampling_equals_teacher_forcing(monkeypatch):
    tokenizer, network = tiny_models()
    labels = torch.tensor([0, 3, 1])
    logits = record_logits(monkeypatch, network)
    code_maps = record_code_maps(monkeypatch, tokenizer)
    f_hat = sample_next_scale(network, tokenizer, labels, greedy())
    monkeypatch.undo()
    assert [tuple(r.shape) for r in logits] == [(3, s * s, 32) for s in SCALES]
    indices = [r.argmax(-1) for r in logits]
    for k, side in enumerate(SCALES):
        assert torch.equal(code_maps[k], tokenizer.quantize.embed(indices[k], side)), k
    assert len({tuple(i.flatten().tolist()) for i in indices[2]}) > 1  # not a degenerate constant map
    for k, (cached, forced) in enumerate(zip(logits, teacher_forced(network, tokenizer, labels, indices))):
        assert torch.allclose(cached, forced, atol=1e-4), (k, (cached - forced).abs().max())
    with torch.no_grad():
        assert torch.allclose(f_hat, tokenizer.latent_from_indices(indices), atol=1e-5)


def test_guidance_ramps_linearly_and_both_halves_match_teacher_forcing(monkeypatch):
    assert [guidance_weight(3.0, k, 3) for k in range(3)] == [0.0, 1.5, 3.0]
    assert [guidance_weight(3.0, k, 3, "constant") for k in range(3)] == [3.0] * 3
    assert guidance_weight(2.0, 0, 1) == 0.0
    with pytest.raises(ValueError, match="unknown guidance schedule"):
        guidance_weight(1.0, 0, 3, "cosine")
    cond, uncond = torch.randn(2, 5), torch.randn(2, 5)
    assert torch.allclose(guided_logits(cond, uncond, 0.5), 1.5 * cond - 0.5 * uncond)
    assert torch.equal(guided_logits(cond, uncond, 0.0), cond)

    # effigen's cfg_scale s: logits (1 + w) cond - w uncond with VAR's w = s - 1 ramped linearly from 0 at scale 1
    # (or constant: uncond + s (cond - uncond), LlamaGen's convention); s = 1 is unguided (one pass per scale)
    tokenizer, network = tiny_models()
    labels = torch.tensor([2, 0])
    for schedule in ("linear", "constant"):
        logits = record_logits(monkeypatch, network)
        code_maps = record_code_maps(monkeypatch, tokenizer)
        sample_next_scale(network, tokenizer, labels, greedy(4.0, guidance_schedule=schedule))
        monkeypatch.undo()
        assert [r.shape[0] for r in logits] == [4, 4, 4]  # conditional and unconditional rows in one batch
        indices = []
        for k, side in enumerate(SCALES):
            w = (3.0 * k / 2) if schedule == "linear" else 3.0
            assert guidance_weight(3.0, k, 3, schedule) == w
            chosen = ((1 + w) * logits[k][:2] - w * logits[k][2:]).argmax(-1)
            assert torch.equal(code_maps[k], tokenizer.quantize.embed(chosen, side)), (schedule, k)
            indices.append(chosen)
        if schedule == "linear":  # scale 1 is unguided: w = 0
            assert torch.equal(indices[0], logits[0][:2].argmax(-1))
        forced_cond = teacher_forced(network, tokenizer, labels, indices)
        forced_uncond = teacher_forced(network, tokenizer, torch.full_like(labels, network.null_class), indices)
        for k in range(3):
            assert torch.allclose(logits[k][:2], forced_cond[k], atol=1e-4), (schedule, k)
            assert torch.allclose(logits[k][2:], forced_uncond[k], atol=1e-4), (schedule, k)
    # s = 1: unguided, the conditional rows only
    logits = record_logits(monkeypatch, network)
    sample_next_scale(network, tokenizer, labels, greedy(1.0))
    monkeypatch.undo()
    assert [r.shape[0] for r in logits] == [2, 2, 2]


def test_block_causal_mask_keeps_coarser_scales_independent_of_finer_ones():
    mask = block_causal_mask((1, 2))
    expected = torch.ones(5, 5, dtype=torch.bool)
    expected[0, 1:] = False
    assert torch.equal(mask, expected)
    assert block_causal_mask(SCALES).sum() == 1 * 1 + 4 * 5 + 16 * 21

    tokenizer, network = tiny_models()
    labels = torch.tensor([1, 2])
    generator = torch.Generator().manual_seed(0)
    indices = [torch.randint(0, 32, (2, s * s), generator=generator) for s in SCALES]
    base = teacher_forced(network, tokenizer, labels, indices)
    changed = [indices[0], (indices[1] + 1) % 32, indices[2]]  # other tokens at scale 2 -> other inputs at scale 3
    after = teacher_forced(network, tokenizer, labels, changed)
    assert torch.allclose(base[0], after[0], atol=1e-6) and torch.allclose(base[1], after[1], atol=1e-6)
    assert not torch.allclose(base[2], after[2], atol=1e-3)
    # directly on the transformer's input: a change in scale 2's input rows changes scale 2, never scale 1
    with torch.no_grad():
        teacher = tokenizer.quantize.teacher_forcing_input(indices)
        moved = teacher.clone()
        moved[:, :4] += 1.0
        a, b = network(labels, teacher), network(labels, moved)
    assert torch.allclose(a[:, :1], b[:, :1], atol=1e-6) and not torch.allclose(a[:, 1:5], b[:, 1:5], atol=1e-3)
    with pytest.raises(ValueError, match="teacher input must be"):
        network(labels, teacher[:, :4])


# ---------------------------------------------------------------------------------------------- token sampling
def test_filter_logits_top_k_and_top_p():
    logits = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0))
    kept = filter_logits(logits, top_k=3)
    assert (torch.isfinite(kept).sum(-1) == 3).all()
    top3 = logits.topk(3, dim=-1).indices
    assert torch.equal(torch.isfinite(kept), torch.zeros_like(kept, dtype=torch.bool).scatter(-1, top3, True))
    assert torch.equal(kept[torch.isfinite(kept)], logits[torch.isfinite(kept)])  # survivors keep their values
    assert torch.equal(filter_logits(logits), logits) and torch.equal(filter_logits(logits, 0, 0.0), logits)
    assert torch.equal(filter_logits(logits, top_k=10), logits) and torch.equal(filter_logits(logits, top_k=50), logits)
    assert filter_logits(logits, top_k=3) is not logits and torch.isfinite(logits).all()  # a new tensor

    # top-p keeps the smallest set of most probable tokens whose mass reaches p (any order of the vocabulary)
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().view(1, 1, 4)
    for top_p, keep in ((0.4, {1}), (0.75, {1, 3}), (0.85, {1, 3, 2}), (0.99, {0, 1, 2, 3}), (1e-4, {1})):
        kept = torch.isfinite(filter_logits(logits, top_p=top_p)).flatten().nonzero().flatten().tolist()
        assert set(kept) == keep, (top_p, kept)
    # top-k first, then top-p over the survivors' renormalised mass: top-2 leaves {0.5, 0.3} -> 0.625, 0.375
    assert set(torch.isfinite(filter_logits(logits, top_k=2, top_p=0.6)).flatten().nonzero().flatten().tolist()) == {1}
    assert set(torch.isfinite(filter_logits(logits, top_k=2, top_p=0.7)).flatten().nonzero().flatten().tolist()) == {1, 3}


def test_sample_tokens_greedy_filtered_and_distributed_as_the_softmax():
    logits = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(0))
    noise = SampleNoise(torch.Generator().manual_seed(0), 3)
    assert torch.equal(sample_tokens(logits, noise, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_tokens(logits, noise, temperature=1e-9), logits.argmax(-1))
    top2 = logits.topk(2, dim=-1).indices
    for _ in range(5):
        tokens = sample_tokens(logits, noise, top_k=2)
        assert (tokens[..., None] == top2).any(-1).all()
    # Gumbel-max: frequencies follow softmax(logits / temperature)
    row = torch.tensor([1.0, 0.0, -1.0, 0.5])
    draws = sample_tokens(row.expand(1, 20000, 4), SampleNoise(torch.Generator().manual_seed(1), 1), temperature=2.0)
    frequencies = draws.flatten().bincount(minlength=4).float() / 20000
    assert torch.allclose(frequencies, (row / 2.0).softmax(-1), atol=0.015)


def test_sample_noise_makes_a_sample_independent_of_its_batch():
    batch = SampleNoise(torch.Generator().manual_seed(5), 4).uniform(3, 6)
    generator = torch.Generator().manual_seed(5)
    alone = torch.cat([SampleNoise(generator, 1).uniform(3, 6) for _ in range(4)])
    assert batch.shape == (4, 3, 6) and torch.equal(batch, alone)
    pipeline = var_pipeline()
    labels = [0, 1, 2, 3, 1]
    together = pipeline(labels, seed=11, batch_size=5)
    assert together.shape == (5, 3, 8, 8) and together.min() >= -1 and together.max() <= 1
    assert torch.allclose(together, pipeline(labels, seed=11, batch_size=1), atol=1e-5)
    assert torch.allclose(together, pipeline(labels, seed=11, batch_size=2), atol=1e-5)
    assert torch.equal(together, pipeline(labels, seed=11, batch_size=5))
    assert not torch.allclose(together, pipeline(labels, seed=12, batch_size=5), atol=1e-3)
    low = pipeline(labels[:2], seed=11, precision="bf16")
    assert low.shape == (2, 3, 8, 8) and torch.isfinite(low).all()
    assert pipeline.number_of_evaluations() == 3 * 2 and pipeline.number_of_evaluations(cfg_scale=1.0) == 3


def test_sampling_with_the_fused_draw_equals_the_eager_ops():
    # the fused CPU draw (guidance + top-k + top-p + Gumbel-max in one pass, nn.cpu_kernels) against the eager chain
    from effigen.nn import cpu_kernels

    pipeline = var_pipeline(top_k=12, top_p=0.9)
    outputs = []
    for enabled in (True, False):
        cpu_kernels.set_enabled(enabled)
        try:
            outputs.append(pipeline([0, 1, 2, 3], seed=7))
        finally:
            cpu_kernels.set_enabled(True)
    assert torch.equal(outputs[0], outputs[1])


def test_more_smooth_gumbel_softmax_path_is_seeded():
    pipeline = var_pipeline()
    a = pipeline([0, 1], seed=0, more_smooth=True)
    assert a.shape == (2, 3, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, pipeline([0, 1], seed=0, more_smooth=True))
    assert not torch.allclose(a, pipeline([0, 1], seed=1, more_smooth=True), atol=1e-4)
    assert not torch.allclose(a, pipeline([0, 1], seed=0), atol=1e-4)


def test_more_smooth_mixes_codes_under_the_top_k_top_p_filter(monkeypatch):
    """VAR's `autoregressive_infer_cfg` filters the guided logits in place (`sample_with_top_k_top_p_`) before its
    Gumbel-softmax mixture, so top-k/top-p apply to more_smooth too: with top_k=1 the mixture is the argmax code."""
    tokenizer, network = tiny_models()
    logits = record_logits(monkeypatch, network)
    code_maps = record_code_maps(monkeypatch, tokenizer)
    sample_next_scale(network, tokenizer, torch.tensor([0, 1]), greedy(1.0, more_smooth=True),
                      torch.Generator().manual_seed(0))
    monkeypatch.undo()
    for k, side in enumerate(SCALES):
        expected = tokenizer.quantize.embed(logits[k].argmax(-1), side)
        assert torch.allclose(code_maps[k], expected, atol=1e-6), (k, (code_maps[k] - expected).abs().max())


# ---------------------------------------------------------------------------------------------- editing
def test_edit_spec_forces_the_kept_tokens_at_every_scale(monkeypatch):
    tokenizer, network = tiny_models()
    x = images(2)
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :, :4] = 1.0  # keep the left half
    spec = EditSpec.from_images(tokenizer, x, keep)
    indices = tokenizer.indices_from_images(x)
    for k, side in enumerate(SCALES):
        assert torch.equal(spec.codes[k], tokenizer.quantize.embed(indices[k], side))
        assert spec.keep[k].shape == (2, 1, side, side) and spec.keep[k].dtype == torch.bool
    assert spec.keep[0].all()  # scales of at most 3 tokens are copied whole
    left = lambda side: (torch.arange(side) < side // 2).view(1, 1, 1, side).expand(2, 1, side, side)
    assert torch.equal(spec.keep[1], left(2)) and torch.equal(spec.keep[2], left(4))

    code_maps = record_code_maps(monkeypatch, tokenizer)
    labels = torch.full((2,), network.null_class)
    sample_next_scale(network, tokenizer, labels, NextScaleSamplerConfig(cfg_scale=1.0, top_k=0, top_p=0.0),
                      torch.Generator().manual_seed(0), edit=spec)
    assert len(code_maps) == 3
    for k in range(3):
        kept = spec.keep[k].expand_as(code_maps[k])
        assert torch.equal(code_maps[k][kept], spec.codes[k][kept]), k
    regenerated = ~spec.keep[2].expand_as(code_maps[2])
    assert not torch.equal(code_maps[2][regenerated], spec.codes[2][regenerated])
    with pytest.raises(ValueError, match=r"the mask must be \(B, 1, 8, 8\)"):
        EditSpec.from_images(tokenizer, x, torch.ones(1, 8, 8))


def test_pipeline_edit_keep_everything_is_the_reconstruction_and_regenerate_everything_is_new(monkeypatch):
    pipeline = var_pipeline()
    x = images(2)
    nothing = pipeline.edit(x, torch.zeros(1, 1, 8, 8), seed=0)
    assert torch.allclose(nothing, pipeline.tokenizer.reconstruct(x), atol=1e-6)
    everything = pipeline.edit(x, torch.ones(1, 1, 8, 8), labels=[1, 2], seed=0)
    assert everything.shape == (2, 3, 8, 8) and everything.min() >= -1 and everything.max() <= 1
    assert not torch.allclose(everything, nothing, atol=1e-3)
    assert torch.equal(everything, pipeline.edit(x, torch.ones(1, 1, 8, 8), labels=[1, 2], seed=0))
    assert len(pipeline.edit(x, torch.ones(2, 1, 8, 8), labels=1, output_type="pil")) == 2

    # inpainting a box: outside it the finest tokens are the input's
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    code_maps = record_code_maps(monkeypatch, pipeline.tokenizer)
    pipeline.edit(x, mask, labels=[0, 3], seed=1)
    finest = pipeline.tokenizer.quantize.embed(pipeline.tokenizer.indices_from_images(x)[-1], 4)
    outside = torch.ones(2, 4, 4, 4, dtype=torch.bool)
    outside[..., 1:3, 1:3] = False
    assert torch.equal(code_maps[-1][outside], finest[outside])
    monkeypatch.undo()

    with pytest.raises(ValueError, match=r"images must be \(B, 3, 8, 8\)"):
        pipeline.edit(torch.zeros(1, 3, 16, 16), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"labels must be 2 class ids in \[0, 4\]"):
        pipeline.edit(x, mask, labels=[0, 5])
    with pytest.raises(ValueError, match="the mask must be"):
        pipeline.edit(x, torch.zeros(1, 1, 4, 4))


def test_edit_is_refused_by_methods_without_tokens(tiny_dit_config):
    from effigen.models.dit import DiT
    from effigen.objectives.flow_matching import FlowSamplerConfig, RectifiedFlowConfig

    pipeline = Pipeline("dit-flow", DiT(tiny_dit_config), RectifiedFlowConfig(), FlowSamplerConfig(), {})
    with pytest.raises(ValueError, match="does not support zero-shot editing"):
        pipeline.edit(images(1), torch.zeros(1, 1, 8, 8))


# ---------------------------------------------------------------------------------------------- training end to end
class _Head(torch.utils.data.Dataset):
    """The first n items: with batch size n every step sees the same batch."""

    def __init__(self, dataset, n):
        self.dataset, self.n = dataset, n
        self.num_classes, self.class_names = dataset.num_classes, dataset.class_names

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.dataset[i]


def _var_run(path, tokenizer, *extra):
    return build_experiment_dict("mnist-var", overrides=[
        f"--tokenizer={tokenizer}", f"--trainer.output_dir={path}", "--network_preset=VAR-Test", "--data.resolution=8",
        "--trainer.batch_size=8", "--trainer.checkpoint_every=0", "--trainer.sample_every=0", "--trainer.log_every=1",
        "--trainer.progress=false", "--trainer.precision=fp32", "--trainer.warmup_steps=0", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tokenizer trained for 2 steps, then VAR trained on its tokens of one repeated batch of 8 images."""
    import effigen.training.run as train_cli

    root = tmp_path_factory.mktemp("var")
    tokenizer_run = build_experiment_dict("mnist-msvq", overrides=[
        f"--trainer.output_dir={root / 'tokenizer'}", "--network_preset=MSVQ-Test", "--data.resolution=8",
        "--trainer.max_steps=2", "--trainer.batch_size=8", "--trainer.checkpoint_every=0", "--trainer.progress=false",
        "--objective.perceptual_weight=0"])  # the preset's bf16 autocast: tokens are computed in fp32 regardless
    tokenizer = build_and_train(tokenizer_run, quiet=True)["pipeline"]
    original = train_cli.build_dataset
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_cli, "build_dataset", lambda config, split="train": _Head(original(config, split), 8))
        summary = build_and_train(_var_run(root / "var", tokenizer, "--trainer.max_steps=30",
                                           "--trainer.learning_rate=3e-3", "--objective.label_dropout=0"), quiet=True)
    return {"root": root, "tokenizer": tokenizer, "summary": summary, "pipeline": summary["pipeline"]}


def test_var_training_lowers_the_loss_and_the_folder_samples(trained):
    records = [json.loads(line) for line in (trained["root"] / "var" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 30 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert records[-1]["accuracy"] > records[0]["accuracy"]

    pipeline = Pipeline.from_pretrained(trained["pipeline"])
    assert isinstance(pipeline.generator, VAR) and isinstance(pipeline.tokenizer, MultiScaleVQ)
    assert pipeline.generator.config.scales == (1, 2, 4) and pipeline.generator.config.vocab_size == 32
    assert pipeline.num_classes == 10
    # the frozen tokenizer travels unchanged into the generator's folder
    saved = load_weights(trained["root"] / "var" / "final" / "tokenizer" / "model.safetensors")
    original = load_weights(trained["root"] / "tokenizer" / "final" / "tokenizer" / "model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    samples = pipeline([0, 1, 7], seed=0)
    assert samples.shape == (3, 3, 8, 8) and samples.min() >= -1 and samples.max() <= 1
    assert torch.equal(samples, pipeline([0, 1, 7], seed=0))
    assert not torch.equal(samples, pipeline([0, 1, 7], seed=1))
    latents = pipeline([0, 1], seed=0, output_type="latent")
    assert latents.shape == (2, 4, 4, 4)


def test_var_config_errors_name_the_fix(trained, tmp_path):
    config = _var_run(tmp_path, trained["tokenizer"])
    del config["tokenizer"]
    with pytest.raises(ConfigError, match=r"set `tokenizer` .*--tokenizer="):
        parse_experiment(config)
    with pytest.raises(ConfigError, match="no tokenizer there.*train one first"):
        parse_experiment(_var_run(tmp_path, tmp_path / "missing"))
    with pytest.raises(ConfigError, match="works at 8 px but data.resolution is 16; use the same resolution"):
        parse_experiment(_var_run(tmp_path, trained["tokenizer"], "--data.resolution=16"))
    with pytest.raises(ConfigError, match="network.vocab_size=64 disagrees"):
        parse_experiment(_var_run(tmp_path, trained["tokenizer"], "--network.vocab_size=64"))
    parsed = parse_experiment(_var_run(tmp_path, trained["tokenizer"]))
    assert parsed.network.scales == (1, 2, 4) and parsed.network.latent_channels == 4
    with pytest.raises(ValueError, match="needs a tokenizer"):
        NextScalePrediction(NextScaleConfig(), num_classes=10, tokenizer=None)


class _NamedHead(_Head):
    """`_Head` with the source fields a cache records."""

    def __init__(self, dataset, n):
        super().__init__(dataset, n)
        self.name, self.split, self.resolution = dataset.name, dataset.split, dataset.resolution


def test_training_from_a_token_cache_is_training_from_the_images(trained, tmp_path):
    # data.token_cache: the frozen tokenizer encodes the dataset (and its mirror images) once; the steps then read
    # the ids, and pick each sample's mirror from the same seeded stream as the image path flips it: the same run
    import effigen.training.run as train_cli
    from effigen.data.latents import LatentDataset

    original = train_cli.build_dataset
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_cli, "build_dataset", lambda config, split="train": _NamedHead(original(config, split), 16))
        for cache in ("false", "true"):
            runs[cache] = build_and_train(_var_run(tmp_path / cache, trained["tokenizer"], "--trainer.max_steps=3",
                                                   "--data.horizontal_flip=true", f"--data.token_cache={cache}"),
                                          quiet=True)
    losses = {cache: [json.loads(line)["loss"] for line in (tmp_path / cache / "metrics.jsonl").read_text().splitlines()]
              for cache in runs}
    assert len(losses["true"]) == 3 and losses["true"] == losses["false"]
    weights = [load_weights(tmp_path / cache / "final" / "generator" / "model.safetensors") for cache in ("false", "true")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    tokens = LatentDataset(tmp_path / "true" / "tokens")
    assert tokens.kind == "tokens" and tokens.stores_flipped and tokens.latent_shape == (21,)
    row, label = tokens[3]
    assert row.dtype == torch.int16 and row.shape == (42,)  # the ids of the image and of its mirror
    tokenizer = Pipeline.from_pretrained(trained["tokenizer"]).tokenizer
    image, image_label = original(parse_experiment(_var_run(tmp_path, trained["tokenizer"])).data, "train")[3]
    expected = tokenizer.output.flatten_indices(tokenizer.indices_from_images(image[None]))
    assert torch.equal(row[:21], expected[0]) and label == image_label
    # a cache without the mirrors cannot serve flips; a latent generator's cache is not a token cache
    from effigen.data.latents import cache_latents

    data = original(parse_experiment(_var_run(tmp_path, trained["tokenizer"])).data, "train")
    cache_latents(tokenizer, _NamedHead(data, 4), tmp_path / "plain", kind="tokens", progress=False)
    with pytest.raises(ConfigError, match="does not store"):
        train_cli.latent_training_set(tokenizer, LatentDataset(tmp_path / "plain"), tmp_path, 8, flip=True,
                                      kind="tokens")
    with pytest.raises(ConfigError, match="caches tokens"):
        train_cli.latent_training_set(tokenizer, LatentDataset(tmp_path / "plain"), tmp_path, 8)
    with pytest.raises(ValueError, match="integer token ids"):
        tokenizer.output.unflatten_indices(torch.zeros(2, 21))
    # a run without a VQ tokenizer has no token ids to cache
    with pytest.raises(ConfigError, match="data.token_cache=true stores a VQ tokenizer's token ids"):
        parse_experiment(build_experiment_dict("smoke", overrides=["--data.token_cache=true"]))


def test_cache_latents_cli_writes_a_token_cache_that_training_reads(trained, tmp_path):
    from effigen.cli.main import main

    assert main(["cache-latents", "--tokenizer", str(trained["tokenizer"]), "--tokens", "--out", str(tmp_path / "ids"),
                 "--data.name=mnist", "--data.resolution=8", "--data.holdout_fraction=0.99"]) == 0
    summary = build_and_train(_var_run(tmp_path / "var", trained["tokenizer"], "--trainer.max_steps=2",
                                       "--data.name=latents", f"--data.root={tmp_path / 'ids'}"), quiet=True)
    assert Pipeline.from_pretrained(summary["pipeline"])([1], seed=0).shape == (1, 3, 8, 8)
    with pytest.raises(ConfigError, match="does not store"):  # no mirrors in this cache
        build_and_train(_var_run(tmp_path / "flip", trained["tokenizer"], "--trainer.max_steps=1",
                                 "--data.name=latents", f"--data.root={tmp_path / 'ids'}", "--data.horizontal_flip=true"),
                        quiet=True)


def test_edit_cli_with_a_box_and_a_mask_file(trained, tmp_path, run_cli, capsys):
    from PIL import Image

    Image.fromarray((torch.rand(20, 20, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(
        tmp_path / "in.png")
    mask = torch.zeros(16, 16, dtype=torch.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask.numpy()).save(tmp_path / "mask.png")
    folder = trained["pipeline"]
    code, out, err = run_cli(["edit", "--from", folder, "--image", tmp_path / "in.png", "--box", "0.25,0.25,0.75,0.75",
                              "--num", "3", "--out", tmp_path / "box.png"], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "box.png").size == (4 * (5 * 10 + 2), 4 * 12)  # input, masked, 3 edits; x4
    code, out, err = run_cli(["edit", "--from", folder, "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
                              "--outpaint", "--class", "3", "--num", "2", "--upscale", "1", "--sampler.top_k=5",
                              "--out", tmp_path / "mask.png.grid.png"], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "mask.png.grid.png").size == (4 * 10 + 2, 12)
    code, out, err = run_cli(["edit", "--from", folder, "--image", tmp_path / "in.png", "--box", "0,0,0.5,0.5",
                              "--num", "2", "--out", tmp_path / "edits"], capsys)
    assert code == 0 and len(list((tmp_path / "edits").glob("*.png"))) == 2
    for args, message in (([], "exactly one of --mask FILE or --box"),
                          (["--box", "0.5,0.5,0.2,0.9"], "--box"),
                          (["--box", "0,0,1,1", "--class", "10"], "classes 0..9")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(["edit", "--from", folder, "--image", tmp_path / "in.png", *args, "--out", tmp_path / "x.png"], capsys)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- converter
def _official_var_state(network: VAR) -> dict[str, torch.Tensor]:
    """effigen's state dict in the official layout: plus the constant buffers that effigen computes."""
    state = dict(network.state_dict())
    L = network.config.num_tokens
    state["lvl_1L"] = network.lvl_1L.clone()
    bias = torch.zeros(1, 1, L, L)
    state["attn_bias_for_masking"] = bias.masked_fill(~block_causal_mask(network.scales), float("-inf"))
    for i in range(network.config.depth):
        state[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(network.config.embed_dim)
    return state


def _random(module, seed):
    randomize(module, seed, std=0.05)
    for name, buffer in module.named_buffers():
        if name.endswith("ema_vocab_hit_SV"):
            buffer.copy_(torch.rand(buffer.shape, generator=torch.Generator().manual_seed(seed)))
    return module.eval()


CONVERTER_CASES = [
    # (tokenizer settings, VAR settings)
    (dict(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_channels=4, vocab_size=32,
          scales=(1, 2, 4), resolution=8, share_quant_resi=0, phi_count=3),
     dict(depth=2, embed_dim=32, num_heads=2, num_classes=4)),
    (dict(base_channels=4, channel_multipliers=(1, 1, 2), num_res_blocks=2, latent_channels=3, vocab_size=16,
          scales=(1, 2, 3, 5), resolution=20, share_quant_resi=1, attention=False, mid_attention=False,
          quant_conv_kernel=1),
     dict(depth=3, embed_dim=24, num_heads=3, attn_l2_norm=False, shared_aln=True, mlp_ratio=2.0, num_classes=1)),
    (dict(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_channels=4, vocab_size=24,
          scales=(1, 2, 3, 4, 6), resolution=12, share_quant_resi=3, attention=False),
     dict(depth=2, embed_dim=16, num_heads=4, mlp_ratio=3.0, num_classes=3)),
    (dict(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_channels=4, vocab_size=8,
          scales=(1, 2, 4), resolution=8, share_quant_resi=1, quant_resi=0.0, mid_attention=False),
     dict(depth=1, embed_dim=8, num_heads=2, num_classes=2)),
    (dict(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_channels=4, vocab_size=8,
          scales=(1, 2, 3, 4), resolution=8, share_quant_resi=0, phi_count=2),
     dict(depth=2, embed_dim=16, num_heads=2, num_classes=2, shared_aln=True)),
]


@pytest.mark.parametrize("vq_settings, var_settings", CONVERTER_CASES)
def test_converter_reads_every_hyperparameter_off_non_official_sizes(tmp_path, vq_settings, var_settings):
    torch.manual_seed(0)
    tokenizer = _random(MultiScaleVQ(MultiScaleVQConfig(**vq_settings)), 1)
    network = _random(VAR(VARConfig(vocab_size=vq_settings["vocab_size"], latent_channels=vq_settings["latent_channels"],
                                    scales=vq_settings["scales"], **var_settings)), 2)
    torch.save(dict(tokenizer.state_dict()), tmp_path / "vae.pth")
    torch.save(_official_var_state(network), tmp_path / "var.pth")
    out = convert_var_official(tmp_path / "vae.pth", tmp_path / "var.pth", tmp_path / "converted")
    converted = Pipeline.from_pretrained(out)
    assert converted.tokenizer.config == tokenizer.config
    assert converted.generator.config == network.config
    for mine, theirs in ((tokenizer, converted.tokenizer), (network, converted.generator)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, tokenizer.config.resolution, tokenizer.config.resolution) * 2 - 1
    indices = tokenizer.indices_from_images(x)
    assert all(torch.equal(i, j) for i, j in zip(indices, converted.tokenizer.indices_from_images(x)))
    with torch.no_grad():
        teacher = tokenizer.quantize.teacher_forcing_input(indices)
        labels = torch.zeros(2, dtype=torch.long)
        assert torch.equal(network(labels, teacher), converted.generator(labels, teacher))
        assert torch.equal(tokenizer.decode(tokenizer.encode(x)), converted.tokenizer.decode(converted.tokenizer.encode(x)))
    original = Pipeline("var", network, NextScaleConfig(), converted.sampler_config, {}, tokenizer=tokenizer)
    assert torch.equal(original([0, 0], seed=3), converted([0, 0], seed=3))

    # training checkpoints ({'trainer': {'vae_local', 'var_wo_ddp'}}) convert the same
    torch.save({"trainer": {"vae_local": tokenizer.state_dict()}}, tmp_path / "vae_ckpt.pth")
    torch.save({"trainer": {"var_wo_ddp": _official_var_state(network)}}, tmp_path / "var_ckpt.pth")
    again = Pipeline.from_pretrained(convert_var_official(tmp_path / "vae_ckpt.pth", tmp_path / "var_ckpt.pth",
                                                          tmp_path / "again"))
    assert again.generator.config == network.config and again.tokenizer.config == tokenizer.config


def test_converter_rejects_non_zero_k_bias_and_mismatched_pairs(tmp_path):
    vq_settings, var_settings = CONVERTER_CASES[0]
    tokenizer = _random(MultiScaleVQ(MultiScaleVQConfig(**vq_settings)), 1)
    network = _random(VAR(VARConfig(vocab_size=32, latent_channels=4, scales=(1, 2, 4), **var_settings)), 2)
    torch.save(dict(tokenizer.state_dict()), tmp_path / "vae.pth")
    state = _official_var_state(network)
    state["blocks.1.attn.zero_k_bias"][3] = 0.5
    torch.save(state, tmp_path / "var_bias.pth")
    with pytest.raises(CheckpointError, match="blocks.1.attn.zero_k_bias is not zero"):
        convert_var_official(tmp_path / "vae.pth", tmp_path / "var_bias.pth", tmp_path / "out")
    other = _random(VAR(VARConfig(vocab_size=16, latent_channels=4, scales=(1, 2, 4), **var_settings)), 2)
    torch.save(_official_var_state(other), tmp_path / "var_vocab.pth")
    with pytest.raises(CheckpointError, match=r"vocabulary 32, 4 channels\) does not match .*vocabulary 16"):
        convert_var_official(tmp_path / "vae.pth", tmp_path / "var_vocab.pth", tmp_path / "out")
    other = _random(VAR(VARConfig(vocab_size=32, latent_channels=6, scales=(1, 2, 4), **var_settings)), 2)
    torch.save(_official_var_state(other), tmp_path / "var_channels.pth")
    with pytest.raises(CheckpointError, match="does not match"):
        convert_var_official(tmp_path / "vae.pth", tmp_path / "var_channels.pth", tmp_path / "out")
    # without lvl_1L a non-official schedule cannot be read off the weights: the error says to pass it
    state = _official_var_state(network)
    del state["lvl_1L"]
    torch.save(state, tmp_path / "var_no_levels.pth")
    with pytest.raises(CheckpointError, match="cannot infer the scale schedule.*pass the scales"):
        convert_var_official(tmp_path / "vae.pth", tmp_path / "var_no_levels.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=r"scales \(1, 2, 3\) give 14 tokens in 3 scales, the checkpoint has 21"):
        convert_var_official(tmp_path / "vae.pth", tmp_path / "var_no_levels.pth", tmp_path / "out", scales=(1, 2, 3))
    out = convert_var_official(tmp_path / "vae.pth", tmp_path / "var_no_levels.pth", tmp_path / "out", scales=(1, 2, 4))
    assert Pipeline.from_pretrained(out).generator.config == network.config


# ------------------------------------------------------------------------------------------- fast paths vs the eager ones
def test_preallocated_kv_cache_holds_the_same_values_as_concatenation():
    from effigen.nn.attention import LayerKVCache

    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 3, n, 4, generator=generator) for n in (1, 4, 9)]
    grown, preallocated = LayerKVCache(), LayerKVCache(capacity=14)
    for chunk in chunks:
        k_a, v_a = grown.append(chunk, chunk * 2)
        k_b, v_b = preallocated.append(chunk, chunk * 2)
        assert torch.equal(k_a, k_b) and torch.equal(v_a, v_b)
    assert preallocated._buffers is not None  # written in place, not concatenated
    k_a, _ = grown.append(chunks[0], chunks[0])
    k_b, _ = preallocated.append(chunks[0], chunks[0])  # past the capacity: concatenation takes over
    assert torch.equal(k_a, k_b) and k_b.shape[2] == 15


def test_sampling_with_the_preallocated_cache_is_bit_identical_to_concatenation(monkeypatch):
    from effigen.nn.attention import LayerKVCache

    tokenizer, network = tiny_models()
    labels = torch.tensor([0, 3, 1])
    settings = NextScaleSamplerConfig(cfg_scale=2.0, top_k=10, top_p=0.9)
    fast = sample_next_scale(network, tokenizer, labels, settings, torch.Generator().manual_seed(0))
    monkeypatch.setattr(network, "new_cache", lambda: [LayerKVCache() for _ in network.blocks])
    eager = sample_next_scale(network, tokenizer, labels, settings, torch.Generator().manual_seed(0))
    assert torch.equal(fast, eager)


@pytest.mark.parametrize("top_k,top_p", [(900, 0.96), (100, 0.5), (5, 0.99), (900, 0.0), (0, 0.9)])
def test_top_k_first_filter_equals_the_full_sort_reference(top_k, top_p):
    from effigen.samplers.tokens import filter_logits_reference

    generator = torch.Generator().manual_seed(top_k)
    for scale in (1.0, 5.0, 40.0):
        logits = torch.randn(3, 17, 4096, generator=generator) * scale
        assert torch.equal(filter_logits(logits, top_k, top_p), filter_logits_reference(logits, top_k, top_p))
    # bf16-rounded logits: many values tie with the k-th largest; they all survive top-k, and top-p keeps the same
    # number of entries with the same values (which of several equal values go is the sort's choice in both)
    rounded = (torch.randn(4, 9, 4096, generator=generator) * 3).bfloat16().float()
    rounded[0, 0, :50] = rounded[0, 0, :50].max()  # a tie at the very top as well
    rounded[1, 2, :400] = rounded[1, 2].max()  # 400 ties: past the first topk's margin for k = 64 (the second topk)
    for k, p in ((top_k or 900, top_p or 0.96), (64, 0.3)):
        fast, reference = filter_logits(rounded, k, p), filter_logits_reference(rounded, k, p)
        assert torch.equal(torch.isfinite(fast).sum(-1), torch.isfinite(reference).sum(-1))
        assert torch.equal(fast.sort(dim=-1).values, reference.sort(dim=-1).values)


def test_bf16_inference_fast_path_agrees_with_fp32_eager():
    """Sampling under bf16 autocast keeps the residual stream, q and k in bf16 (models/var.py `inference_dtype`);
    its logits stay within bf16 rounding of the fp32 pass, and training under autocast keeps the fp32 stream."""
    tokenizer, network = tiny_models()
    labels = torch.tensor([0, 3, 1])
    indices = tokenizer.indices_from_images(images(3))
    teacher = tokenizer.quantize.teacher_forcing_input(indices)
    with torch.no_grad():
        reference = network(labels, teacher)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = network(labels, teacher)
    error = float((fast.float() - reference).abs().max() / reference.abs().max())
    assert error < 3e-2, error
    seen = []
    hook = network.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    network.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        network(labels, teacher)
    network.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        network(labels, teacher)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
