"""Teachers (`effigen.teachers`): the interface (shapes, no gradient, eval mode, [-1, 1] input checks), grid
resampling and grid-mapping errors, the built-in teachers (mnist-vit, mnist-net) on the MNIST presets' 8 x 8 student
grids, DINOv2's key mapping between the official and the transformers layouts on randomly initialised weights, the
missing-weights messages, and attention logits that, softmaxed, reproduce each block's attention output."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from effigen.nn.taps import Taps
from effigen.teachers import (
    DINOV2_PRESETS,
    FeatureNetTeacher,
    TeacherError,
    ViTTeacher,
    VisionTransformer,
    check_grid_mapping,
    load_teacher,
    resample_attention_probs,
    resample_tokens,
)
from effigen.teachers.dinov2 import (
    hf_to_official,
    load_dinov2,
    missing_weights_message,
    official_state_dict,
    official_to_hf,
)
from effigen.teachers.vit import IMAGENET_MEAN, IMAGENET_STD, ViTConfig, swiglu_hidden_dim

from conftest import randomize


def _images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def mnist_vit():
    return load_teacher("mnist-vit")


@pytest.fixture(scope="module")
def mnist_net():
    return load_teacher("mnist-net")


def small_dinov2(registers=True, depth=2, swiglu=False, seed=0) -> VisionTransformer:
    """ViT-S/14 (with registers) at reduced depth, random weights (non-zero everywhere)."""
    config = replace(DINOV2_PRESETS["dinov2-vits14-reg" if registers else "dinov2-vits14"], depth=depth)
    if swiglu:  # ViT-g's fused SwiGLU at ViT-S width
        config = replace(config, ffn="swiglu", ffn_hidden_dim=swiglu_hidden_dim(config.embed_dim))
    torch.manual_seed(seed)
    return randomize(VisionTransformer(config), seed).eval()


def _hf_config(config: ViTConfig) -> dict:
    return {"model_type": "dinov2_with_registers" if config.num_register_tokens else "dinov2",
            "hidden_size": config.embed_dim, "num_hidden_layers": config.depth,
            "num_attention_heads": config.num_heads, "mlp_ratio": 4, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
            "image_size": config.image_size, "patch_size": config.patch_size, "num_channels": 3, "qkv_bias": True,
            "layerscale_value": 1.0, "use_swiglu_ffn": config.ffn == "swiglu",
            "num_register_tokens": config.num_register_tokens}


# --------------------------------------------------------------------------- interface


@pytest.mark.parametrize("size", [32, 16])  # pixel DiT 32 px / patch 4 and 16 px / patch 2: both 8 x 8 tokens
def test_builtin_teachers_serve_the_mnist_student_grid(mnist_vit, mnist_net, size):
    images = _images(3, size)
    assert mnist_vit.features(images, grid=8).shape == (3, 64, mnist_vit.embed_dim)
    assert mnist_net.features(images, grid=8).shape == (3, 64, mnist_net.embed_dim)
    logits = mnist_vit.attention_logits(images, [0, mnist_vit.depth - 1], grid=8)
    assert sorted(logits) == [0, mnist_vit.depth - 1]
    assert all(v.shape == (3, mnist_vit.num_heads, 64, 64) for v in logits.values())


def test_builtin_teacher_attributes(mnist_vit, mnist_net):
    assert (mnist_vit.name, mnist_vit.patch_size, mnist_vit.native_grid, mnist_vit.interpolates) == ("mnist-vit", 4, 8, True)
    assert mnist_vit.num_heads > 0 and mnist_vit.depth >= 4
    assert (mnist_net.name, mnist_net.num_heads, mnist_net.native_grid, mnist_net.interpolates) == ("mnist-net", 0, 8, False)
    assert mnist_vit.features(_images()).shape[1] == 64  # grid=None: the native grid


def test_teachers_are_frozen_and_give_no_gradient(mnist_vit, mnist_net):
    for teacher in (mnist_vit, mnist_net):
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        teacher.train()
        assert not teacher.training and not any(m.training for m in teacher.modules())
        images = _images().requires_grad_(True)
        out = teacher.features(images, grid=8)
        assert not out.requires_grad and out.grad_fn is None
    logits = mnist_vit.attention_logits(_images().requires_grad_(True), 1)[1]
    assert not logits.requires_grad


def test_builtin_features_are_deterministic(mnist_vit, mnist_net):
    images = _images(4)
    for spec, teacher in (("mnist-vit", mnist_vit), ("mnist-net", mnist_net)):
        first = teacher.features(images, grid=8)
        assert torch.equal(first, teacher.features(images, grid=8))
        assert torch.equal(first, load_teacher(spec).features(images, grid=8))
        assert torch.isfinite(first).all() and first.std() > 0


def test_mnist_vit_features_are_its_final_normed_patch_tokens(mnist_vit):
    images = _images()
    model = mnist_vit.model
    expected = model.norm(model(images))[:, 1:]  # [-1, 1] images go in as they are (mean = std = 0.5)
    torch.testing.assert_close(mnist_vit.features(images, grid=8), expected, rtol=1e-5, atol=1e-5)


def test_input_checks(mnist_vit):
    with pytest.raises(TeacherError, match="float images"):
        mnist_vit.features(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TeacherError, match=r"\[-1, 1\].*127.5"):
        mnist_vit.features(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(TeacherError, match=r"\(B, 3, H, W\)"):
        mnist_vit.features(torch.zeros(1, 1, 32, 32))
    with pytest.raises(TeacherError, match="positive int"):
        mnist_vit.features(_images(), grid=0)
    mnist_vit.features(_images() * 1.2, grid=8)  # a sampler's overshoot is fine


def test_attention_errors(mnist_vit, mnist_net):
    with pytest.raises(TeacherError, match="no attention maps"):
        mnist_net.attention_logits(_images(), [0])
    with pytest.raises(TeacherError, match="do not exist"):
        mnist_vit.attention_logits(_images(), [mnist_vit.depth])
    with pytest.raises(TeacherError, match="at least one layer"):
        mnist_vit.attention_logits(_images(), [])


# --------------------------------------------------------------------------- grids


def test_fixed_grid_teacher_pools_repeats_or_refuses(mnist_net):
    images = _images()
    native = mnist_net.features(images, grid=8)  # (B, 64, C)
    pooled = mnist_net.features(images, grid=4)
    grid = native.transpose(1, 2).reshape(2, -1, 8, 8)
    torch.testing.assert_close(pooled, F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2))
    repeated = mnist_net.features(images, grid=16).transpose(1, 2).reshape(2, -1, 16, 16)
    torch.testing.assert_close(repeated[..., ::2, ::2], grid)
    torch.testing.assert_close(repeated[..., 1::2, 1::2], grid)
    for bad in (6, 12, 3):
        with pytest.raises(TeacherError, match=r"8x8 token grid cannot map onto the student's .*patch size"):
            mnist_net.features(images, grid=bad)


def test_interpolating_teacher_serves_any_grid(mnist_vit):
    for grid in (4, 6, 8, 12):
        assert mnist_vit.features(_images(), grid=grid).shape == (2, grid * grid, mnist_vit.embed_dim)
        assert mnist_vit.attention_logits(_images(), [2], grid=grid)[2].shape[-1] == grid * grid


def test_check_grid_mapping():
    check_grid_mapping(16, 8)
    check_grid_mapping(8, 16)
    with pytest.raises(TeacherError, match="neither side divides the other"):
        check_grid_mapping(16, 12, "dinov2")


def test_resample_tokens_by_hand():
    tokens = torch.arange(16.0).view(1, 16, 1)  # a 4 x 4 grid of one channel, row-major
    pooled = resample_tokens(tokens, 2).flatten()
    assert pooled.tolist() == [(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4, (8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]
    grown = resample_tokens(torch.tensor([[[1.0], [2.0], [3.0], [4.0]]]), 4).view(4, 4)
    assert grown.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    assert resample_tokens(tokens, 3).shape == (1, 9, 1)  # bilinear otherwise
    with pytest.raises(TeacherError, match="not a square grid"):
        resample_tokens(torch.zeros(1, 15, 2), 2)


def test_resample_attention_probs_rows_sum_to_one(mnist_vit):
    probs = mnist_vit.attention_logits(_images(), [1])[1].softmax(-1)  # (B, H, 64, 64)
    for side in (4, 16):
        out = resample_attention_probs(probs, side)
        assert out.shape == (2, mnist_vit.num_heads, side * side, side * side)
        torch.testing.assert_close(out.sum(-1), torch.ones(out.shape[:-1]))


# --------------------------------------------------------------------------- attention logits


def _check_logits_reproduce_attention(model: VisionTransformer, images: torch.Tensor, teacher: ViTTeacher):
    """softmax(tapped logits) @ v, through the output projection, is each block's attention output; the teacher's
    logits are the patch rows and columns of the tapped ones."""
    inputs, outputs = {}, {}

    def record(index):
        def hook(module, args, output):  # returns None: the forward's output is left alone
            inputs[index], outputs[index] = args[0], output
        return hook

    hooks = [block.attn.register_forward_hook(record(i)) for i, block in enumerate(model.blocks)]
    depth = len(model.blocks)
    try:
        with torch.no_grad():
            _, features = model(images, taps=Taps(attention=range(depth)))
    finally:
        for hook in hooks:
            hook.remove()
    prefix = model.num_prefix_tokens
    for i, block in enumerate(model.blocks):
        attn, x = block.attn, inputs[i]
        B, L, D = x.shape
        v = attn.qkv(x).reshape(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
        mixed = features.attention[i].softmax(-1) @ v  # (B, heads, L, head_dim)
        rebuilt = attn.proj(mixed.transpose(1, 2).reshape(B, L, D))
        torch.testing.assert_close(rebuilt, outputs[i], rtol=1e-4, atol=1e-5)
    pixels = teacher.preprocess(images, model.grid_of(images)[0]) if teacher.mean.numel() else images
    ours = teacher.patch_attention_logits(pixels, list(range(depth)))
    with torch.no_grad():
        _, full = model(pixels, taps=Taps(attention=range(depth)))
    for i in range(depth):
        assert torch.equal(ours[i], full.attention[i][:, :, prefix:, prefix:])


def test_mnist_vit_logits_reproduce_attention(mnist_vit):
    _check_logits_reproduce_attention(mnist_vit.model, _images(), mnist_vit)


def test_dinov2_logits_reproduce_attention_with_registers():
    model = small_dinov2(registers=True)
    _check_logits_reproduce_attention(model, torch.randn(2, 3, 56, 70), ViTTeacher(model, "test"))


def test_teacher_attention_logits_match_the_model(mnist_vit):
    images = _images(size=16)
    logits = mnist_vit.attention_logits(images, [0, 3], grid=8)
    pixels = mnist_vit.preprocess(images, 8)
    assert pixels.shape == (2, 3, 32, 32)
    _, features = mnist_vit.model(pixels, taps=Taps(attention=(0, 3)))
    for i in (0, 3):
        assert torch.equal(logits[i], features.attention[i][:, :, 1:, 1:])


# --------------------------------------------------------------------------- DINOv2


def test_dinov2_preprocess_normalises_and_resizes():
    teacher = ViTTeacher(small_dinov2(), "test")
    images = _images(2, 64)
    pixels = teacher.preprocess(images, 4)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = F.interpolate(((images + 1) / 2 - mean) / std, size=(56, 56), mode="bicubic", antialias=True)
    torch.testing.assert_close(pixels, expected)
    assert teacher.features(images, grid=4).shape == (2, 16, 384)
    assert teacher.attention_logits(images, 1, grid=4)[1].shape == (2, 6, 16, 16)


def test_dinov2_hub_sizes():
    expected = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16), "vitg14": (1536, 40, 24)}
    for size, (width, depth, heads) in expected.items():
        for suffix, registers in (("", 0), ("-reg", 4)):
            config = DINOV2_PRESETS[f"dinov2-{size}{suffix}"]
            assert (config.embed_dim, config.depth, config.num_heads, config.num_register_tokens) == (
                width, depth, heads, registers)
            assert (config.patch_size, config.table_grid, config.layer_scale) == (14, 37, True)
            assert (config.interpolate_antialias, config.interpolate_offset) == ((True, 0.0) if registers else (False, 0.1))
    assert DINOV2_PRESETS["dinov2-vitg14"].ffn == "swiglu" and DINOV2_PRESETS["dinov2-vitg14"].ffn_hidden_dim == 4096
    assert DINOV2_PRESETS["dinov2-vitl14"].ffn_hidden_dim == 4096


def test_position_table_interpolation():
    model = small_dinov2()
    assert model.position_table(37, 37) is model.pos_embed
    table = model.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    rect = model.position_table(12, 20)
    expected = F.interpolate(table, size=(12, 20), mode="bicubic", antialias=True)
    torch.testing.assert_close(rect[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 240, -1))
    assert torch.equal(rect[:, :1], model.pos_embed[:, :1])
    legacy = VisionTransformer(replace(model.config, interpolate_antialias=False, interpolate_offset=0.1))
    legacy.load_state_dict(model.state_dict())
    expected = F.interpolate(table, scale_factor=(12.1 / 37, 20.1 / 37), mode="bicubic", antialias=False)
    torch.testing.assert_close(legacy.position_table(12, 20)[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 240, -1))


@pytest.mark.parametrize("registers,swiglu,names", [(True, False, "weights_in"), (False, False, "weights_in"),
                                                    (True, True, "weights_in"), (False, True, "gate_up")])
def test_key_mapping_round_trip(registers, swiglu, names):
    state = small_dinov2(registers, swiglu=swiglu).state_dict()
    hf = official_to_hf(state, swiglu_names=names)
    assert "embeddings.position_embeddings" in hf and "layernorm.weight" in hf
    assert "encoder.layer.1.attention.attention.value.weight" in hf and "encoder.layer.0.layer_scale2.lambda1" in hf
    assert ("embeddings.register_tokens" in hf) == registers
    if swiglu:
        assert ("encoder.layer.0.mlp.weights_in.weight" in hf) == (names == "weights_in")
        assert ("encoder.layer.0.mlp.gate_proj.weight" in hf) == (names == "gate_up")
    assert not any(k.startswith(("blocks.", "cls_token", "pos_embed")) for k in hf)
    back = hf_to_official(hf)
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)
    prefixed = hf_to_official({f"dinov2.{k}": v for k, v in hf.items()} | {"classifier.weight": torch.zeros(2)})
    assert sorted(prefixed) == sorted(state)


@pytest.mark.parametrize("registers,swiglu", [(True, False), (False, True)])
def test_both_layouts_load_to_the_same_model(tmp_path, registers, swiglu):
    model = small_dinov2(registers, swiglu=swiglu)
    images = torch.randn(2, 3, 70, 42)  # a non-square grid: the position table is interpolated
    with torch.no_grad():
        expected = model.forward_features(images)["x_prenorm"]
    torch.save(model.state_dict(), tmp_path / "official.pth")
    official = load_dinov2(tmp_path / "official.pth", num_heads=6)
    assert official.config == model.config
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_hf_config(model.config)))
    save_file({k: v.contiguous() for k, v in official_to_hf(model.state_dict()).items()}, str(folder / "model.safetensors"))
    hf = load_dinov2(folder)
    with torch.no_grad():
        assert torch.equal(official.forward_features(images)["x_prenorm"], expected)
        if registers:  # Dinov2WithRegistersModel interpolates as the official *_reg models
            assert hf.config == model.config
            assert torch.equal(hf.forward_features(images)["x_prenorm"], expected)
        else:  # Dinov2Model: same weights, transformers' own interpolation; identical on the table's grid
            square = torch.randn(1, 3, 518, 518)
            assert torch.equal(hf(square), model(square))


def test_official_training_checkpoints_unwrap():
    state = small_dinov2(depth=2).state_dict()
    wrapped = {"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, "dino_head.mlp.0.weight": torch.zeros(2)}}
    assert sorted(official_state_dict(wrapped)) == sorted(state)
    chunked = {k.replace("blocks.1.", "blocks.0.1.").replace("blocks.0.norm", "blocks.0.0.norm"): v
               for k, v in state.items()}
    assert sorted(official_state_dict({"model": chunked})) == sorted(state)


def test_unknown_transformers_keys_are_an_error():
    with pytest.raises(TeacherError, match="unknown keys"):
        hf_to_official({"embeddings.cls_token": torch.zeros(1, 1, 4), "encoder.layer.0.attention.rotary.weight": torch.zeros(1)})


# --------------------------------------------------------------------------- loading errors


@pytest.mark.parametrize("spec,url,repo", [
    ("dinov2-vitb14-reg", "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
     "facebook/dinov2-with-registers-base"),
    ("dinov2-vitl14", "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
     "facebook/dinov2-large"),
    ("dinov2-vitg14-reg", "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth",
     "facebook/dinov2-with-registers-giant"),
    ("dinov2-vits14", "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
     "facebook/dinov2-small"),
])
def test_missing_weights_name_the_file_to_download(tmp_path, spec, url, repo):
    for given in (f"{spec}={tmp_path / 'absent.pth'}", spec):
        with pytest.raises(TeacherError) as error:
            load_teacher(given)
        message = str(error.value)
        assert url in message and repo in message and "never downloads" in message
        assert f"--align.teacher={spec}=" in message
    assert "absent.pth" in missing_weights_message(spec, tmp_path / "absent.pth")


def test_wrong_size_and_unknown_names(tmp_path):
    torch.save(small_dinov2(depth=2).state_dict(), tmp_path / "small.pth")
    with pytest.raises(TeacherError, match="2 blocks.*not dinov2-vits14-reg"):
        load_teacher(f"dinov2-vits14-reg={tmp_path / 'small.pth'}")
    with pytest.raises(TeacherError, match="number of attention heads"):
        load_dinov2(tmp_path / "small.pth")
    with pytest.raises(TeacherError, match="unknown teacher.*mnist-vit"):
        load_teacher("dinov3-vitb16=/x")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="junk.pth"):
        load_teacher(f"dinov2-vitb14={tmp_path / 'junk.pth'}")
    with pytest.raises(TeacherError, match="not a teacher file written by effigen"):
        load_teacher(f"mnist-vit={tmp_path / 'small.pth'}")


def test_spec_spellings_are_normalised(tmp_path):
    model = VisionTransformer(DINOV2_PRESETS["dinov2-vits14-reg"])
    torch.save(model.state_dict(), tmp_path / "s.pth")
    for spec in ("dinov2-vits14-reg", "dinov2_vits14_reg", "DINOv2-ViTS14-reg4"):
        teacher = load_teacher(f"{spec}={tmp_path / 's.pth'}")
        assert teacher.name == "dinov2-vits14-reg" and teacher.num_heads == 6 and teacher.native_grid == 37


def test_feature_net_teacher_needs_a_map_of_its_grid():
    from effigen.eval.feature_nets import load_feature_net

    with pytest.raises(TeacherError, match="none of 5 x 5"):
        FeatureNetTeacher(load_feature_net("mnist-net"), 5)


def test_shipped_mnist_vit_matches_its_record():
    import hashlib
    from importlib import resources

    from effigen.eval.feature_nets import load_split
    from effigen.teachers.builtin import classifier_accuracy, load_vit_classifier, teacher_asset

    record = json.loads(resources.files("effigen").joinpath("assets", "teachers.json").read_text())["mnist-vit"]
    path = teacher_asset("mnist-vit")
    assert path.name == record["file"] and path.stat().st_size < 2 * 2**20
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    model, meta = load_vit_classifier(path)
    assert meta["test_accuracy"] == record["test_accuracy"] >= 0.9
    images, labels, _ = load_split("mnist", "test", model.vit.config.image_size)
    assert abs(classifier_accuracy(model, images, labels) - record["test_accuracy"]) <= 2 / len(labels)
