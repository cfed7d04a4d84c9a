"""The raster-scan AR baseline (method raster-ar): LlamaGen-style GPT over a single-scale VQ token grid."""

import copy
import json

import pytest
import torch

from effigen.training.run import build_and_train
from effigen.config import ConfigError
from effigen.training.experiment import build_experiment_config, build_experiment_dict
from effigen.models.gpt import GPT, GPT_PRESETS, GPTConfig
from effigen.models.var import VAR, VAR_PRESETS, VARConfig
from effigen.objectives.next_token import NextTokenConfig, NextTokenPrediction
from effigen.pipeline import Pipeline
from effigen.rng import BatchRandom
from effigen.samplers.next_token import NextTokenSamplerConfig, generate_tokens
from effigen.tokenizers.msvq import MultiScaleVQ, MultiScaleVQConfig

from conftest import randomize

GRID, VOCAB, CLASSES = 4, 32, 5


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(**GPT_PRESETS["GPT-Test"], num_classes=CLASSES, vocab_size=VOCAB, scales=(GRID,))
    return randomize(GPT(config), seed=seed, std=0.1).eval()  # the head starts at zero: give it real outputs


def tiny_vq() -> MultiScaleVQ:
    torch.manual_seed(0)
    return MultiScaleVQ(MultiScaleVQConfig(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_channels=4,
                                           vocab_size=VOCAB, scales=(GRID,), resolution=8, share_quant_resi=1)).eval()


def test_kv_cached_sampling_matches_a_teacher_forced_pass():
    network = tiny_gpt()
    labels = torch.tensor([0, 3, 4])
    settings = NextTokenSamplerConfig(cfg_scale=1.0, top_k=0, top_p=0.0)
    ids, step_logits = generate_tokens(network, labels, settings, torch.Generator().manual_seed(0), return_logits=True)
    assert ids.shape == (3, GRID * GRID) and step_logits.shape == (3, GRID * GRID, VOCAB)
    with torch.no_grad():
        full = network(labels, ids)
    torch.testing.assert_close(step_logits, full, atol=1e-5, rtol=1e-5)
    # and each sampled token is a draw from those logits' support (not a stale position)
    assert torch.isfinite(full.gather(-1, ids[..., None])).all()


def test_guidance_follows_llamagen_and_is_conditional_at_w0():
    network = tiny_gpt()
    labels = torch.tensor([1, 2])
    # s = 1 (VAR's w = s - 1 = 0) through the doubled cond/uncond batch = the plain conditional run
    plain_ids, plain = generate_tokens(network, labels, NextTokenSamplerConfig(cfg_scale=1.0), torch.Generator().manual_seed(5),
                                       return_logits=True)
    ids, guided = generate_tokens(network, labels, NextTokenSamplerConfig(cfg_scale=1.0), torch.Generator().manual_seed(5),
                                  guided=True, return_logits=True)
    torch.testing.assert_close(guided, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(ids, plain_ids)
    # s = 3: uncond + s (cond - uncond), with cond and uncond from teacher-forced passes on the sampled sequence
    s = 3.0
    ids, guided = generate_tokens(network, labels, NextTokenSamplerConfig(cfg_scale=s), torch.Generator().manual_seed(5),
                                  return_logits=True)
    with torch.no_grad():
        cond = network(labels, ids)
        uncond = network(torch.full_like(labels, network.null_class), ids)
    torch.testing.assert_close(guided, uncond + s * (cond - uncond), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(cond, uncond, atol=1e-3)  # the class matters, so the check above is not vacuous


def test_causal_mask_later_tokens_do_not_change_earlier_logits():
    network = tiny_gpt()
    labels = torch.tensor([2, 2])
    ids = torch.randint(VOCAB, (2, GRID * GRID), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB
    with torch.no_grad():
        a, b = network(labels, ids), network(labels, changed)
    # logits[:, i] sees tokens < i only: positions <= 9 are unchanged, position 10 on sees the change
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=0, rtol=0)
    assert (a[:, 10:] - b[:, 10:]).abs().amax() > 1e-3
    # the class token is seen everywhere
    with torch.no_grad():
        other = network(torch.tensor([0, 0]), ids)
    assert (other[:, 0] - a[:, 0]).abs().amax() > 1e-3


def test_config_needs_one_scale_and_gpt_s_matches_var_d4():
    with pytest.raises(ValueError, match="single token grid"):
        GPTConfig(**GPT_PRESETS["GPT-Test"], scales=(1, 2, 4))
    gpt = GPT(GPTConfig(**GPT_PRESETS["GPT-S"], num_classes=10, vocab_size=512, scales=(8,)))
    var = VAR(VARConfig(**VAR_PRESETS["VAR-d4"], num_classes=10, vocab_size=512, latent_channels=16,
                        scales=(1, 2, 3, 4, 5, 6, 8)))  # the mnist-var settings
    n_gpt, n_var = (sum(p.numel() for p in m.parameters()) for m in (gpt, var))
    assert abs(n_gpt - n_var) / n_var < 0.10, (n_gpt, n_var)
    assert "layers.0.attention.wqkv.weight" in gpt.state_dict() and "cls_embedding.embedding_table.weight" in gpt.state_dict()
    assert not any("rope" in k or "mask" in k for k in gpt.state_dict())


def test_loss_is_teacher_forced_cross_entropy_and_falls_on_one_batch():
    torch.manual_seed(0)
    network = GPT(GPTConfig(**GPT_PRESETS["GPT-Test"], num_classes=CLASSES, vocab_size=VOCAB, scales=(GRID,)))
    objective = NextTokenPrediction(NextTokenConfig(label_dropout=0.1), CLASSES, tiny_vq())
    # a fixed batch of random raster sequences stands in for the tokenizer's output (the real tokenizer path runs
    # in the end-to-end test): 8 sequences, 5 classes, so only the first token of a shared class stays ambiguous
    ids = torch.randint(VOCAB, (8, GRID * GRID), generator=torch.Generator().manual_seed(0))
    objective.tokenize = lambda images: [ids]
    batch = {"images": torch.zeros(8, 3, 8, 8), "labels": torch.arange(8) % CLASSES}
    randomized = randomize(copy.deepcopy(network), std=0.02)
    with torch.no_grad():  # the loss: cross-entropy of the teacher-forced logits, labels dropped by the batch's draws
        labels = objective.drop_labels(batch["labels"], BatchRandom(0, 0, 0, 8, 0, 8))
        expected = torch.nn.functional.cross_entropy(randomized(labels, ids).flatten(0, 1), ids.flatten())
        loss = objective.loss(randomized, batch, BatchRandom(0, 0, 0, 8, 0, 8))["loss"]
    torch.testing.assert_close(loss, expected)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    network.train()
    losses = []
    for step in range(30):
        out = objective.loss(network, batch, BatchRandom(0, step, 0, 8, 0, 8))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), rel=1e-4)  # zero head: uniform
    assert sum(losses[-5:]) / 5 < 0.25 * losses[0], losses[::5]
    with pytest.raises(ValueError, match="single-scale"):
        NextTokenPrediction(NextTokenConfig(), CLASSES, MultiScaleVQ(MultiScaleVQConfig(
            base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_channels=4, vocab_size=VOCAB,
            scales=(1, 2, 4), resolution=8, share_quant_resi=2)))


def test_mnist_raster_ar_preset_needs_a_single_scale_tokenizer(tmp_path):
    config = build_experiment_dict("mnist-raster-ar")
    # the same trainer settings as VAR's, except the step count that fits the same wall time at its speed
    assert config["method"] == "raster-ar" and config["trainer"] == build_experiment_dict("mnist-var")["trainer"] | {
        "output_dir": "runs/mnist-raster-ar", "max_steps": config["trainer"]["max_steps"]}
    assert config["trainer"]["max_minutes"] == build_experiment_dict("mnist-var")["trainer"]["max_minutes"]
    with pytest.raises(ConfigError, match="train one first"):
        build_experiment_config(preset="mnist-raster-ar", overrides=[f"--tokenizer={tmp_path}"])


def test_tokenizer_then_raster_ar_train_save_reload_sample(tmp_path):
    # 1) a tiny single-scale VQ tokenizer (method msvq, the mnist-vq recipe) on 8 px digits: 4x4 tokens
    vq = build_experiment_dict("mnist-vq", overrides=[f"--trainer.output_dir={tmp_path / 'vq'}", "--trainer.max_steps=6",
                                                      "--trainer.batch_size=16", "--trainer.precision=fp32",
                                                      "--trainer.checkpoint_every=0", "--trainer.sample_every=0",
                                                      "--trainer.log_every=1", "--trainer.progress=false",
                                                      "--objective.perceptual_weight=0", "--network_preset=MSVQ-Test"])
    vq["data"] = {"name": "digits", "resolution": 8}
    vq["network"] = {"scales": [GRID], "share_quant_resi": 1}
    build_and_train(vq, quiet=True)
    # 2) the GPT on its tokens, guided sampling in the saved sampler settings
    out = tmp_path / "ar"
    ar = build_experiment_dict("mnist-raster-ar", overrides=[
        f"--tokenizer={tmp_path / 'vq' / 'final'}", f"--trainer.output_dir={out}", "--trainer.max_steps=8",
        "--trainer.batch_size=16", "--trainer.precision=fp32", "--trainer.checkpoint_every=4", "--trainer.sample_every=0",
        "--trainer.log_every=1", "--trainer.progress=false", "--trainer.warmup_steps=2", "--network_preset=GPT-Test"])
    ar["data"] = {"name": "digits", "resolution": 8}
    summary = build_and_train(ar, quiet=True)
    assert summary["steps"] == 8
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)

    pipeline = Pipeline.from_pretrained(summary["pipeline"])
    assert pipeline.method.name == "raster-ar" and pipeline.generator.config.scales == (GRID,)
    assert pipeline.sampler_config.cfg_scale == build_experiment_dict("mnist-raster-ar")["sampler"]["cfg_scale"]
    assert pipeline.number_of_evaluations() == 2 * GRID * GRID
    assert pipeline.number_of_evaluations(cfg_scale=1.0) == GRID * GRID
    labels = [0, 1, 2, 9]
    images = pipeline(labels, seed=3)
    assert images.shape == (4, 3, 8, 8) and images.abs().max() <= 1
    torch.testing.assert_close(pipeline(labels, seed=3), images, atol=0, rtol=0)
    torch.testing.assert_close(pipeline(labels, seed=3, batch_size=3), images, atol=1e-5, rtol=0)  # per-sample noise
    assert not torch.equal(pipeline(labels, seed=4), images)
    latent = pipeline(labels, seed=3, output_type="latent")
    assert latent.shape == (4, 4, GRID, GRID)
