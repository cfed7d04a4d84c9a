"""DetailFlow (2505.21473): the prefix -> resolution map, the group-causal masks, self-correction, the prefix
checks, KV-cached group-parallel sampling, and the CLI from tokenizer training to a loaded pipeline folder."""

from __future__ import annotations

import json
import math

import pytest
import torch

from effigen.models.detailflow import DETAILFLOW_GPT_PRESETS, DetailFlowGPT, DetailFlowGPTConfig
from effigen.nn.attention import attention
from effigen.objectives.detailflow import (DetailFlowARConfig, DetailFlowARObjective, draw_noise_index, draw_prefix)
from effigen.pipeline import Pipeline
from effigen.rng import BatchRandom
from effigen.samplers.detailflow import NextDetailSamplerConfig, detail_schedule, generate_details, guidance_scale
from effigen.tokenizers.detailflow import (DETAILFLOW_PRESETS, DetailFlowConfig, DetailFlowTokenizer, allowed_prefixes,
                                           round_up_to_patch, token_resolution)

from conftest import randomize


def tiny_tokenizer(**overrides) -> DetailFlowTokenizer:
    torch.manual_seed(0)
    config = DetailFlowConfig(**{**DETAILFLOW_PRESETS["DetailFlow-Test"], **overrides})
    return randomize(DetailFlowTokenizer(config)).eval()


def tiny_gpt(num_tokens=8, group_size=2, causal_num=None, vocab_size=16) -> DetailFlowGPT:
    torch.manual_seed(0)
    config = DetailFlowGPTConfig(**DETAILFLOW_GPT_PRESETS["DetailFlow-GPT-Test"], num_tokens=num_tokens,
                                 group_size=group_size, causal_num=causal_num, vocab_size=vocab_size, num_classes=3)
    return randomize(DetailFlowGPT(config), std=0.3).eval()


def images(batch=2, side=16, seed=0):
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------ resolution map
def test_resolution_map_endpoints_and_formula():
    R, N, p = 256, 128, 1.5
    assert token_resolution(1, N, R, p) == 1 and token_resolution(N, N, R, p) == R
    b = (R - 1) / (N - 1) ** p
    sides = [token_resolution(t, N, R, p) for t in range(1, N + 1)]
    assert sides == [max(1, min(R, int(R - b * (N - t) ** p))) for t in range(1, N + 1)]
    assert all(a <= b for a, b in zip(sides, sides[1:]))  # more tokens, never a coarser image
    # the concave map: half the tokens already give most of the resolution
    assert token_resolution(N // 2, N, R, p) > 0.6 * R


def test_prefix_to_resolution_mapping_of_a_tokenizer():
    # the official ResolutionDegradation at max size 64, 32 tokens, groups of 4, decoder patch 8 (the parity folder's)
    vit = {"width": 8, "depth": 1, "heads": 2, "mlp": 8, "patch": 8, "positions": 8}
    sizes = {f"{part}_{key}": value for part in ("encoder", "decoder") for key, value in vit.items()}
    tokenizer = DetailFlowTokenizer(DetailFlowConfig(resolution=64, num_tokens=32, group_size=4, vocab_size=8,
                                                     code_dim=4, **sizes))
    assert tokenizer.prefixes == [1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32]
    assert [tokenizer.target_resolution(t) for t in tokenizer.prefixes] == [1, 4, 6, 9, 21, 31, 40, 48, 55, 61, 64]
    assert [tokenizer.decoder_resolution(t) for t in tokenizer.prefixes] == [8, 8, 8, 16, 24, 32, 40, 48, 56, 64, 64]
    assert tokenizer.best_prefix() == {8: 3, 16: 4, 24: 8, 32: 12, 40: 16, 48: 20, 56: 24, 64: 32}
    assert round_up_to_patch(1, 8) == 8 and round_up_to_patch(17, 8) == 24
    assert allowed_prefixes(16, 4, 8) == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16]


def test_degraded_target_and_prefix_decoding_shapes():
    tokenizer = tiny_tokenizer()
    x = images()
    for t in tokenizer.prefixes:
        side = tokenizer.decoder_resolution(t)
        target = tokenizer.degraded_target(x, t)
        assert target.shape == (2, 3, side, side)
        assert tokenizer.decode_prefix(tokenizer.indices_from_images(x), t).shape == (2, 3, side, side)
    full = tokenizer.degraded_target(x, tokenizer.config.num_tokens)
    assert torch.equal(full, x)
    # one token describes one pixel: the area average, spread over the decoder's output
    assert tokenizer.target_resolution(1) == 1
    assert torch.allclose(tokenizer.degraded_target(x, 1), x.mean((2, 3), keepdim=True).expand(2, 3, 4, 4), atol=1e-5)


def test_untrained_token_count_is_refused_with_the_allowed_counts():
    tokenizer = tiny_tokenizer()  # 8 tokens, groups of 2, causal prefix 2 -> prefixes 1, 2, 4, 6, 8
    ids = tokenizer.indices_from_images(images())
    with pytest.raises(ValueError, match=r"decodes prefixes of \[1, 2, 4, 6, 8\] tokens; 3 is not one of them"):
        tokenizer.decode_prefix(ids, 3)
    with pytest.raises(ValueError, match=r"\[1, 2, 4, 6, 8\]"):
        tokenizer.decode(tokenizer.latent_from_indices(ids[:, :5]))
    with pytest.raises(ValueError, match="n <= 8"):
        tokenizer.latent_from_indices(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="expected images"):
        tokenizer.indices_from_images(images(side=8))
    with pytest.raises(ValueError, match="group_size"):
        DetailFlowConfig(num_tokens=10, group_size=4)
    gpt = tiny_gpt()
    with pytest.raises(ValueError, match=r"l in \[4, 6, 8\]"):
        gpt(torch.zeros(2, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))


# ------------------------------------------------------------------------------------------ masks
def official_group_causal(length: int, group_size: int, causal_num: int) -> torch.Tensor:
    """create_group_causal_mask of the official GPT: True = may attend."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return torch.where(i < causal_num, j <= i, j // group_size <= i // group_size)


@pytest.mark.parametrize("group_size,causal_num,length", [(2, 2, 8), (4, 4, 16), (4, 8, 16), (2, 4, 10)])
def test_group_causal_mask_equals_dense_masked_attention(group_size, causal_num, length):
    gpt = tiny_gpt(num_tokens=16, group_size=group_size, causal_num=causal_num)
    mask = gpt.attention_mask(length)
    dense = official_group_causal(length, group_size, causal_num)
    assert torch.equal(mask.dense(), dense)
    q, k, v = torch.randn(3, 2, 2, length, 8).unbind(0)
    assert torch.allclose(attention(q, k, v, mask), attention(q, k, v, dense), atol=1e-6)


def test_encoder_latents_are_group_causal():
    tokenizer = tiny_tokenizer()
    x = images()
    with torch.no_grad():
        before = tokenizer.latents(x)
        tokenizer.encoder.latent_tokens[:, 4:] += torch.randn(1, 4, 16)  # the queries of tokens 4.. (groups 4-5, 6-7)
        after = tokenizer.latents(x)
    assert torch.allclose(before[:, :4], after[:, :4], atol=1e-6)  # earlier tokens never see later queries
    assert not torch.allclose(before[:, 4:6], after[:, 4:6])


def test_teacher_forced_logits_are_group_causal():
    gpt = tiny_gpt()
    tokens = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        logits = gpt(labels, tokens)
        changed = tokens.clone()
        changed[:, 4] = (changed[:, 4] + 1) % 16  # the input of positions 6.. (t_4 sits at position 4 + g)
        other = gpt(labels, changed)
    assert logits.shape == (2, 8, 16)
    assert torch.allclose(logits[:, :6], other[:, :6], atol=1e-6) and not torch.allclose(logits[:, 6:], other[:, 6:])


# ------------------------------------------------------------------------------------------ self-correction
@pytest.mark.parametrize("noise_idx", [1, 2, 4])
def test_self_correction_triple(noise_idx):
    tokenizer = tiny_tokenizer()
    x = images()
    end = tokenizer.noise_span(noise_idx)
    assert end - noise_idx == (1 if noise_idx < tokenizer.config.causal_num else tokenizer.config.group_size)
    triple = tokenizer.correction_codes(x, noise_idx, choice=torch.full((2, end - noise_idx), 0.99))
    clean, noisy, target = triple.unbind(-1)
    assert torch.equal(clean, tokenizer.indices_from_images(x))
    assert torch.equal(noisy[:, :noise_idx], clean[:, :noise_idx]) and torch.equal(target[:, :end], clean[:, :end])
    assert torch.equal(noisy[:, end:], target[:, end:])  # after the noise: the codes re-encoded on the noisy prefix
    with torch.no_grad():  # each noisy token is among the top-k nearest codes of its latent
        latents = tokenizer.latents(x)[:, noise_idx:end]
        order = tokenizer.quantize.distances(tokenizer.quantize.prepare(latents)).argsort(-1)
    k = min(tokenizer.config.correction_top_k, tokenizer.config.vocab_size)
    assert (order[..., :k] == noisy[:, noise_idx:end, None]).any(-1).all()
    # choice 0 picks the nearest code: the noisy input equals the clean one there
    again = tokenizer.correction_codes(x, noise_idx, choice=torch.zeros(2, end - noise_idx))
    assert torch.equal(again[:, :end, 1], clean[:, :end])
    with pytest.raises(ValueError, match="start a group"):
        tokenizer.noise_span(5)


def test_official_draws_of_prefix_and_noise():
    assert [draw_prefix(32, 4, 4, u) for u in (0.0, 0.05, 0.2, 0.99)] == [1, 2, 8, 28]
    assert draw_noise_index(1, 4, 4, 0.5) is None
    assert draw_noise_index(3, 4, 4, 0.99) == 2  # inside the causal prefix: below min(t, c)
    assert draw_noise_index(16, 4, 4, 0.99) == 8  # below t - g, floored to a group start


def test_correction_pairs_of_the_ar_objective():
    tokenizer = tiny_tokenizer()
    x = images(4)
    clean = tokenizer.indices_from_images(x)
    objective = DetailFlowARObjective(DetailFlowARConfig(correction_prob=0.0), 3, tokenizer)
    tokens, target = objective.input_and_target(x, BatchRandom.local(7, 4))
    assert torch.equal(tokens, clean) and torch.equal(target, clean)
    objective = DetailFlowARObjective(DetailFlowARConfig(correction_prob=1.0), 3, tokenizer)
    tokens, target = objective.input_and_target(x, BatchRandom.local(7, 4))
    # the same draws by hand: one batch-wide noise position, then the near-code choices
    random = BatchRandom.local(7, 4)
    noise_idx = draw_noise_index(8, 2, 2, float(random.shared_rand(1)))
    triple = tokenizer.correction_codes(x, noise_idx, random.rand(tokenizer.noise_span(noise_idx) - noise_idx))
    assert torch.equal(tokens, triple[..., 1]) and torch.equal(target, triple[..., 2])
    with pytest.raises(ValueError, match="needs a DetailFlow tokenizer"):
        DetailFlowARObjective(DetailFlowARConfig(), 3, torch.nn.Linear(1, 1))


def test_tokenizer_training_pass_with_noise_doubles_the_batch():
    tokenizer = tiny_tokenizer().train()
    x = images()
    out, vq_loss, ids = tokenizer(x, t=4, noise_idx=2, choice=torch.rand(2, 2))
    assert out.shape == (4, 3, tokenizer.decoder_resolution(4), tokenizer.decoder_resolution(4))
    assert vq_loss.ndim == 0 and ids.shape == (2, 8)
    (out.square().mean() + vq_loss).backward()
    assert tokenizer.refine_conv.weight.grad is not None and tokenizer.encoder.refined_tokens.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ sampling
def test_schedule_and_gradual_guidance():
    assert detail_schedule(16, 4, 4) == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 4), (8, 4), (12, 4)]
    settings = NextDetailSamplerConfig(cfg_scale=2.0, gradual_cfg=True)
    groups = 4
    assert guidance_scale(settings, 2, 16, 4, 4) == 2.0  # the causal prefix keeps s
    assert [guidance_scale(settings, f, 16, 4, 4) for f in (4, 8, 12)] == [2.0 * (groups - i + 1) / (groups + 1)
                                                                          for i in (1, 2, 3)]


@pytest.mark.parametrize("cfg,gradual,top_k", [(1.0, False, 0), (2.0, False, 0), (1.5, True, 1)])
def test_kv_cached_sampling_equals_uncached(cfg, gradual, top_k):
    gpt = tiny_gpt(num_tokens=12, group_size=2, causal_num=4)
    labels = torch.tensor([0, 1, 2])
    out = {}
    for kv in (False, True):
        settings = NextDetailSamplerConfig(cfg_scale=cfg, gradual_cfg=gradual, top_k=top_k, kv_cache=kv)
        out[kv] = generate_details(gpt, labels, settings, torch.Generator().manual_seed(3), return_logits=True)
    assert torch.equal(out[False][0], out[True][0])
    assert torch.allclose(out[False][1], out[True][1], atol=1e-5)
    # the logits of each step are the teacher-forced logits of the sampled sequence (same mask, same positions)
    ids, logits = out[True]
    if cfg == 1.0:
        with torch.no_grad():
            assert torch.allclose(gpt(labels, ids), logits, atol=1e-5)


def test_sample_is_independent_of_the_batch():
    gpt = tiny_gpt()
    settings = NextDetailSamplerConfig(cfg_scale=1.5)
    both = generate_details(gpt, torch.tensor([0, 1]), settings, torch.Generator().manual_seed(0))
    alone = generate_details(gpt, torch.tensor([0]), settings, torch.Generator().manual_seed(0))
    assert torch.equal(both[:1], alone)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_end_to_end(tmp_path, run_cli, capsys):
    common = ["--data.resolution=16", "--trainer.batch_size=8", "--trainer.checkpoint_every=0",
              "--trainer.sample_every=0", "--trainer.progress=false", "--trainer.precision=fp32",
              "--trainer.max_minutes=null", "--trainer.warmup_steps=0", "--trainer.log_every=1"]
    code, out, err = run_cli(["train", "--preset", "mnist-detailflow-tokenizer", "--network_preset=DetailFlow-Test",
                              "--trainer.max_steps=3", f"--trainer.output_dir={tmp_path / 'tok'}",
                              "--objective.perceptual_weight=0", *common], capsys)
    assert code == 0, err
    tokenizer_folder = tmp_path / "tok" / "final"
    records = [json.loads(line) for line in (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) and "vq" in r for r in records)
    code, out, err = run_cli(["train", "--preset", "mnist-detailflow", "--network_preset=DetailFlow-GPT-Test",
                              f"--tokenizer={tokenizer_folder}", f"--trainer.output_dir={tmp_path / 'gen'}",
                              "--trainer.max_steps=3", *common], capsys)
    assert code == 0, err
    folder = tmp_path / "gen" / "final"
    pipeline = Pipeline.from_pretrained(folder)
    config = pipeline.generator.config
    assert isinstance(pipeline.generator, DetailFlowGPT) and isinstance(pipeline.tokenizer, DetailFlowTokenizer)
    assert (config.num_tokens, config.group_size, config.causal_num) == (8, 2, 2)  # from the tokenizer
    assert pipeline.number_of_evaluations() == len(detail_schedule(8, 2, 2)) * 2
    code, out, err = run_cli(["sample", "--from", folder, "--classes", "0,1", "--num", "4", "--out",
                              tmp_path / "samples.png"], capsys)
    assert code == 0, err
    images = pipeline([0, 1], seed=0)
    assert images.shape == (2, 3, 16, 16) and torch.equal(images, pipeline([0, 1], seed=0))
    code, out, err = run_cli(["edit", "--from", folder, "--image", tmp_path / "samples.png", "--box",
                              "0.25,0.25,0.75,0.75", "--out", tmp_path / "edit.png"], capsys)
    assert code != 0 and "1D tokens each describe the whole image" in err


def test_continuous_warmup_and_dead_code_restarts():
    tokenizer = tiny_tokenizer().train()
    x = images()
    out, vq_loss, ids = tokenizer(x, t=4, quantize=False)
    assert out.shape == (2, 3, tokenizer.decoder_resolution(4), tokenizer.decoder_resolution(4))
    with pytest.raises(ValueError, match="needs the codes"):
        tokenizer(x, noise_idx=2, quantize=False)
    quantizer = tokenizer.quantize
    dead = quantizer.hit_ema < 0.03
    assert dead.any()  # 16 tokens of one batch cannot hit all 16 codes
    before = quantizer.embedding.weight.clone()
    moved = quantizer.restart_dead_codes(0.03, torch.Generator().manual_seed(0))
    assert moved == int(dead.sum()) and torch.equal(quantizer.embedding.weight[~dead], before[~dead])
    pool = quantizer.restart_pool
    assert all((pool == row).all(-1).any() for row in quantizer.embedding.weight[dead])
