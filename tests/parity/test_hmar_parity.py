"""Parity with NVlabs/HMAR: multi-scale token indices (exact), the decoded reconstruction, the next-scale branch's
teacher-forced logits, the mask branch's logits under the recorded mask, and the greedy sample of `generate` under
the recorded masked schedule with the ramped guidance (its final token indices exactly), from the official state
dicts converted with `effigen convert hmar-official` (every hyperparameter read off the weights, checked against the
manifest). Every folder under the parity root whose manifest names "hmar-official" is a case."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from effigen.convert.hmar_official import convert_hmar_official
from effigen.pipeline import Pipeline
from effigen.samplers.hmar import sample_hmar

from .common import discover, folder, manifest, vectors_path

pytestmark = pytest.mark.parity


@pytest.fixture(params=discover("hmar-official"))
def case(request, tmp_path):
    path = folder(request.param)
    spec = manifest(path)
    out = convert_hmar_official(path / spec["vae_pth"], path / spec["hmar_pth"], tmp_path / "converted",
                                resolution=spec.get("image_resolution"))
    return spec, load_file(str(vectors_path(path, spec))), Pipeline.from_pretrained(out), path


def split_scales(pipeline, indices: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(indices, [s * s for s in pipeline.tokenizer.scales], dim=1))


def test_config_is_read_off_the_weights(case):
    spec, _, pipeline, _ = case
    vq, tokenizer = spec["vqvae"], pipeline.tokenizer.config
    assert tokenizer.vocab_size == vq["vocab_size"] and tokenizer.latent_channels == vq["z_channels"]
    assert tokenizer.base_channels == vq["ch"] and list(tokenizer.channel_multipliers) == vq["ch_mult"]
    assert tokenizer.num_res_blocks == vq["num_res_blocks"] and list(tokenizer.scales) == vq["patch_nums"]
    assert tokenizer.attention == vq.get("using_sa", True) and tokenizer.mid_attention == vq.get("using_mid_sa", True)
    if abs(vq.get("quant_resi", 0.5)) > 1e-6:
        assert tokenizer.share_quant_resi == vq.get("share_quant_resi", 4)
    hmar, config = spec["hmar"], pipeline.generator.config
    for key in ("depth", "embed_dim", "num_heads", "num_classes", "shared_aln", "attn_l2_norm", "n_layers_train"):
        assert getattr(config, key) == hmar[key], key
    assert list(config.scales) == hmar["patch_nums"] and config.mlp_ratio == hmar.get("mlp_ratio", 4.0)
    split = hmar.get("block_split", {})
    generator = pipeline.generator
    assert len(generator.base_blocks) == split.get("base_blocks", config.depth - config.n_layers_train)
    assert len(generator.ns_blocks) == len(generator.mask_blocks) == config.n_layers_train
    assert "NSCLv1" in pipeline.info["licence"] and "non-commercial" in pipeline.info["licence"]


def test_token_indices_exact(case):
    _, vectors, pipeline, _ = case
    indices = torch.cat(pipeline.tokenizer.indices_from_images(vectors["image"]), dim=1)
    assert torch.equal(indices, vectors["indices"])


def test_reconstruction(case):
    spec, vectors, pipeline, _ = case
    tokenizer = pipeline.tokenizer
    with torch.no_grad():
        images = tokenizer.decode(tokenizer.latent_from_indices(split_scales(pipeline, vectors["indices"])))
    assert (images - vectors["reconstruction"]).abs().max() < spec["tolerance"]["images_max_abs"]


def test_next_scale_teacher_forced_logits(case):
    spec, vectors, pipeline, _ = case
    quant = pipeline.tokenizer.quantize
    teacher = quant.teacher_forcing_input(split_scales(pipeline, vectors["indices"]))
    if "ns_input" in vectors:
        assert torch.allclose(teacher, vectors["ns_input"], atol=1e-5)
    with torch.no_grad():
        logits = pipeline.generator(vectors["labels"], teacher)
    assert (logits - vectors["ns_teacher_forced_logits"]).abs().max() < spec["tolerance"]["logits_max_abs"]


def test_mask_branch_logits_under_the_recorded_mask(case):
    spec, vectors, pipeline, _ = case
    quant = pipeline.tokenizer.quantize
    split = split_scales(pipeline, vectors["indices"])
    teacher, current = quant.teacher_forcing_input(split), quant.current_scale_inputs(split)
    if "mask_input" in vectors:
        assert torch.allclose(current, vectors["mask_input"], atol=1e-5)
    masked = vectors["mask_bool"].view(1, -1)
    first = pipeline.tokenizer.scales[0] ** 2
    # the official idx_to_mask indexes the tokens after the first scale
    assert torch.equal(masked[0, first:].nonzero().flatten(), vectors["mask_idx_to_mask"])
    with torch.no_grad():
        logits = pipeline.generator(vectors["labels"], teacher, current, masked)
    assert (logits - vectors["mask_logits"]).abs().max() < spec["tolerance"]["logits_max_abs"]


def test_greedy_masked_schedule_sample(case):
    spec, vectors, pipeline, _ = case
    generate = spec["generate"]
    assert generate["top_k"] == 1 and generate.get("mask", True)
    key = next(k for k in vectors if k.startswith("greedy_cfg"))
    # the manifest's cfg is HMAR's w in (1 + w) cond - w uncond (mask steps: w x 1e-6); effigen's cfg_scale is 1 + w
    settings = pipeline.sampler_settings(cfg_scale=1 + generate["cfg"], top_k=1, top_p=0.0, guidance_schedule="linear",
                                         mask_schedule=generate["mask_schedule"], mask_guidance_ratio=1e-6)
    f_hat, indices = sample_hmar(pipeline.generator, pipeline.tokenizer, vectors["labels"], settings,
                                 torch.Generator().manual_seed(generate.get("g_seed", 0)), return_indices=True)
    assert torch.equal(torch.cat(indices, dim=1), vectors["generated_indices"])
    tolerance = spec["tolerance"]["images_max_abs"]
    with torch.no_grad():
        assert ((pipeline.tokenizer.decode(f_hat) + 1) / 2 - vectors[key]).abs().max() < tolerance
    images = pipeline(vectors["labels"], cfg_scale=1 + generate["cfg"], top_k=1, top_p=0.0,
                      mask_schedule=generate["mask_schedule"])
    assert ((images + 1) / 2 - vectors[key]).abs().max() < tolerance


def test_convert_command(case, tmp_path):
    from effigen.cli.main import main

    spec, vectors, pipeline, path = case
    assert main(["convert", "hmar-official", "--vae", str(path / spec["vae_pth"]), "--hmar", str(path / spec["hmar_pth"]),
                 "--out", str(tmp_path / "cli")]
                + (["--resolution", str(spec["image_resolution"])] if "image_resolution" in spec else [])) == 0
    converted = Pipeline.from_pretrained(tmp_path / "cli")
    assert converted.method.name == "hmar" and converted.sampler_config.mask_schedule is None
    if pipeline.generator.config.depth not in (16, 20, 24, 30):  # the argument defaults of sampling_arg_util.py
        assert converted.sampler_config.cfg_scale == 2.5 and converted.sampler_config.top_k == 900
    for key, value in converted.generator.state_dict().items():
        assert torch.equal(value, pipeline.generator.state_dict()[key])
