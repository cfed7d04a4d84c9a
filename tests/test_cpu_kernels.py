"""The fused C kernels of effigen.nn.cpu_kernels against fp32 references and against the eager bf16 ops they replace:
each must be at least as close to the fp32 result as the eager bf16 chain (they round once, the chain at every op),
handle every tail and odd shape, and step aside (None / False) where it does not apply."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from effigen.nn import cpu_kernels
from effigen.nn.layers import set_fused_inference

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason=f"fused CPU kernels unavailable here: {cpu_kernels.unavailable_reason()}")


def _error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x.float() - reference).abs().max())


@needs_kernels
def test_rope_kernel_is_closer_to_fp32_than_the_eager_bf16_rotation():
    from effigen.nn.rope import VisionRoPE2D

    torch.manual_seed(0)
    rope = VisionRoPE2D(32, 4, rows=3)  # 12 tokens, head_dim 32
    qkv = torch.randn(2, 12, 3, 5, 32).bfloat16()
    reference = rope.rotate_tokens_major(qkv[:, :, :2].float()).permute(2, 0, 3, 1, 4)  # (2, B, H, L, D)
    eager = rope.rotate_tokens_major(qkv[:, :, :2]).permute(2, 0, 3, 1, 4)
    q, k = rope.rotate_qk_fused(qkv)
    assert q.shape == k.shape == (2, 5, 12, 32) and q.dtype == torch.bfloat16
    fused = torch.stack((q, k))
    assert _error(fused, reference) <= _error(eager, reference)
    # one rounding of the fp32 result: within half a bf16 ulp (2^-9 relative) of it
    assert torch.all((fused.float() - reference).abs() <= reference.abs() * 2.0**-8 + 1e-6)
    # not applicable: fp32 input, a head dim that is not a multiple of 16, tables of another length
    assert rope.rotate_qk_fused(qkv.float()) is None
    assert cpu_kernels.rope_qk(torch.randn(2, 12, 3, 5, 8).bfloat16(), rope.freqs_cos[:, :8], rope.freqs_sin[:, :8]) is None
    assert cpu_kernels.rope_qk(qkv[:, :6], rope.freqs_cos, rope.freqs_sin) is None


@needs_kernels
def test_attention_takes_the_rope_kernel_in_bf16_inference_only():
    from effigen.nn.attention import SelfAttention
    from effigen.nn.rope import VisionRoPE2D

    torch.manual_seed(0)
    rope, attention = VisionRoPE2D(16, 4), SelfAttention(64, 4).eval()
    x = torch.randn(3, 16, 64)
    calls = []
    original = cpu_kernels.rope_qk
    cpu_kernels.rope_qk = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            reference = attention(x, rope=rope)
            assert not calls  # fp32: the eager rotation
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fused = attention(x, rope=rope).float()
                assert len(calls) == 1
                set_fused_inference(False)
                try:
                    eager = attention(x, rope=rope).float()
                finally:
                    set_fused_inference(True)
                assert len(calls) == 1
    finally:
        cpu_kernels.rope_qk = original
    scale = reference.abs().max()
    assert _error(fused, reference) / scale < 2e-2
    assert _error(fused, reference) <= 1.5 * _error(eager, reference)


@needs_kernels
@pytest.mark.parametrize("name", ["gelu_tanh", "silu"])
def test_activation_kernels_round_the_fp32_activation_once(name):
    torch.manual_seed(0)
    values = torch.cat([torch.randn(1000) * 4, torch.linspace(-90, 90, 181), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    x = values.bfloat16()  # 1185 elements: a tail of 1 after the 16-wide vectors
    reference = F.gelu(x.float(), approximate="tanh") if name == "gelu_tanh" else F.silu(x.float())
    eager = F.gelu(x, approximate="tanh") if name == "gelu_tanh" else F.silu(x)
    out = x.clone()
    assert getattr(cpu_kernels, f"{name}_")(out)
    assert _error(out, reference) <= _error(eager, reference)
    assert torch.all((out.float() - reference).abs() <= reference.abs() * 2.0**-8 + 1e-6)
    strided = x.clone()[::2]
    assert not getattr(cpu_kernels, f"{name}_")(strided)  # not contiguous: left to the caller
    assert not getattr(cpu_kernels, f"{name}_")(x.float())


@needs_kernels
@pytest.mark.parametrize("shape,groups,affine", [((16, 160, 8, 8), 32, True), ((1, 48, 5, 7), 8, True),
                                                 ((3, 32, 9, 2), 32, False)])
def test_group_norm_kernel_matches_fp32_group_norm_and_silu(shape, groups, affine):
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(groups, shape[1], eps=1e-6, affine=affine)
    if affine:
        norm.weight.data.normal_()
        norm.bias.data.normal_()
    x = (torch.randn(shape) * 3 + 1.5).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for silu in (True, False):
            reference = norm(x.float())
            reference = F.silu(reference) if silu else reference
            eager = F.silu(norm(x)) if silu else norm(x)
            out = cpu_kernels.group_norm(x, norm, silu)
            assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
            assert _error(out, reference) <= _error(eager, reference) + 1e-6
        assert cpu_kernels.group_norm(x.contiguous(), norm, True) is None  # NCHW: the eager ops
        assert cpu_kernels.group_norm(x.float().contiguous(memory_format=torch.channels_last), norm, True) is None


@needs_kernels
def test_mlp_and_decoder_use_the_kernels_in_bf16_inference_and_agree_with_eager():
    from effigen.nn.layers import Mlp
    from effigen.tokenizers.autoencoder import ConvAutoencoderSpec, Decoder

    torch.manual_seed(0)
    mlp = Mlp(32, 128).eval()
    spec = ConvAutoencoderSpec(base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1, resolution=16,
                               decoder_in_channels=4, out_channels=3, attention_resolutions=(8,))
    decoder = Decoder(spec).eval().to(memory_format=torch.channels_last)
    x, z = torch.randn(2, 7, 32), torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    counts = {"gelu": 0, "norm": 0}
    gelu, norm = cpu_kernels.gelu_tanh_, cpu_kernels.group_norm
    cpu_kernels.gelu_tanh_ = lambda t: counts.__setitem__("gelu", counts["gelu"] + 1) or gelu(t)
    cpu_kernels.group_norm = lambda *a: counts.__setitem__("norm", counts["norm"] + 1) or norm(*a)
    try:
        with torch.no_grad():
            references = mlp(x), decoder(z)
            assert counts == {"gelu": 0, "norm": 0}  # fp32 never
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fused = mlp(x).float(), decoder(z).float()
                assert counts["gelu"] == 1 and counts["norm"] > 0
                set_fused_inference(False)
                try:
                    eager = mlp(x).float(), decoder(z).float()
                finally:
                    set_fused_inference(True)
    finally:
        cpu_kernels.gelu_tanh_, cpu_kernels.group_norm = gelu, norm
    for f, e, r in zip(fused, eager, references):
        scale = r.abs().max()
        assert _error(f, r) / scale < 3e-2 and _error(e, r) / scale < 3e-2
        assert _error(f, r) <= 1.5 * _error(e, r)


def _child(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@needs_kernels
def test_kernel_library_is_built_once_into_the_cache_and_can_be_switched_off(tmp_path):
    probe = "from effigen.nn import cpu_kernels as k; print(k.available(), k.unavailable_reason())"
    first = _child(probe, EFFIGEN_KERNEL_CACHE=str(tmp_path))
    assert first.returncode == 0 and first.stdout.split()[0] == "True", first.stderr
    built = list(tmp_path.glob("effigen_cpu_kernels_*.so"))
    assert len(built) == 1 and not list(tmp_path.glob(".build-*"))  # renamed into place, no temporary left
    stamp = built[0].stat().st_mtime_ns
    again = _child(probe, EFFIGEN_KERNEL_CACHE=str(tmp_path))
    assert again.stdout.split()[0] == "True" and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    off = _child(probe, EFFIGEN_KERNEL_CACHE=str(tmp_path), EFFIGEN_CPU_KERNELS="off")
    assert off.stdout.startswith("False") and "EFFIGEN_CPU_KERNELS=off" in off.stdout
    bad = _child(probe, EFFIGEN_KERNEL_CACHE=str(tmp_path), EFFIGEN_CPU_KERNELS="fast")
    assert bad.returncode != 0 and "'auto'" in bad.stderr and "'off'" in bad.stderr


@pytest.mark.skipif(shutil.which("gcc") is None or platform.machine() != "x86_64", reason="needs gcc on x86-64")
def test_a_cpu_without_avx512_loads_no_kernels_and_samples_with_the_eager_ops(tmp_path):
    # the compiler targets AVX2 only (a later -march wins): the library builds without its vector kernels
    script = tmp_path / "cc"
    script.write_text(f"#!/bin/sh\nexec {shutil.which('gcc')} \"$@\" -march=x86-64-v3\n")
    script.chmod(0o755)
    code = ("import warnings, torch\nfrom effigen.nn import cpu_kernels as k\n"
            "print(k.available(), 'AVX-512' in k.unavailable_reason(), k.attention_kernels())\n"
            "from effigen.nn.layers import Mlp\nm = Mlp(16, 32).eval()\n"
            "with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):\n    print(m(torch.randn(2, 16)).dtype)\n")
    result = _child(code, EFFIGEN_KERNEL_CACHE=str(tmp_path / "cache"), CC=str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "()", "torch.bfloat16"]


def test_a_failing_compiler_warns_once_and_leaves_the_eager_ops(tmp_path):
    script = tmp_path / "cc"
    script.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo broken 1.0; exit 0; }\necho 'cc: no' >&2; exit 1\n")
    script.chmod(0o755)
    code = ("import warnings, torch\nfrom effigen.nn import cpu_kernels as k\n"
            "with warnings.catch_warnings(record=True) as caught:\n    warnings.simplefilter('always')\n"
            "    a, b = k.available(), k.available()\n"
            "print(a, b, len(caught), 'EFFIGEN_CPU_KERNELS=off' in str(caught[0].message))\n"
            "from effigen.nn.layers import Mlp\nm = Mlp(16, 32).eval()\n"
            "with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):\n    print(m(torch.randn(2, 16)).dtype)\n")
    result = _child(code, EFFIGEN_KERNEL_CACHE=str(tmp_path / "cache"), CC=str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "1", "True", "torch.bfloat16"]
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written left behind


@needs_kernels
def test_silu_mul_kernel_is_swiglus_activation():
    torch.manual_seed(0)
    for h in (64, 40):  # a 16-wide tail and an 8-wide one
        x = (torch.randn(3, 5, 2 * h) * 3).bfloat16()
        gate, value = x.float().chunk(2, dim=-1)
        reference = F.silu(gate) * value
        eager = F.silu(x[..., :h]) * x[..., h:]
        out = cpu_kernels.silu_mul(x)
        assert out.shape == (3, 5, h) and _error(out, reference) <= _error(eager, reference)
    assert cpu_kernels.silu_mul(x[..., :-1]) is None  # odd width


@needs_kernels
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_modulate_kernel_matches_the_fp32_adaln_input(kind):
    torch.manual_seed(0)
    B, L, D = 3, 7, 48
    x = (torch.randn(B, L, D) * 4 + 2).bfloat16()  # an offset mean: the two-pass variance must not cancel
    modulation = torch.randn(B, 1, 3 * D).bfloat16()
    shift, scale, _ = modulation.chunk(3, dim=-1)  # strided views, as DiTBlock's chunks
    gain = torch.randn(D) if kind == "rmsnorm" else None
    normalized = (F.layer_norm(x.float(), (D,), eps=1e-6) if kind == "layernorm"
                  else F.rms_norm(x.float(), (D,), gain, eps=1e-6))
    for sh in (shift, None):
        reference = normalized * (1 + scale.float()) + (0 if sh is None else sh.float())
        out = cpu_kernels.norm_modulate(x, sh, scale, kind, 1e-6, gain)
        assert out.dtype == torch.bfloat16 and _error(out, reference) <= 2.0**-7 * float(reference.abs().max())
    assert cpu_kernels.norm_modulate(x, shift.expand(B, L, D), scale.expand(B, L, D), kind, 1e-6, gain) is None


@needs_kernels
@pytest.mark.parametrize("preset", ["DiT-B/2", "LightningDiT-B/2"])
def test_dit_block_kernels_agree_with_eager_bf16_and_fp32(preset):
    from effigen.models.dit import DIT_PRESETS, DiT, DiTConfig

    torch.manual_seed(0)
    config = {**DIT_PRESETS[preset], "depth": 2, "hidden_size": 64, "num_heads": 4}
    network = DiT(DiTConfig(input_size=8, in_channels=4, num_classes=10, **config)).eval()
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 3])
    with torch.no_grad():
        reference = network(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = network(x, t, y).float()
            cpu_kernels.set_enabled(False)
            try:
                onednn_only = network(x, t, y).float()
            finally:
                cpu_kernels.set_enabled(True)
    scale = reference.abs().max()
    assert _error(fused, reference) / scale < 2e-2
    assert _error(fused, reference) <= 1.5 * _error(onednn_only, reference)


@needs_kernels
def test_l2norm_qk_kernel_is_vars_normalised_attention_input():
    torch.manual_seed(0)
    qkv = (torch.randn(2, 9, 3, 4, 32) * 3).bfloat16()
    qkv[0, 0, 1, 0] = 0  # a zero key: divided by the 1e-12 floor, as F.normalize
    q_scale = torch.tensor([4.0, 1.0, 100.0, 0.5])
    q, k, _ = qkv.float().permute(2, 0, 3, 1, 4).unbind(0)
    reference = torch.stack((F.normalize(q, dim=-1) * q_scale.view(1, 4, 1, 1), F.normalize(k, dim=-1)))
    out = cpu_kernels.l2norm_qk(qkv, q_scale)
    assert out.shape == (2, 2, 4, 9, 32) and torch.isfinite(out.float()).all()
    assert torch.all((out.float() - reference).abs() <= reference.abs() * 2.0**-8 + 1e-6)
    assert cpu_kernels.l2norm_qk(qkv, q_scale[:3]) is None


@needs_kernels
def test_var_attention_takes_the_l2norm_kernel_in_bf16_inference():
    from effigen.models.var import VARAttention

    torch.manual_seed(0)
    attention = VARAttention(64, 4, l2_norm=True).eval()
    with torch.no_grad():
        attention.q_bias.normal_()
        attention.v_bias.normal_()
    x = torch.randn(2, 10, 64)
    calls = []
    original = cpu_kernels.l2norm_qk
    cpu_kernels.l2norm_qk = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            reference = attention(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fused = attention(x).float()
                cpu_kernels.set_enabled(False)
                try:
                    eager = attention(x).float()
                finally:
                    cpu_kernels.set_enabled(True)
    finally:
        cpu_kernels.l2norm_qk = original
    assert len(calls) == 2  # the fp32 call does not reach it; the disabled one returns None inside
    assert _error(fused, reference) / reference.abs().max() < 2e-2
    assert _error(fused, reference) <= 1.5 * _error(eager, reference)


ATTENTION_KERNELS = [pytest.param(name, marks=pytest.mark.skipif(
    name not in cpu_kernels.attention_kernels(), reason=f"this CPU (or compiler) has no {name} attention kernel: "
    f"{cpu_kernels.unavailable_reason() or 'the instructions are missing'}")) for name in ("amx", "avx512_bf16")]


@pytest.mark.parametrize("kernel", ATTENTION_KERNELS)
@pytest.mark.parametrize("B,H,Lq,Lk,D", [(2, 3, 1, 1, 64), (2, 3, 5, 7, 64), (1, 2, 37, 100, 72), (2, 2, 17, 130, 40),
                                         (1, 1, 64, 680, 64), (1, 2, 10, 10, 256), (1, 1, 3, 65, 2)])
def test_attention_kernel_matches_fp32_softmax_attention(kernel, B, H, Lq, Lk, D):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D).mul(2).bfloat16() for L in (Lq, Lk, Lk))
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.3)
    eager = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    out = cpu_kernels.attention(q, k, v, 0.3, kernel=kernel)
    assert out.shape == (B, H, Lq, D) and out.dtype == torch.bfloat16
    assert out.transpose(1, 2).is_contiguous()  # (B, L, heads, D) underneath: the output projection copies nothing
    assert _error(out, reference) <= 1.5 * _error(eager, reference) + 1e-3
    # the default scale is 1 / sqrt(D)
    default = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert _error(cpu_kernels.attention(q, k, v, kernel=kernel), default) <= 1.5 * _error(eager, reference) + 1e-3


@pytest.mark.parametrize("kernel", ATTENTION_KERNELS)
def test_attention_kernel_reads_projection_and_kv_cache_views_and_leaves_onednn_intact(kernel):
    from effigen.nn.attention import LayerKVCache

    torch.manual_seed(0)
    qkv = torch.randn(2, 48, 3, 4, 64).bfloat16()  # a qkv projection's output (B, L, 3, heads, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided (B, heads, L, D) views
    cache = LayerKVCache(capacity=100)
    cache.append(k[:, :, :20].contiguous(), v[:, :, :20].contiguous())
    k_seen, v_seen = cache.append(k[:, :, 20:].contiguous(), v[:, :, 20:].contiguous())  # views of the buffers
    assert not k_seen.is_contiguous()
    w, x = torch.randn(96, 64).bfloat16(), torch.randn(33, 64).bfloat16()
    before = F.linear(x, w)  # oneDNN's AMX GEMM; the AMX kernel restores the tile configuration it found
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    for keys, values in ((k, v), (k_seen, v_seen)):
        out = cpu_kernels.attention(q, keys, values, kernel=kernel)
        assert _error(out, reference) <= 1.5 * _error(F.scaled_dot_product_attention(q, k, v), reference) + 1e-3
    assert torch.equal(F.linear(x, w), before)
    # not applicable: fp32, an odd head dim, keys and values of different lengths
    assert cpu_kernels.attention(q.float(), k.float(), v.float(), kernel=kernel) is None
    assert cpu_kernels.attention(q[..., :63], k[..., :63], v[..., :63], kernel=kernel) is None
    assert cpu_kernels.attention(q, k, v[:, :, :40], kernel=kernel) is None


def _allowed(Lq: int, Lk: int, seed: int = 1) -> torch.Tensor:
    mask = torch.rand(Lq, Lk, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[:, 0] = True  # every query keeps a key
    return mask


@pytest.mark.parametrize("kernel", ATTENTION_KERNELS)
@pytest.mark.parametrize("Lq,Lk,D,masked", [(5, 7, 64, False), (37, 100, 72, True), (64, 680, 64, False),
                                            (17, 17, 2, True)])
def test_attention_kernel_mask_and_log_sum_exp_match_fp32(kernel, Lq, Lk, D, masked):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, L, D).mul(2).bfloat16() for L in (Lq, Lk, Lk))
    mask = _allowed(Lq, Lk) if masked else None
    scores = (q.float() @ k.float().transpose(-2, -1)) * 0.3
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    reference = scores.softmax(-1) @ v.float()
    eager = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    out, lse = cpu_kernels.attention(q, k, v, 0.3, kernel=kernel, mask=mask, return_lse=True)
    assert _error(out, reference) <= 1.5 * _error(eager, reference) + 1e-3
    assert lse.shape == (2, 3, Lq) and lse.dtype == torch.float32
    assert _error(lse, scores.logsumexp(-1)) < 2e-3
    # a mask per head is not taken (None: the caller runs SDPA)
    assert cpu_kernels.attention(q, k, v, mask=torch.ones(2, 3, Lq, Lk, dtype=torch.bool), kernel=kernel) is None


needs_backward = pytest.mark.skipif("avx512_bf16" not in cpu_kernels.attention_kernels(),
                                    reason="the attention backward kernel needs AVX-512 BF16")
training_kernels = cpu_kernels.attention_kernels() == ("avx512_bf16",)  # bf16 training takes them (not on AMX)


def _fp32_gradients(q, k, v, grad, mask, scale):
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).backward(grad.float())
    return q.grad, k.grad, v.grad


@needs_backward
@pytest.mark.parametrize("B,H,Lq,Lk,D,masked", [(2, 3, 1, 1, 64, False), (2, 3, 40, 40, 64, False),
                                                (1, 2, 37, 53, 48, True), (1, 1, 17, 5, 30, False),
                                                (2, 2, 100, 300, 64, True), (1, 2, 70, 70, 128, False),
                                                (1, 1, 9, 33, 2, True)])
def test_attention_backward_kernel_is_as_close_to_fp32_as_torchs_bf16_backward(B, H, Lq, Lk, D, masked):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D).bfloat16() for L in (Lq, Lk, Lk))
    grad = torch.randn(B, H, Lq, D).bfloat16()
    mask = _allowed(Lq, Lk) if masked else None
    out, lse = cpu_kernels.attention(q, k, v, 0.3, mask=mask, return_lse=True, kernel="avx512_bf16")
    grads = cpu_kernels.attention_backward(q, k, v, out, grad, lse, mask, 0.3)
    reference = _fp32_gradients(q, k, v, grad, mask, 0.3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=0.3).backward(grad)
    for mine, torchs, exact in zip(grads, (t.grad for t in leaves), reference):
        assert mine.shape == exact.shape and mine.dtype == torch.bfloat16
        assert mine.transpose(1, 2).is_contiguous()  # (B, L, heads, D) underneath, as the qkv projection's gradient
        # (+ a floor: with one key dq is exactly 0, and both sides leave bf16 rounding residue of ~1e-6)
        assert _error(mine, exact) <= 1.5 * _error(torchs, exact) + 1e-3 * float(exact.abs().max()) + 1e-4
    # strided inputs (a qkv projection's views) give the same gradients
    qkv = torch.stack((q, k, v), dim=3).transpose(1, 2) if Lq == Lk else None  # (B, L, heads, 3, D)
    if qkv is not None:
        qs, ks, vs = qkv.transpose(1, 2).unbind(3)
        assert not qs.is_contiguous()
        again = cpu_kernels.attention_backward(qs, ks, vs, out, grad, lse, mask, 0.3)
        assert all(torch.equal(a, b) for a, b in zip(again, grads))
    # not applicable: fp32, keys and values of different lengths, a mask per head
    assert cpu_kernels.attention_backward(q.float(), k.float(), v.float(), out.float(), grad.float(), lse) is None
    assert cpu_kernels.attention_backward(q, k, v[:, :, :-1], out, grad, lse) is None
    assert cpu_kernels.attention_backward(q, k, v, out, grad, lse, torch.ones(2, Lq, Lk, dtype=torch.bool)) is None
    limit = cpu_kernels._BACKWARD_SCORES_LIMIT
    cpu_kernels._BACKWARD_SCORES_LIMIT = 64 * 64 - 1  # a sequence too long for a thread's dS buffer: torch's backward
    try:
        assert cpu_kernels.attention_backward(q, k, v, out, grad, lse, mask, 0.3) is None
    finally:
        cpu_kernels._BACKWARD_SCORES_LIMIT = limit


@pytest.mark.skipif(not training_kernels, reason="bf16 training attention takes the C kernels only where the CPU has "
                    "AVX-512 BF16 and no AMX")
@pytest.mark.parametrize("pattern", [None, "block_causal", "block_diagonal"])
def test_bf16_training_attention_runs_the_kernels_and_matches_fp32_gradients(pattern):
    from effigen.nn.attention import BlockMask, attention

    torch.manual_seed(0)
    blocks = None if pattern is None else BlockMask((1, 4, 9, 16, 25, 36, 64, 100), pattern)
    L = 64 if blocks is None else blocks.length
    q, k, v = (torch.randn(2, 3, L, 64).bfloat16().requires_grad_() for _ in range(3))
    grad = torch.randn(2, 3, L, 64).bfloat16()
    reference = _fp32_gradients(q, k, v, grad, None if blocks is None else blocks.dense(), None)
    calls = []
    original = cpu_kernels.attention_backward
    cpu_kernels.attention_backward = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        attention(q, k, v, blocks).backward(grad)
    finally:
        cpu_kernels.attention_backward = original
    assert calls  # every group's backward ran the kernel
    mine = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    cpu_kernels.set_enabled(False)  # torch's CPU flash attention
    try:
        attention(q, k, v, blocks).backward(grad)
    finally:
        cpu_kernels.set_enabled(True)
    for ours, torchs, exact in zip(mine, (t.grad for t in (q, k, v)), reference):
        assert _error(ours, exact) <= 1.5 * _error(torchs, exact) + 1e-3 * float(exact.abs().max())
    # where the kernels do not apply inside the autograd function (an odd head dim), torch's flash ops run instead
    q, k, v = (torch.randn(1, 2, 20, 63).bfloat16().requires_grad_() for _ in range(3))
    grad = torch.randn(1, 2, 20, 63).bfloat16()
    attention(q, k, v).backward(grad)
    for ours, exact in zip((q.grad, k.grad, v.grad), _fp32_gradients(q, k, v, grad, None, None)):
        assert _error(ours, exact) < 2e-2 * float(exact.abs().max())
    # the kernel's forward, then torch's backward from its log-sum-exp (a sequence too long for the backward kernel)
    q, k, v = (torch.randn(1, 2, 70, 64).bfloat16().requires_grad_() for _ in range(3))
    grad = torch.randn(1, 2, 70, 64).bfloat16()
    limit, cpu_kernels._BACKWARD_SCORES_LIMIT = cpu_kernels._BACKWARD_SCORES_LIMIT, 0
    try:
        attention(q, k, v).backward(grad)
    finally:
        cpu_kernels._BACKWARD_SCORES_LIMIT = limit
    for ours, exact in zip((q.grad, k.grad, v.grad), _fp32_gradients(q, k, v, grad, None, None)):
        assert _error(ours, exact) < 2e-2 * float(exact.abs().max())


def test_fp32_and_no_grad_attention_never_take_the_training_kernels():
    from effigen.nn import attention as attention_module

    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    assert not attention_module._kernel_training(q, q, q, None)  # fp32: torch's flash kernel, bit-for-bit as before
    with torch.no_grad():
        assert not attention_module._kernel_training(q.bfloat16(), q.bfloat16(), q.bfloat16(), None)
    qb = q.detach().bfloat16().requires_grad_()
    assert not attention_module._kernel_training(qb, qb, qb, torch.ones(2, 8, 8, dtype=torch.bool))  # per head


def test_attention_kernel_names_are_checked():
    q = torch.randn(1, 1, 4, 8).bfloat16()
    if cpu_kernels.attention_kernels():
        with pytest.raises(ValueError, match="does not run here"):
            cpu_kernels.attention(q, q, q, kernel="tpu")
    else:
        assert cpu_kernels.attention(q, q, q) is None


@pytest.mark.skipif(not cpu_kernels.attention_kernels(), reason="no attention kernel on this CPU (AMX or AVX-512 BF16)")
def test_attention_dispatches_to_the_kernel_in_bf16_inference_and_training():
    from effigen.nn import attention as attention_module

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 32).bfloat16() for _ in range(3))
    calls = []
    original = cpu_kernels.attention
    cpu_kernels.attention = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        with torch.no_grad():
            fused = attention_module.attention(q, k, v)
            assert len(calls) == 1
            attention_module.attention(q, k, v, torch.ones(24, 24, dtype=torch.bool).tril())  # a shared mask: kernel
            assert len(calls) == 2
            attention_module.attention(q, k, v, torch.ones(2, 1, 24, 24, dtype=torch.bool))  # per batch: SDPA
            attention_module.attention(q.float(), k.float(), v.float())  # fp32: SDPA (kernel not reached)
            with attention_module.attention_backend("manual"):
                attention_module.attention(q, k, v)
            set_fused_inference(False)
            try:
                attention_module.attention(q, k, v)
            finally:
                set_fused_inference(True)
        attention_module.attention(q.requires_grad_(), k, v)  # gradients: the training kernels (forward + backward)
        assert len(calls) == (4 if training_kernels else 3)
    finally:
        cpu_kernels.attention = original
    reference = F.scaled_dot_product_attention(q.detach().float(), k.float(), v.float())
    assert _error(fused, reference) <= 1.5 * _error(F.scaled_dot_product_attention(q.detach(), k, v), reference) + 1e-3


def test_attention_with_the_kernels_off_is_sdpa_exactly():
    from effigen.nn import attention as attention_module

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 32).bfloat16() for _ in range(3))
    cpu_kernels.set_enabled(False)
    try:
        assert cpu_kernels.attention(q, k, v) is None  # the caller runs SDPA
        with torch.no_grad():
            assert torch.equal(attention_module.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    finally:
        cpu_kernels.set_enabled(True)


def test_flop_counting_sees_attention_and_norms_where_the_kernels_run():
    # a dispatch mode (here the FLOP counter of the benchmarks) gets the aten ops: the ctypes calls would hide them
    from effigen.bench.throughput import count_flops
    from effigen.nn import attention as attention_module

    q = torch.randn(2, 4, 32, 64).bfloat16()
    with torch.no_grad():
        total, by_op = count_flops(lambda: attention_module.attention(q, q, q))
    assert total == 4 * 2 * 4 * 32 * 32 * 64 and len(by_op) == 1


# ---------------------------------------------------------------------------------------------- token sampling
def _draw_both(logits, uncond, weight, top_k, top_p, temperature, draws=2, seed=5):
    """`draws` successive draws (tokens, confidence) from one noise stream, with the kernel and with the eager ops."""
    from effigen.samplers.tokens import SampleNoise, sample_tokens_scored

    results = []
    for enabled in (True, False):
        cpu_kernels.set_enabled(enabled)
        try:
            noise = SampleNoise(torch.Generator().manual_seed(seed), logits.shape[0])
            results.append([sample_tokens_scored(logits, noise, top_k, top_p, temperature, uncond, weight)
                            for _ in range(draws)])
        finally:
            cpu_kernels.set_enabled(True)
    return results


@needs_kernels
@pytest.mark.parametrize("top_k,top_p,temperature,guided", [
    (0, 0.0, 1.0, False), (1, 0.0, 1.0, True), (20, 0.0, 1.0, False), (0, 0.9, 1.0, True), (20, 0.8, 1.0, True),
    (299, 0.5, 0.7, True), (300, 0.96, 1.0, True), (50, 0.96, 0.0, False), (7, 0.0, 2.0, True), (900, 0.96, 1.0, True)])
def test_token_sampling_kernel_draws_the_eager_tokens(top_k, top_p, temperature, guided):
    # logits rounded to bf16 (as a bf16 network's are) tie often, also at the k-th value; the kernel must keep every
    # tie, cut top-p where the eager chain does, consume the same noise and give each token the same probability
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 40, 300, generator=generator) * 3).bfloat16().float()
    uncond = (torch.randn(3, 40, 300, generator=generator) * 3).bfloat16().float() if guided else None
    fused, eager = _draw_both(logits, uncond, 0.7, top_k, top_p, temperature)
    for (tokens, confidence), (tokens_eager, confidence_eager) in zip(fused, eager):
        assert tokens.dtype == torch.int64 and tokens.shape == (3, 40)
        assert torch.equal(tokens, tokens_eager)
        assert torch.allclose(confidence, confidence_eager, rtol=1e-5, atol=1e-7)
    assert not torch.equal(fused[0][0], fused[1][0]) or top_k == 1 or temperature == 0  # fresh noise, second draw


@needs_kernels
def test_token_sampling_kernel_keeps_every_tie_of_the_kth_value_and_samples_the_softmax():
    from effigen.samplers.tokens import SampleNoise, sample_tokens

    row = torch.tensor([5.0, 4.0, 4.0, 4.0, 3.0, 4.0, -1.0, 2.0])  # top-2: 5 and all four 4s survive
    logits = row.expand(1, 20000, 8).contiguous()
    tokens = sample_tokens(logits, SampleNoise(torch.Generator().manual_seed(1), 1), top_k=2)
    frequencies = tokens.flatten().bincount(minlength=8).float() / tokens.numel()
    expected = torch.where(row >= 4.0, row, torch.tensor(float("-inf"))).softmax(-1)
    assert torch.allclose(frequencies, expected, atol=0.015)
    # top-p over the survivors: {5: 0.47, 4: 0.13 each}; p = 0.5 keeps 5 and (ties in some order) one 4
    kept = sample_tokens(logits, SampleNoise(torch.Generator().manual_seed(2), 1), top_k=2, top_p=0.5).unique()
    assert kept[0] == 0 and len(kept) == 2 and row[kept[1]] == 4.0


@needs_kernels
def test_token_sampling_rejects_nan_logits_with_and_without_the_kernel():
    from effigen.samplers.tokens import SampleNoise, sample_tokens

    logits = torch.randn(2, 3, 16)
    logits[1, 2, 5] = float("nan")
    for enabled in (True, False):
        cpu_kernels.set_enabled(enabled)
        try:
            with pytest.raises(ValueError, match="contain NaN"):
                sample_tokens(logits, SampleNoise(torch.Generator().manual_seed(0), 2), top_k=4, top_p=0.9)
        finally:
            cpu_kernels.set_enabled(True)


def test_token_sampling_kernel_steps_aside_where_it_does_not_apply():
    logits = torch.randn(2, 3, 16)
    uniform = torch.rand(2, 3, 16)
    assert cpu_kernels.sample_tokens(logits.bfloat16(), uniform, 4, 0.9, 1.0, False) is None  # fp32 only
    assert cpu_kernels.sample_tokens(logits, uniform[:, :2], 4, 0.9, 1.0, False) is None  # shapes disagree
    assert cpu_kernels.sample_tokens(logits, None, 4, 0.9, 1.0, False) is None  # no noise for a random draw
    cpu_kernels.set_enabled(False)
    try:
        assert cpu_kernels.sample_tokens(logits, uniform, 4, 0.9, 1.0, False) is None
    finally:
        cpu_kernels.set_enabled(True)


@needs_kernels
def test_gelu_training_kernels_are_as_close_to_fp32_as_torchs_bf16_ops():
    torch.manual_seed(0)
    x = (torch.randn(3, 37, 129) * 3).bfloat16()  # odd sizes: vector tails
    x.view(-1)[:4] = torch.tensor([0.0, -12.0, 12.0, 1e-3]).bfloat16()
    grad = torch.randn_like(x)
    exact_x = x.float().requires_grad_()
    F.gelu(exact_x, approximate="tanh").backward(grad.float())
    exact = F.gelu(x.float(), approximate="tanh")
    out = cpu_kernels.gelu_tanh(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert _error(out, exact) <= 1.5 * _error(F.gelu(x, approximate="tanh"), exact) + 1e-6
    dx = cpu_kernels.gelu_tanh_backward(grad, x)
    torch_dx = torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
    assert _error(dx, exact_x.grad) <= 1.5 * _error(torch_dx, exact_x.grad) + 1e-6
    assert cpu_kernels.gelu_tanh(x.float()) is None and cpu_kernels.gelu_tanh_backward(grad, x[:1]) is None


def _check_bf16_training_module(module_class, args, inputs: torch.Tensor, backward_event: str) -> None:
    """`module_class(*args)` trained one step in bf16 autocast with the C kernels on and off: `backward_event` runs
    only with them on, and its parameter gradients are as close to the fp32 module's as the eager bf16 ones."""
    module = module_class(*args).train()
    grads = {}
    for enabled in (True, False):
        cpu_kernels.set_enabled(enabled)
        try:
            module.zero_grad()
            with torch.profiler.profile() as prof:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = module(inputs)
                out.float().square().sum().backward()
        finally:
            cpu_kernels.set_enabled(True)
        assert (backward_event in {event.name for event in prof.events()}) == enabled
        grads[enabled] = [p.grad.clone() for p in module.parameters()]
    reference = module_class(*args)
    reference.load_state_dict(module.state_dict())
    reference(inputs).square().sum().backward()  # fp32
    for ours, eager, exact in zip(grads[True], grads[False], (p.grad for p in reference.parameters())):
        assert _error(ours, exact) <= 1.5 * _error(eager, exact) + 1e-3 * float(exact.abs().max())


@needs_kernels
def test_mlp_bf16_training_takes_the_gelu_kernels_and_matches_the_eager_gradients():
    from effigen.nn.layers import Mlp

    torch.manual_seed(0)
    _check_bf16_training_module(Mlp, (32, 96), torch.randn(4, 10, 32), "effigen::gelu_tanh_backward")


@needs_kernels
def test_swiglu_training_kernels_match_fp32_gradients_as_closely_as_torchs_bf16_ops():
    from effigen.nn.layers import SwiGLU

    torch.manual_seed(0)
    x = (torch.randn(5, 7, 2 * 45) * 3).bfloat16()  # h = 45: vector tails
    grad = torch.randn(5, 7, 45).bfloat16()
    exact_x = x.float().requires_grad_()
    gate, value = exact_x.chunk(2, dim=-1)
    (F.silu(gate) * value).backward(grad.float())
    eager_x = x.clone().requires_grad_()
    gate, value = eager_x.chunk(2, dim=-1)
    (F.silu(gate) * value).backward(grad)
    ours = cpu_kernels.silu_mul_backward(grad, x)
    assert ours.shape == x.shape and ours.dtype == torch.bfloat16
    assert _error(ours, exact_x.grad) <= 1.5 * _error(eager_x.grad, exact_x.grad) + 1e-6
    assert cpu_kernels.silu_mul_backward(grad[..., :44], x) is None
    # the module in bf16 autocast training: the kernels run, the gradients match fp32 as closely as the eager ones
    _check_bf16_training_module(SwiGLU, (32, 48), torch.randn(3, 9, 32), "effigen::silu_mul_backward")


@needs_kernels
@pytest.mark.parametrize("V,smoothing", [(4096, 0.0), (37, 0.1), (5, 0.0)])
def test_token_cross_entropy_kernels_match_torchs_fp32_loss_and_gradient(V, smoothing):
    from effigen.nn.losses import token_cross_entropy

    torch.manual_seed(0)
    logits = (torch.randn(3, 41, V) * 4).bfloat16().requires_grad_()
    target = torch.randint(0, V, (3, 41))
    weights = torch.rand(3 * 41)
    exact = logits.detach().float().requires_grad_()
    reference = F.cross_entropy(exact.reshape(-1, V), target.reshape(-1), reduction="none", label_smoothing=smoothing)
    (reference * weights).sum().backward()
    with torch.profiler.profile() as prof:
        per_token = token_cross_entropy(logits, target, smoothing, "none")
        (per_token * weights).sum().backward()
    assert {"effigen::cross_entropy", "effigen::cross_entropy_backward"} <= {event.name for event in prof.events()}
    assert per_token.dtype == torch.float32 and per_token.shape == (3 * 41,)
    torch.testing.assert_close(per_token, reference.detach(), rtol=1e-5, atol=1e-5)
    assert logits.grad.dtype == torch.bfloat16
    # the gradient is the fp32 one rounded to bf16 once (torch's chain rounds the same fp32 values)
    assert _error(logits.grad, exact.grad) <= 1.01 * float((exact.grad.bfloat16().float() - exact.grad).abs().max()) + 1e-7
    # the mean, and fp32 logits or no gradients: torch's op, exactly
    mean = token_cross_entropy(logits, target, smoothing)
    torch.testing.assert_close(mean, reference.detach().mean(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(token_cross_entropy(logits, target, smoothing),
                           F.cross_entropy(logits.reshape(-1, V).float(), target.reshape(-1), label_smoothing=smoothing))
    # an out-of-range target gets torch's error, not a read past the row
    with pytest.raises((IndexError, RuntimeError)):
        token_cross_entropy(logits, torch.full((3, 41), V), smoothing)
    # fp32 logits under bf16 autocast (VAR's and HMAR's heads return fp32, as the official VAR does): the kernels,
    # in fp32; in plain fp32 training, torch's op
    logits32 = logits.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
        per_token = token_cross_entropy(logits32, target, smoothing, "none")
        (per_token * weights).sum().backward()
    assert "effigen::cross_entropy_backward" in {event.name for event in prof.events()}
    torch.testing.assert_close(per_token, reference.detach(), rtol=1e-5, atol=1e-5)
    assert logits32.grad.dtype == torch.float32
    torch.testing.assert_close(logits32.grad, exact.grad, rtol=1e-4, atol=1e-6)
    with torch.profiler.profile() as prof:
        token_cross_entropy(logits32, target, smoothing).backward()
    assert "effigen::cross_entropy" not in {event.name for event in prof.events()}
