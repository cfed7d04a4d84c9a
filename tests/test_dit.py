import pytest
import torch

from effigen.models.dit import DIT_PRESETS, DiT, DiTConfig
from effigen.nn.attention import SelfAttention, attention_backend

from conftest import randomize


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_forward_shapes(patch_size):
    config = DiTConfig(input_size=8, patch_size=patch_size, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=4)
    model = randomize(DiT(config))
    x = torch.randn(3, 3, 8, 8)
    out = model(x, torch.rand(3), torch.tensor([0, 1, 4]))  # 4 = null class
    assert out.shape == (3, 3, 8, 8) and torch.isfinite(out).all()
    learned = DiT(DiTConfig(**{**config.__dict__, "learn_sigma": True}))
    assert learned(x, torch.rand(3), torch.tensor([0, 1, 2])).shape == (3, 6, 8, 8)


def test_adaln_zero_initial_output_is_zero(tiny_dit_config):
    model = DiT(tiny_dit_config)
    out = model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    assert torch.count_nonzero(out) == 0


def test_conditioning_changes_output(tiny_dit_config):
    model = randomize(DiT(tiny_dit_config))
    x = torch.randn(1, 3, 8, 8)
    a = model(x, torch.tensor([0.3]), torch.tensor([0]))
    assert not torch.allclose(a, model(x, torch.tensor([0.3]), torch.tensor([1])))
    assert not torch.allclose(a, model(x, torch.tensor([0.7]), torch.tensor([0])))


def test_wrong_input_shape_is_a_clear_error(tiny_dit_config):
    model = DiT(tiny_dit_config)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(B, 3, 8, 8\)"):
        model(torch.randn(1, 3, 16, 16), torch.rand(1), torch.tensor([0]))


def test_official_parameter_names(tiny_dit_config):
    keys = set(DiT(tiny_dit_config).state_dict())
    for key in ["pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
                "y_embedder.embedding_table.weight", "blocks.0.attn.qkv.weight", "blocks.1.attn.proj.bias",
                "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "blocks.0.adaLN_modulation.1.weight",
                "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"]:
        assert key in keys, key


def test_dit_xl_2_parameter_count_matches_paper():
    # DiT-XL/2 at 256 px (32x32x4 latents, learned sigma): 675M parameters (paper Table 4).
    with torch.device("meta"):
        model = DiT(DiTConfig(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **DIT_PRESETS["DiT-XL/2"]))
    trainable = sum(p.numel() for p in model.parameters())
    assert 674e6 < trainable < 676e6


def test_attention_backends_agree():
    torch.manual_seed(0)
    layer = SelfAttention(32, 4)
    x = torch.randn(2, 10, 32)
    mask = torch.rand(10, 10) > 0.3
    mask |= torch.eye(10, dtype=torch.bool)
    for m in (None, mask):
        with attention_backend("manual"):
            reference = layer(x, m)
        with attention_backend("sdpa"):
            fast = layer(x, m)
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_lightningdit_options_forward_and_names():
    from effigen.models.dit import DIT_PRESETS

    config = DiTConfig(input_size=8, in_channels=3, num_classes=4, **DIT_PRESETS["LightningDiT-Test"])
    model = randomize(DiT(config))
    out = model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 4]))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    keys = set(model.state_dict())
    for key in ["feat_rope.freqs_cos", "blocks.0.norm1.weight", "blocks.0.mlp.w12.weight", "blocks.0.mlp.w3.bias",
                "final_layer.norm_final.weight"]:
        assert key in keys, key
    scale_only = DiT(DiTConfig(input_size=8, in_channels=3, num_classes=4, adaln_shift=False, qk_norm=True,
                               **{**DIT_PRESETS["LightningDiT-Test"]}))
    assert scale_only.blocks[0].adaLN_modulation[1].out_features == 4 * 64
    assert "blocks.0.attn.q_norm.weight" in scale_only.state_dict()


def test_lightningdit_xl_1_parameter_count():
    from effigen.models.dit import DIT_PRESETS

    # LightningDiT-XL/1 on VA-VAE f16d32 latents (16x16x32): ~675M, like DiT-XL/2 (SwiGLU's 2/3 rule).
    with torch.device("meta"):
        model = DiT(DiTConfig(input_size=16, in_channels=32, num_classes=1000, **DIT_PRESETS["LightningDiT-XL/1"]))
    assert 670e6 < sum(p.numel() for p in model.parameters()) < 680e6


def test_rope_is_a_rotation_with_relative_positions():
    from effigen.nn.rope import VisionRoPE2D

    rope = VisionRoPE2D(head_dim=8, grid_size=4)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    qs, ks = rope(q.expand(1, 1, 16, 8)), rope(k.expand(1, 1, 16, 8))
    torch.testing.assert_close(qs.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 16))
    dots = (qs[0, 0] @ ks[0, 0].T)  # (16, 16) over grid positions (row-major 4x4)
    # the score depends only on the offset: (0,0)-(1,1) equals (2,2)-(3,3)
    torch.testing.assert_close(dots[0, 5], dots[10, 15])
    torch.testing.assert_close(dots[1, 4], dots[11, 14])


# ------------------------------------------------------------------------------- bf16 inference fast paths vs eager
def _randomized_dit(preset: str) -> "DiT":
    from effigen.models.dit import DIT_PRESETS, DiT, DiTConfig

    torch.manual_seed(0)
    network = DiT(DiTConfig(input_size=16, in_channels=4, num_classes=10, **DIT_PRESETS[preset])).eval()
    with torch.no_grad():  # adaLN-Zero would make every block the identity
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return network


@pytest.mark.parametrize("preset", ["DiT-Test", "LightningDiT-Test"])
def test_fused_bf16_inference_agrees_with_eager_and_fp32(preset):
    """oneDNN-fused fc1+GELU / SwiGLU, the one-reduction RMSNorm and the sign-folded RoPE (bf16 inference) against
    the eager bf16 ops and the fp32 forward."""
    from effigen.nn.layers import set_fused_inference

    network = _randomized_dit(preset)
    x, t, y = torch.randn(3, 4, 16, 16), torch.rand(3), torch.tensor([1, 2, 10])
    with torch.no_grad():
        reference = network(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = network(x, t, y).float()
            set_fused_inference(False)
            try:
                eager = network(x, t, y).float()
            finally:
                set_fused_inference(True)
    scale = reference.abs().max()
    assert float((fused - reference).abs().max() / scale) < 2e-2
    assert float((fused - eager).abs().max() / scale) < 2e-2
    with torch.no_grad():  # fp32 never takes a fused path: bit-identical with the switch on or off
        set_fused_inference(False)
        try:
            unfused = network(x, t, y)
        finally:
            set_fused_inference(True)
    assert torch.equal(reference, unfused)


def test_fused_weights_are_recast_after_an_update_and_stay_out_of_the_state_dict():
    from effigen.nn.layers import Mlp

    mlp = Mlp(8, 16).eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = mlp(x)
        mlp.fc1.weight.mul_(2.0)  # in place: the cached bf16 copy must follow
        after = mlp(x)
        expected = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x), approximate="tanh"))
    assert not torch.equal(before, after)
    assert torch.allclose(after.float(), expected.float(), atol=3e-2, rtol=3e-2)
    assert set(mlp.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_effigen_linear_is_nn_linear_in_fp32_and_training_and_one_onednn_call_in_bf16_inference():
    from effigen.nn.layers import Linear, set_fused_inference

    torch.manual_seed(0)
    layer, plain = Linear(24, 40), torch.nn.Linear(24, 40)
    plain.load_state_dict(layer.state_dict())
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 5, 24)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))  # fp32: the same kernel
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused, eager = layer(x), plain(x)
            set_fused_inference(False)
            try:
                unfused = layer(x)
            finally:
                set_fused_inference(True)
    assert fused.dtype == eager.dtype == torch.bfloat16 and torch.equal(unfused, eager)
    assert torch.allclose(fused.float(), eager.float(), atol=2e-2, rtol=2e-2)
    assert "_lowp_weights" in layer.__dict__  # bf16 weights held on the module for the next call
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training: autograd's path, gradients reach the fp32 weights
        layer(x).float().square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32


def test_rope_pair_swap_is_bit_identical_to_rotate_pairs():
    from effigen.nn.rope import VisionRoPE2D, rotate_pairs

    rope = VisionRoPE2D(16, 4)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(rope(x), x * rope.freqs_cos + rotate_pairs(x) * rope.freqs_sin)
    xb = x.bfloat16()
    assert torch.equal(rope(xb), xb * rope.freqs_cos.bfloat16() + rotate_pairs(xb) * rope.freqs_sin.bfloat16())
    # tokens-major (B, L, 2, heads, head_dim), the q/k slice of a fused qkv projection: the same numbers
    for dtype in (torch.float32, torch.bfloat16):
        qkv = torch.randn(2, 16, 3, 3, 16).to(dtype)
        q, k = rope.rotate_tokens_major(qkv[:, :, :2]).permute(2, 0, 3, 1, 4).unbind(0)
        assert torch.equal(q, rope(qkv[:, :, 0].transpose(1, 2))) and torch.equal(k, rope(qkv[:, :, 1].transpose(1, 2)))


def test_attention_with_rope_takes_the_tokens_major_path_only_without_qk_norm():
    from effigen.nn.attention import SelfAttention
    from effigen.nn.rope import VisionRoPE2D

    rope, x = VisionRoPE2D(8, 4), torch.randn(2, 16, 16)
    for qk_norm in (False, True):
        torch.manual_seed(0)
        attention = SelfAttention(16, 2, qk_norm=qk_norm).eval()
        calls = []
        rope.rotate_tokens_major = lambda t, f=rope.rotate_tokens_major: calls.append(1) or f(t)
        fast = attention(x, rope=rope)
        del rope.rotate_tokens_major
        qkv = attention.qkv(x).reshape(2, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
        q, k, v = attention.q_norm(qkv[0]), attention.k_norm(qkv[1]), qkv[2]
        q, k = rope(q), rope(k)
        reference = attention.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 16, 16))
        assert bool(calls) is not qk_norm
        assert torch.allclose(fast, reference, atol=1e-6)


def test_flop_counter_counts_the_fused_linears_like_plain_ones():
    from effigen.bench.throughput import count_flops
    from effigen.nn.layers import Mlp, SwiGLU, set_fused_inference

    x = torch.randn(2, 10, 64)
    for module in (Mlp(64, 256).eval(), SwiGLU(64, 170).eval()):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            fused, by_op = count_flops(lambda: module(x))
            set_fused_inference(False)
            try:
                eager, _ = count_flops(lambda: module(x))
            finally:
                set_fused_inference(True)
        assert fused == eager and any("linear_pointwise" in op for op in by_op)


def test_fused_path_leaves_replaced_linear_layers_alone():
    from effigen.nn.layers import Mlp, fused_dtype

    mlp = Mlp(8, 16).eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_dtype(x, mlp) == torch.bfloat16

        class Replaced(torch.nn.Linear):  # e.g. a quantized layer with its own forward
            pass

        replaced = Replaced(8, 16)
        replaced.load_state_dict(mlp.fc1.state_dict())
        mlp.fc1 = replaced
        assert fused_dtype(x, mlp) is None
