"""Parity of effigen's DINOv2 (`teachers/vit.py`, `teachers/dinov2.py`) with facebookresearch/dinov2 (official `.pth`
layout: `forward_features` at every resolution, non-square included, `get_intermediate_layers`, the interpolated
position table, the last block's attention logits) and with transformers' `Dinov2WithRegistersModel` / `Dinov2Model`
(a `save_pretrained` folder: `last_hidden_state`, `pooler_output`, `hidden_states`). Every size, setting, output name
and tolerance comes from the folder's manifest; each output the manifest lists is checked, and a folder holding an
output this test does not know fails."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from effigen.nn.taps import Taps
from effigen.teachers import TeacherError, ViTTeacher, load_teacher
from effigen.teachers.dinov2 import DINOV2_PRESETS, load_dinov2, official_state_dict, official_to_hf, read_dinov2

from .common import discover, folder, manifest, vectors_path

pytestmark = pytest.mark.parity


def _official_model(path, spec, **overrides):
    d = spec["dinov2"]
    settings = {"interpolate_antialias": d["interpolate_antialias"], "interpolate_offset": d["interpolate_offset"]}
    return load_dinov2(path / spec["checkpoint"], num_heads=d["num_heads"], **{**settings, **overrides})


@pytest.fixture(params=discover("dinov2-official"))
def official(request):
    path = folder(request.param)
    spec = manifest(path)
    return path, spec, load_file(str(vectors_path(path, spec))), _official_model(path, spec)


@pytest.fixture(params=discover("dinov2-hf"))
def hf(request):
    path = folder(request.param)
    spec = manifest(path)
    model_folder = path / spec["checkpoint"].split()[0]  # "dinov2-with-registers/ (config.json + model.safetensors)"
    return path, spec, load_file(str(vectors_path(path, spec))), model_folder, load_dinov2(model_folder)


def _check_all(spec: dict, vectors: dict, compute) -> None:
    """compute(tag, what) -> tensor for every `<tag>.<what>` of the manifest's tolerance table; every failure listed."""
    tolerances = spec["tolerance"]["max_abs"]
    inputs = {k for k in vectors if re.match(r"^(images|pixel_values)_", k)}
    unchecked = sorted(set(vectors) - inputs - set(tolerances))
    assert not unchecked, f"outputs without a tolerance in the manifest: {unchecked}"
    failures = []
    with torch.no_grad():
        for key, limit in tolerances.items():
            tag, what = key.split(".", 1)
            out, ref = compute(tag, what), vectors[key]
            if tuple(out.shape) != tuple(ref.shape):
                failures.append(f"{key}: shape {tuple(out.shape)} vs reference {tuple(ref.shape)}")
                continue
            error = float((out.float() - ref).abs().max())
            if not error <= limit:
                failures.append(f"{key}: max |diff| {error:.3g} > {limit:.3g}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- official layout

def test_official_config_is_read_off_the_weights(official):
    _, spec, _, model = official
    d, config = spec["dinov2"], model.config
    assert (config.image_size, config.patch_size, config.embed_dim, config.depth, config.num_heads) == (
        d["img_size"], d["patch_size"], d["embed_dim"], d["depth"], d["num_heads"])
    assert config.num_register_tokens == d["num_register_tokens"]
    assert config.layer_scale == bool(d["init_values"])
    assert config.ffn == ("mlp" if d["ffn_layer"] == "mlp" else "swiglu")
    if config.ffn == "mlp":
        assert config.ffn_hidden_dim == int(d["embed_dim"] * d["mlp_ratio"])
    assert config.qkv_bias == d["qkv_bias"] and config.layer_norm_eps == d["layer_norm_eps"]
    assert [d["pos_embed_grid"]] == [[config.table_grid] * 2]
    assert ("tanh" in d.get("act", "")) == (config.activation == "gelu_tanh")
    for tag, shape in spec["inputs"].items():
        assert model.grid_of(torch.zeros(1, 3, shape["height"], shape["width"])) == tuple(shape["grid"]), tag


def test_official_outputs(official):
    _, spec, vectors, model = official
    cache = {}

    def compute(tag, what):
        x = vectors[f"images_{tag}"]
        if tag not in cache:
            layers = sorted({int(m.group(1)) for k in vectors for m in [re.match(rf"^{tag}\.intermediate\.(\d+)\.", k)]
                             if m})
            cache[tag] = (model.forward_features(x),
                          model.get_intermediate_layers(x, n=layers, reshape=True, return_class_token=True, norm=True)
                          if layers else (), layers)
        features, intermediate, layers = cache[tag]
        if what in features:
            return features[what]
        if what == "pos_embed_interpolated":
            return model.position_table(*model.grid_of(x))
        match = re.fullmatch(r"intermediate\.(\d+)\.(patch|cls)", what)
        if match:
            patch, cls = intermediate[layers.index(int(match.group(1)))]
            return patch if match.group(2) == "patch" else cls
        if what == "attn_logits_last_block":
            last = model.config.depth - 1
            return model(x, taps=Taps(attention=last))[1].attention[last]
        raise AssertionError(f"unknown output {tag}.{what} in the manifest")

    for tag, shape in spec["inputs"].items():
        assert tuple(vectors[f"images_{tag}"].shape) == (shape["batch"], 3, shape["height"], shape["width"]), tag
    _check_all(spec, vectors, compute)


def test_teacher_patch_tokens_and_logits_drop_cls_and_registers(official):
    """The teacher's features are x_norm_patchtokens; its attention logits the reference's patch rows and columns."""
    _, spec, vectors, model = official
    teacher = ViTTeacher(model, "parity")
    limits, prefix = spec["tolerance"]["max_abs"], 1 + spec["dinov2"]["num_register_tokens"]
    with torch.no_grad():
        for tag in spec["inputs"]:
            tokens = teacher.patch_tokens(vectors[f"images_{tag}"])
            assert (tokens - vectors[f"{tag}.x_norm_patchtokens"]).abs().max() <= limits[f"{tag}.x_norm_patchtokens"]
        for key in (k for k in vectors if k.endswith(".attn_logits_last_block")):
            tag, last = key.split(".")[0], model.config.depth - 1
            logits = teacher.patch_attention_logits(vectors[f"images_{tag}"], [last])[last]
            assert (logits - vectors[key][:, :, prefix:, prefix:]).abs().max() <= limits[key]


def test_interpolation_settings_matter(official):
    """The manifest's interpolation (antialias, offset) is needed: the other one misses the tolerance at a grid that
    is not the table's."""
    path, spec, vectors, _ = official
    d = spec["dinov2"]
    other = _official_model(path, spec, interpolate_antialias=not d["interpolate_antialias"])
    tags = [t for t, s in spec["inputs"].items() if s["grid"] != d["pos_embed_grid"]]
    assert tags
    with torch.no_grad():
        for tag in tags:
            error = (other.forward_features(vectors[f"images_{tag}"])["x_norm_patchtokens"]
                     - vectors[f"{tag}.x_norm_patchtokens"]).abs().max()
            assert error > spec["tolerance"]["max_abs"][f"{tag}.x_norm_patchtokens"], tag


def test_official_weights_through_the_transformers_layout(official, tmp_path):
    """The official state dict renamed to hub names in a save_pretrained-style folder loads to the same numbers."""
    path, spec, vectors, model = official
    d = spec["dinov2"]
    state = official_state_dict(torch.load(path / spec["checkpoint"], map_location="cpu", weights_only=True))
    if not d["init_values"]:  # transformers' DINOv2 always has layer scale: identity gammas stand in
        for i in range(d["depth"]):
            state[f"blocks.{i}.ls1.gamma"] = state[f"blocks.{i}.ls2.gamma"] = torch.ones(d["embed_dim"])
    registers = d["num_register_tokens"]
    config = {"model_type": "dinov2_with_registers" if registers else "dinov2", "hidden_size": d["embed_dim"],
              "num_hidden_layers": d["depth"], "num_attention_heads": d["num_heads"], "mlp_ratio": d["mlp_ratio"],
              "hidden_act": "gelu", "layer_norm_eps": d["layer_norm_eps"], "image_size": d["img_size"],
              "patch_size": d["patch_size"], "num_channels": 3, "qkv_bias": d["qkv_bias"],
              "layerscale_value": d["init_values"], "use_swiglu_ffn": d["ffn_layer"] != "mlp",
              "num_register_tokens": registers}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in official_to_hf(state).items()}, str(tmp_path / "model.safetensors"))
    mapped = load_dinov2(tmp_path)
    same_interpolation = (mapped.config.interpolate_antialias, mapped.config.interpolate_offset) == (
        d["interpolate_antialias"], d["interpolate_offset"])
    with torch.no_grad():
        for tag, shape in spec["inputs"].items():
            if same_interpolation or shape["grid"] == d["pos_embed_grid"]:
                x = vectors[f"images_{tag}"]
                assert torch.equal(mapped.forward_features(x)["x_prenorm"], model.forward_features(x)["x_prenorm"]), tag


def test_named_teacher_checks_the_architecture(official):
    path, spec, _, _ = official
    wrong = next(name for name, preset in DINOV2_PRESETS.items() if preset.embed_dim != spec["dinov2"]["embed_dim"])
    with pytest.raises(TeacherError, match=f"not {wrong}"):
        load_teacher(f"{wrong}={path / spec['checkpoint']}")


# --------------------------------------------------------------------------- transformers layout

def test_hf_config_is_read_from_config_json(hf):
    _, spec, _, _, model = hf
    c, config = spec["config"], model.config
    assert (config.embed_dim, config.depth, config.num_heads, config.patch_size) == (
        c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["patch_size"])
    assert config.table_grid == c["image_size"] // c["patch_size"]
    assert config.num_register_tokens == c.get("num_register_tokens", 0)
    assert config.ffn == ("swiglu" if c["use_swiglu_ffn"] else "mlp") and config.qkv_bias == c["qkv_bias"]
    assert config.layer_norm_eps == c["layer_norm_eps"]
    if not c["use_swiglu_ffn"]:
        assert config.ffn_hidden_dim == int(c["hidden_size"] * c["mlp_ratio"])
    for tag, shape in spec["inputs"].items():
        assert model.grid_of(torch.zeros(1, 3, shape["height"], shape["width"])) == tuple(shape["grid"]), tag


def test_hf_outputs(hf):
    _, spec, vectors, _, model = hf
    cache = {}

    def compute(tag, what):
        if tag not in cache:
            cache[tag] = model.hidden_states(vectors[f"pixel_values_{tag}"])
        states = cache[tag]
        if what == "last_hidden_state":
            return model.norm(states[-1])
        if what == "pooler_output":
            return model.norm(states[-1])[:, 0]
        match = re.fullmatch(r"hidden_states\.(\d+)", what)
        if match:
            return states[int(match.group(1))]
        raise AssertionError(f"unknown output {tag}.{what} in the manifest")

    for tag, shape in spec["inputs"].items():
        assert tuple(vectors[f"pixel_values_{tag}"].shape) == (shape["batch"], 3, shape["height"], shape["width"])
    _check_all(spec, vectors, compute)


def test_hf_weights_through_the_official_layout(hf, tmp_path):
    """The folder's weights renamed to official names in a .pth give the same numbers (the manifest's
    cross-check against the official model)."""
    _, spec, vectors, model_folder, model = hf
    _, state = read_dinov2(model_folder)  # the weights in official names (model.safetensors, shards or .bin)
    torch.save(state, tmp_path / "official.pth")
    interpolation = {"interpolate_antialias": model.config.interpolate_antialias,
                     "interpolate_offset": model.config.interpolate_offset}
    official = load_dinov2(tmp_path / "official.pth", num_heads=model.config.num_heads, **interpolation)
    with torch.no_grad():
        for tag in spec["inputs"]:
            x = vectors[f"pixel_values_{tag}"]
            assert torch.equal(official.forward_features(x)["x_prenorm"], model(x)), tag
