"""Parity with ByteFlow-AI/DetailFlow: tokenizer code indices (exact), the full reconstruction and prefix
reconstructions at their own resolutions, the self-correction code triple (exact), teacher-forced GPT logits (clean
and noisy input) and group-parallel greedy samples with constant and gradual CFG (indices exact, decoded images),
from the released checkpoint layout converted with `effigen convert detailflow-official` (hyperparameters read from
the run's config.json / config.yaml and the weights, checked against the manifest)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from effigen.convert.detailflow_official import convert_detailflow_official
from effigen.pipeline import Pipeline
from effigen.samplers.detailflow import NextDetailSamplerConfig, detail_schedule, generate_details

from .common import discover, folder, manifest, max_abs_error, vectors_path

pytestmark = pytest.mark.parity


@pytest.fixture(params=discover("detailflow-official"))
def case(request, tmp_path):
    path = folder(request.param)
    spec = manifest(path)
    files = spec["files"]
    out = convert_detailflow_official(path / files["tokenizer_checkpoint"], path / files["gpt_checkpoint"],
                                      tmp_path / "converted", siglip_config=path / files["siglip2_config"])
    vectors = path / files["vectors"] if "vectors" in files else vectors_path(path, spec)
    return spec, load_file(str(vectors)), Pipeline.from_pretrained(out), path


def test_config_is_read_from_the_run(case):
    spec, _, pipeline, _ = case
    tokenizer, effective = pipeline.tokenizer.config, spec["tokenizer_effective"]
    assert (tokenizer.num_tokens, tokenizer.group_size, tokenizer.causal_num, tokenizer.resolution) == (
        effective["num_latent_tokens"], effective["group_size"], effective["causal_num"], effective["image_resolution"])
    assert (tokenizer.vocab_size, tokenizer.code_dim) == (effective["codebook"]["size"], effective["codebook"]["dim"])
    for part in ("encoder", "decoder"):
        vit = effective[part]
        assert getattr(tokenizer, f"{part}_width") == vit["hidden_size"]
        assert getattr(tokenizer, f"{part}_heads") == vit["num_attention_heads"]
        assert getattr(tokenizer, f"{part}_mlp") == vit["intermediate_size"]
        assert getattr(tokenizer, f"{part}_depth") == vit["num_layers"]
        assert getattr(tokenizer, f"{part}_patch") == vit["patch_size"]
        assert getattr(tokenizer, f"{part}_positions") == vit["position_embedding_size"]
    assert tokenizer.degradation_power == spec["resolution_map"]["degradation_power"]
    gpt, generator = spec["gpt_config_json"], pipeline.generator.config
    assert (generator.dim, generator.depth, generator.num_heads) == (gpt["dim"], gpt["n_layer"], gpt["n_head"])
    assert (generator.num_tokens, generator.vocab_size, generator.num_classes) == (
        gpt["block_size"], gpt["vocab_size"], gpt["num_classes"])


def test_resolution_map(case):
    spec, _, pipeline, _ = case
    tokenizer, mapping = pipeline.tokenizer, spec["resolution_map"]
    assert [str(t) for t in tokenizer.prefixes] == list(mapping["token2res"])
    for t in tokenizer.prefixes:
        assert tokenizer.target_resolution(t) == mapping["token2res"][str(t)]
        assert tokenizer.decoder_resolution(t) == mapping["token2dec_out_res"][str(t)]
    assert {str(k): v for k, v in tokenizer.best_prefix().items()} == mapping["decres2besttoken"]


def test_token_indices_exact(case):
    _, vectors, pipeline, _ = case
    assert torch.equal(pipeline.tokenizer.indices_from_images(vectors["image"]), vectors["indices"])


def test_reconstructions(case):
    spec, vectors, pipeline, _ = case
    tokenizer, tol = pipeline.tokenizer, spec["tolerance"]["images_max_abs"]
    with torch.no_grad():
        full = tokenizer.decode_codes(tokenizer.latent_from_indices(vectors["indices"]))
    assert max_abs_error(full, vectors["reconstruction"]) < tol
    for t, prefix in spec["prefixes"].items():
        images = tokenizer.decode_prefix(vectors["indices"], int(t))
        assert list(images.shape) == prefix["shape"]
        assert tokenizer.decoder_resolution(int(t)) == prefix["decoder_resolution"]
        assert tokenizer.target_resolution(int(t)) == prefix["target_resolution"]
        assert max_abs_error(images, vectors[f"reconstruction_prefix{t}"]) < tol, t


def test_correction_triple_exact(case):
    spec, vectors, pipeline, _ = case
    tokenizer, correction, expected = pipeline.tokenizer, spec["correction"], vectors["correction_indices"]
    start, end = correction["noise_idx"], correction["noise_end"]
    assert tokenizer.noise_span(start) == end and end - start == correction["noise_num"]
    noisy = expected[:, start:end, 1]
    # the official noisy codes are random picks among the 50 nearest: check they are, then replay them
    with torch.no_grad():
        latents = tokenizer.latents(vectors["image"])
        distances = tokenizer.quantize.distances(tokenizer.quantize.prepare(latents[:, start:end]))
        nearest = distances.topk(min(tokenizer.config.correction_top_k, distances.shape[-1]), largest=False).indices
    assert (nearest == noisy.unsqueeze(-1)).any(-1).all()
    assert torch.equal(tokenizer.correction_codes(vectors["image"], start, noisy=noisy), expected)


def test_teacher_forced_logits(case):
    spec, vectors, pipeline, _ = case
    tol = spec["tolerance"]["logits_max_abs"]
    with torch.no_grad():
        clean = pipeline.generator(vectors["labels"], vectors["indices"])
        noisy = pipeline.generator(vectors["labels"], vectors["correction_indices"][..., 1])
    assert max_abs_error(clean, vectors["teacher_forced_logits"]) < tol
    assert max_abs_error(noisy, vectors["teacher_forced_logits_noisy_input"]) < tol


@pytest.mark.parametrize("gradual", [False, True])
@pytest.mark.parametrize("kv_cache", [False, True])
def test_group_parallel_greedy_samples(case, gradual, kv_cache):
    spec, vectors, pipeline, _ = case
    sampler, name = spec["sampler"], "greedy_gradual_cfg" if gradual else "greedy_cfg"
    config = pipeline.generator.config
    assert len(detail_schedule(config.num_tokens, config.group_size, config.causal_num)) == sampler["forward_calls"]
    settings = NextDetailSamplerConfig(cfg_scale=sampler["cfg_scale"], gradual_cfg=gradual, top_k=sampler["top_k"],
                                       top_p=0.0 if sampler["top_p"] >= 1 else sampler["top_p"],
                                       temperature=sampler["temperature"], kv_cache=kv_cache)
    ids = generate_details(pipeline.generator, vectors["labels"], settings)
    assert torch.equal(ids, vectors[f"{name}_indices"])
    tokenizer = pipeline.tokenizer
    with torch.no_grad():
        images = tokenizer.decode_codes(tokenizer.latent_from_indices(ids))
    assert max_abs_error(images, vectors[f"{name}_sample"]) < spec["tolerance"]["images_max_abs"]


def test_convert_command(case, tmp_path):
    from effigen.cli.main import main

    spec, vectors, pipeline, path = case
    files = spec["files"]
    assert main(["convert", "detailflow-official", "--tokenizer-ckpt", str(path / files["tokenizer_checkpoint"]),
                 "--gpt-ckpt", str(path / files["gpt_checkpoint"]),
                 "--siglip-config", str(path / files["siglip2_config"]),
                 "--out", str(tmp_path / "cli")]) == 0
    converted = Pipeline.from_pretrained(tmp_path / "cli")
    assert converted.method.name == "detailflow" and converted.sampler_config.top_k == 0
    for key, value in converted.generator.state_dict().items():
        assert torch.equal(value, pipeline.generator.state_dict()[key])
    # the pipeline samples with the converted folder's settings (greedy here: the manifest's guided sample)
    images = converted(vectors["labels"], cfg_scale=spec["sampler"]["cfg_scale"], top_k=1)
    assert max_abs_error(images, vectors["greedy_cfg_sample"].clamp(-1, 1)) < spec["tolerance"]["images_max_abs"]
