"""Parity with FoundationVision/VAR: multi-scale token indices (exact), the decoded reconstruction, teacher-forced
logits and the KV-cached greedy sample with the ramped guidance, from the official state dicts converted with
`effigen convert var-official` (every hyperparameter read off the weights, checked against the manifest)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from effigen.convert.var_official import convert_var_official
from effigen.pipeline import Pipeline

from .common import discover, folder, manifest, vectors_path

pytestmark = pytest.mark.parity


@pytest.fixture(params=discover("var-official"))
def case(request, tmp_path):
    path = folder(request.param)
    spec = manifest(path)
    out = convert_var_official(path / spec["vae_pth"], path / spec["var_pth"], tmp_path / "converted",
                               resolution=spec.get("image_resolution"))
    return spec, load_file(str(vectors_path(path, spec))), Pipeline.from_pretrained(out), path


def test_config_is_read_off_the_weights(case):
    spec, _, pipeline, _ = case
    vq, tokenizer = spec["vqvae"], pipeline.tokenizer.config
    assert tokenizer.vocab_size == vq["vocab_size"] and tokenizer.latent_channels == vq["z_channels"]
    assert tokenizer.base_channels == vq["ch"] and list(tokenizer.channel_multipliers) == vq["ch_mult"]
    assert tokenizer.num_res_blocks == vq["num_res_blocks"] and list(tokenizer.scales) == vq["patch_nums"]
    assert tokenizer.attention == vq.get("using_sa", True) and tokenizer.mid_attention == vq.get("using_mid_sa", True)
    if abs(vq.get("quant_resi", 0.5)) > 1e-6:  # with quant_resi = 0 there are no phi weights and sharing is moot
        assert tokenizer.share_quant_resi == vq.get("share_quant_resi", 4)
    var, config = spec["var"], pipeline.generator.config
    for key in ("depth", "embed_dim", "num_heads", "num_classes", "shared_aln", "attn_l2_norm"):
        assert getattr(config, key) == var[key], key
    assert list(config.scales) == var["patch_nums"] and config.mlp_ratio == var.get("mlp_ratio", 4.0)


def test_token_indices_exact(case):
    _, vectors, pipeline, _ = case
    indices = torch.cat(pipeline.tokenizer.indices_from_images(vectors["image"]), dim=1)
    assert torch.equal(indices, vectors["indices"])


def test_reconstruction(case):
    spec, vectors, pipeline, _ = case
    tokenizer = pipeline.tokenizer
    split = torch.split(vectors["indices"], [s * s for s in tokenizer.scales], dim=1)
    with torch.no_grad():
        images = tokenizer.decode(tokenizer.latent_from_indices(list(split)))
    assert (images - vectors["reconstruction"]).abs().max() < spec["tolerance"]["images_max_abs"]


def test_teacher_forced_logits(case):
    spec, vectors, pipeline, _ = case
    tokenizer = pipeline.tokenizer
    split = list(torch.split(vectors["indices"], [s * s for s in tokenizer.scales], dim=1))
    with torch.no_grad():
        logits = pipeline.generator(vectors["labels"], tokenizer.quantize.teacher_forcing_input(split))
    assert (logits - vectors["teacher_forced_logits"]).abs().max() < spec["tolerance"]["logits_max_abs"]


def test_kv_cached_greedy_guided_sample(case):
    spec, vectors, pipeline, _ = case
    key = next(k for k in vectors if k.startswith("greedy_cfg"))
    cfg = float(key[len("greedy_cfg"):].split("_")[0])
    # the manifest's cfg is VAR's w in (1 + w) cond - w uncond; effigen's cfg_scale is s = 1 + w
    images = pipeline(vectors["labels"], cfg_scale=1 + cfg, top_k=1, top_p=0.0, guidance_schedule="linear")
    assert ((images + 1) / 2 - vectors[key]).abs().max() < spec["tolerance"]["images_max_abs"]


def test_convert_command(case, tmp_path):
    from effigen.cli.main import main

    spec, vectors, pipeline, path = case
    assert main(["convert", "var-official", "--vae", str(path / spec["vae_pth"]), "--var", str(path / spec["var_pth"]),
                 "--out", str(tmp_path / "cli")]
                + (["--resolution", str(spec["image_resolution"])] if "image_resolution" in spec else [])) == 0
    converted = Pipeline.from_pretrained(tmp_path / "cli")
    assert converted.method.name == "var" and converted.sampler_config.top_k == 900
    assert converted.sampler_config.cfg_scale == 2.5  # VAR's README cfg=1.5
    for key, value in converted.generator.state_dict().items():
        assert torch.equal(value, pipeline.generator.state_dict()[key])
