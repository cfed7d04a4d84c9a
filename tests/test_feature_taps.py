"""Feature taps (`effigen.nn.taps`) on every transformer generator: DiT, LightningDiT (RMSNorm, SwiGLU, RoPE, qk-norm,
no shift), VAR, HMAR (both branches) and the raster GPT. A tapped forward returns the same output bit for bit; the
tapped tokens are what a forward hook on the block sees; softmax of the tapped logits (with the layer's mask) times
the layer's values, through its output projection, is the layer's output; bad indices are clear errors; gradients
flow through both kinds of feature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effigen.models.dit import DIT_PRESETS, DiT, DiTConfig
from effigen.models.gpt import GPT, GPT_PRESETS, GPTConfig
from effigen.models.hmar import HMAR, HMAR_PRESETS, HMARConfig
from effigen.models.var import VAR, VAR_PRESETS, VARConfig
from effigen.nn.taps import Features, Taps

from conftest import randomize

SCALES = (1, 2, 4)


@dataclass
class Case:
    model: nn.Module
    run: Callable  # run(taps=None) -> the forward's return value
    path: list  # the blocks along the forward's path, tap index = position here
    attention: Callable  # block -> its attention module
    values: Callable  # (attention module, its input x) -> (v (B, heads, L, head_dim), output projection)
    mask: torch.Tensor | None  # (L, L) bool, True = allowed, or None


def _dit_values(attn, x):
    B, L, D = x.shape
    v = attn.qkv(x).reshape(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    return v, attn.proj


def _var_values(attn, x):
    B, L, D = x.shape
    v = F.linear(x, attn.mat_qkv.weight[2 * D:], attn.v_bias).view(B, L, attn.num_heads, attn.head_dim).transpose(1, 2)
    return v, attn.proj


def _gpt_values(attn, x):
    B, L, D = x.shape
    v = attn.wqkv(x).view(B, L, 3, attn.num_heads, attn.head_dim)[:, :, 2].transpose(1, 2)
    return v, attn.wo


def dit_case(lightning: bool) -> Case:
    if lightning:
        config = DiTConfig(**DIT_PRESETS["LightningDiT-Test"], input_size=8, in_channels=4, num_classes=4, qk_norm=True,
                           adaln_shift=False)
    else:
        config = DiTConfig(**{**DIT_PRESETS["DiT-Test"], "patch_size": 2, "depth": 3}, input_size=8, in_channels=4,
                           num_classes=4, learn_sigma=True)
    model = randomize(DiT(config)).eval()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([1, 4])
    return Case(model, lambda taps=None: model(x, t, y, taps=taps), list(model.blocks), lambda b: b.attn, _dit_values,
                None)


def _scale_inputs(config, seed=1):
    g = torch.Generator().manual_seed(seed)
    L = sum(s * s for s in SCALES)
    return torch.tensor([0, 4]), torch.randn(2, L - 1, config.latent_channels, generator=g)


def var_case() -> Case:
    config = VARConfig(**VAR_PRESETS["VAR-Test"], num_classes=4, vocab_size=32, latent_channels=4, scales=SCALES)
    model = randomize(VAR(config)).eval()
    labels, teacher = _scale_inputs(config)
    return Case(model, lambda taps=None: model(labels, teacher, taps=taps), list(model.blocks), lambda b: b.attn,
                _var_values, model.attention_blocks.dense())


def hmar_case(branch: str) -> Case:
    config = HMARConfig(**{**HMAR_PRESETS["HMAR-Test"], "depth": 3, "n_layers_train": 2}, num_classes=4, vocab_size=32,
                        latent_channels=4, scales=SCALES)
    model = randomize(HMAR(config)).eval()
    labels, teacher = _scale_inputs(config)
    if branch == "next_scale":
        run = lambda taps=None: model(labels, teacher, taps=taps)  # noqa: E731
        blocks = model.ns_blocks
    else:
        _, current = _scale_inputs(config, seed=2)
        masked = torch.zeros(1, config.num_tokens, dtype=torch.bool)
        masked[0, 5:9] = True
        run = lambda taps=None: model(labels, teacher, current, masked, taps=taps)  # noqa: E731
        blocks = model.mask_blocks
    return Case(model, run, [*model.base_blocks, *blocks], lambda b: b.attn, _var_values,
                model.attention_blocks.dense())


def gpt_case() -> Case:
    config = GPTConfig(**GPT_PRESETS["GPT-Test"], num_classes=4, vocab_size=32, scales=(4,))
    model = randomize(GPT(config)).eval()
    labels, tokens = torch.tensor([0, 4]), torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    return Case(model, lambda taps=None: model(labels, tokens, taps=taps), list(model.layers), lambda b: b.attention,
                _gpt_values, model.causal_mask)


CASES = {
    "dit": lambda: dit_case(False),
    "lightningdit": lambda: dit_case(True),
    "var": var_case,
    "hmar-next-scale": lambda: hmar_case("next_scale"),
    "hmar-mask": lambda: hmar_case("mask"),
    "gpt": gpt_case,
}


@pytest.fixture(params=list(CASES))
def case(request) -> Case:
    torch.manual_seed(0)
    return CASES[request.param]()


def every_block(case: Case) -> Taps:
    indices = tuple(range(len(case.path)))
    return Taps(blocks=indices, attention=indices)


def test_output_is_unchanged_bit_for_bit(case):
    with torch.no_grad():
        plain = case.run()
        tapped, features = case.run(every_block(case))
        only_blocks, _ = case.run(Taps(blocks=(0,)))
    assert isinstance(plain, torch.Tensor) and isinstance(features, Features)
    assert torch.equal(plain, tapped) and torch.equal(plain, only_blocks)
    assert sorted(features.blocks) == sorted(features.attention) == list(range(len(case.path)))


def test_block_tokens_equal_a_forward_hook(case):
    seen = {}
    handles = [block.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, out))
               for i, block in enumerate(case.path)]
    try:
        with torch.no_grad():
            _, features = case.run(Taps(blocks=(0, len(case.path) - 1)))
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(features.blocks) == [0, len(case.path) - 1]
    for i, tokens in features.blocks.items():
        assert torch.equal(tokens, seen[i])


def test_softmax_of_logits_rebuilds_the_attention_output(case):
    seen = {}
    handles = [case.attention(block).register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out)))
               for i, block in enumerate(case.path)]
    try:
        with torch.no_grad():
            _, features = case.run(Taps(attention=range(len(case.path))))
    finally:
        for handle in handles:
            handle.remove()
    for i, logits in features.attention.items():
        attn = case.attention(case.path[i])
        x, expected = seen[i]
        B, L, D = x.shape
        assert logits.shape == (B, attn.num_heads, L, L) and logits.dtype == torch.float32
        if case.mask is not None:  # the taps leave masks out: the caller applies them
            logits = logits.masked_fill(~case.mask, float("-inf"))
        with torch.no_grad():
            v, projection = case.values(attn, x)
            rebuilt = projection((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D))
        torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["blocks", "attention"])
@pytest.mark.parametrize("index", [-1, "depth"])
def test_bad_index_is_a_clear_error(case, kind, index):
    depth = len(case.path)
    index = depth if index == "depth" else index
    with pytest.raises(ValueError, match=rf"has {depth} blocks.*0\.\.{depth - 1}"):
        case.run(Taps(**{kind: (index,)}))


def test_taps_must_be_a_request():
    case = var_case()
    with pytest.raises(TypeError, match="Taps"):
        case.run({"blocks": (0,)})


def test_gradients_flow_through_the_features(case):
    case.model.train()
    first = case.path[0]
    _, features = case.run(Taps(blocks=(0,)))
    features.blocks[0].square().mean().backward()
    grads = {name: p.grad for name, p in first.named_parameters() if p.grad is not None}
    assert grads and any(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in case.path[-1].parameters())  # nothing after the tapped block
    case.model.zero_grad(set_to_none=True)
    _, features = case.run(Taps(attention=(0,)))
    features.attention[0].square().mean().backward()
    qkv = [p for name, p in case.attention(first).named_parameters() if "qkv" in name]
    assert qkv and all(p.grad is not None and p.grad.abs().sum() > 0 for p in qkv)


def test_logits_are_computed_only_for_requested_layers(case, monkeypatch):
    import effigen.models.gpt as gpt
    import effigen.models.var as var
    import effigen.nn.attention as attention

    calls = []
    original = attention.attention_logits

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for module in (attention, var, gpt):
        monkeypatch.setattr(module, "attention_logits", counting)
    with torch.no_grad():
        case.run()
        case.run(Taps(blocks=(0,)))
        assert not calls
        case.run(Taps(attention=(len(case.path) - 1,)))
    assert len(calls) == 1


def test_taps_normalises_indices():
    assert Taps(blocks=3, attention=[2, 0, 2]) == Taps(blocks=(3,), attention=(0, 2))
    with pytest.raises(TypeError):
        Taps(blocks=(1.5,))
