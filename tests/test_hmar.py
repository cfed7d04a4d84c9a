"""HMAR: block-sparse attention against dense masked attention, the Markov property, the masked-refinement sampler
(schedule validation, re-masking the least confident tokens, editing), the lognorm weighting and the stage-2 masks,
the two training stages end to end from the CLI (freezing, init_from), sampling with several schedules, and the
official-checkpoint converter on non-official sizes. Parity with the official code is tests/parity/test_hmar_parity.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from effigen.training.run import build_and_train
from effigen.config import ConfigError
from effigen.convert.hmar_official import convert_hmar_official
from effigen.training.experiment import build_experiment_dict, parse_experiment
from effigen.io import CheckpointError, load_weights
from effigen.models.hmar import HMAR, HMAR_PRESETS, HMARConfig, is_mask_branch
from effigen.models.var import VAR, VAR_PRESETS, VARConfig
from effigen.nn.attention import BlockMask, attention, attention_backend
from effigen.objectives.hmar import HMARObjective, HMARObjectiveConfig, draw_masks
from effigen.objectives.next_scale import scale_loss_weights
from effigen.objectives.vq_tokenizer import MSVQ_PRESETS
from effigen.pipeline import Pipeline
from effigen.rng import BatchRandom
from effigen.samplers import hmar as hmar_sampler
from effigen.samplers.hmar import (HMARSamplerConfig, default_mask_schedule, parse_mask_schedule, sample_hmar,
                                   validate_mask_schedule)
from effigen.samplers.next_scale import EditSpec
from effigen.samplers.tokens import SampleNoise
from effigen.tokenizers.msvq import MultiScaleVQ, MultiScaleVQConfig
from effigen.training.trainer import list_checkpoints

from conftest import randomize

SCALES = (1, 2, 4)
SPLIT = [1, 4, 16]


def tiny_models(seed: int = 0, **overrides) -> tuple[MultiScaleVQ, HMAR]:
    torch.manual_seed(seed)
    tokenizer = MultiScaleVQ(MultiScaleVQConfig(**MSVQ_PRESETS["MSVQ-Test"], resolution=8)).eval()
    config = HMARConfig(**{**HMAR_PRESETS["HMAR-Test"], "num_classes": 4, "vocab_size": 32, "latent_channels": 4,
                           "scales": SCALES, **overrides})
    return tokenizer, randomize(HMAR(config), seed, std=0.05).eval()


def random_indices(batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 32, (batch, s * s), generator=generator) for s in SCALES]


def greedy(**overrides) -> HMARSamplerConfig:
    return HMARSamplerConfig(**{"cfg_scale": 1.0, "top_k": 1, "top_p": 0.0, **overrides})


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("pattern", ["block_diagonal", "block_causal"])
@pytest.mark.parametrize("backend", ["sdpa", "manual"])
def test_block_sparse_attention_equals_dense_masked_attention(pattern, backend):
    sizes = (1, 4, 9, 16, 25, 36, 64)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, sum(sizes), 8, generator=generator, requires_grad=True) for _ in range(3))
    dense_mask = BlockMask(sizes, pattern).dense()
    levels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    expected = levels[:, None] == levels[None, :] if pattern == "block_diagonal" else levels[:, None] >= levels[None, :]
    assert torch.equal(dense_mask, expected)
    with attention_backend(backend):
        dense = attention(q, k, v, dense_mask, scale=0.4)
        grads_dense = torch.autograd.grad(dense.square().sum(), (q, k, v))
        for min_group in (None, 1, 20, 1000):  # one call per block, grouped, everything in one group
            blocks = BlockMask(sizes, pattern, min_group)
            out = attention(q, k, v, blocks, scale=0.4)
            torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
            for a, b in zip(torch.autograd.grad(out.square().sum(), (q, k, v)), grads_dense):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert [g[:2] for g in BlockMask(sizes, pattern, 64).groups()] == [(0, 91), (91, 155)]
    with pytest.raises(ValueError, match="cover 155 tokens"):
        attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], BlockMask(sizes, pattern))
    with pytest.raises(ValueError, match="unknown block pattern"):
        BlockMask(sizes, "diagonal")


def test_var_teacher_forcing_with_block_causal_attention_equals_the_dense_mask():
    torch.manual_seed(0)
    config = VARConfig(**VAR_PRESETS["VAR-Test"], num_classes=4, vocab_size=32, latent_channels=4, scales=SCALES)
    network = randomize(VAR(config), 0, std=0.05).eval()
    assert network.attention_blocks.pattern == "block_causal"
    labels, teacher = torch.tensor([0, 3]), torch.randn(2, 20, 4)
    with torch.no_grad():
        blocks = network(labels, teacher)
        network.attention_blocks = network.attention_blocks.dense()
        dense = network(labels, teacher)
    torch.testing.assert_close(blocks, dense, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- network
def test_markov_property_a_scale_sees_only_its_own_input():
    """Scale k's logits depend on the class and scale k's input (the accumulated reconstruction) alone: other tokens at
    earlier scales with the same scale-k input give the same scale-k logits (VAR's would change)."""
    tokenizer, network = tiny_models()
    quant, labels = tokenizer.quantize, torch.tensor([1, 2])
    a, b = random_indices(seed=0), random_indices(seed=1)
    teacher_a, teacher_b = quant.teacher_forcing_input(a), quant.teacher_forcing_input(b)
    mixed = teacher_b.clone()
    mixed[:, 4:] = teacher_a[:, 4:]  # scales 1-2 differ (other tokens, other inputs); scale 3's input is a's
    with torch.no_grad():
        out_a, out_mixed = network(labels, teacher_a), network(labels, mixed)
    assert not torch.allclose(out_a[:, 1:5], out_mixed[:, 1:5], atol=1e-3)  # scale 2 sees its own (other) input
    torch.testing.assert_close(out_mixed[:, 5:], out_a[:, 5:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_mixed[:, :1], out_a[:, :1], atol=1e-6, rtol=1e-6)

    torch.manual_seed(0)
    var = randomize(VAR(VARConfig(**VAR_PRESETS["VAR-Test"], num_classes=4, vocab_size=32, latent_channels=4,
                                  scales=SCALES)), 0, std=0.05).eval()
    with torch.no_grad():
        assert not torch.allclose(var(labels, teacher_a)[:, 5:], var(labels, mixed)[:, 5:], atol=1e-3)

    # the mask branch is Markovian too, and masking a position changes the logits of its own scale only
    current = quant.current_scale_inputs(a)
    none = torch.zeros(1, 21, dtype=torch.bool)
    some = none.clone()
    some[0, [2, 7, 9]] = True
    with torch.no_grad():
        plain, masked = network(labels, teacher_a, current, none), network(labels, teacher_a, current, some)
        mixed_masked = network(labels, mixed, current, some)
    assert not torch.allclose(plain[:, 1:5], masked[:, 1:5], atol=1e-4) and not torch.allclose(plain[:, 5:], masked[:, 5:])
    torch.testing.assert_close(mixed_masked[:, 5:], masked[:, 5:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="first scale cannot be masked"):
        network(labels, teacher_a, current, torch.ones(1, 21, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs `masked`"):
        network(labels, teacher_a, current)
    with pytest.raises(ValueError, match="teacher input must be"):
        network(labels, teacher_a[:, :4])


def test_single_step_sampling_equals_teacher_forcing_per_scale(monkeypatch):
    """Without refinement, each scale's next-scale pass on its own tokens gives the teacher-forced logits of that
    scale (block-diagonal attention, no cache)."""
    tokenizer, network = tiny_models()
    labels = torch.tensor([0, 3, 1])
    records, original = [], network.next_scale_logits
    monkeypatch.setattr(network, "next_scale_logits", lambda x, c, mask=None: records.append(original(x, c)) or records[-1])
    f_hat, indices = sample_hmar(network, tokenizer, labels, greedy(mask_schedule=[[1], [4], [16]]), return_indices=True)
    monkeypatch.undo()
    assert [tuple(r.shape) for r in records] == [(3, s * s, 32) for s in SCALES]
    assert all(torch.equal(i, r.argmax(-1)) for i, r in zip(indices, records))
    with torch.no_grad():
        forced = network(labels, tokenizer.quantize.teacher_forcing_input(indices))
        torch.testing.assert_close(f_hat, tokenizer.latent_from_indices(indices), atol=1e-5, rtol=1e-5)
    for k, part in enumerate(torch.split(forced, SPLIT, dim=1)):
        torch.testing.assert_close(records[k], part, atol=1e-4, rtol=1e-4)


def test_presets_and_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())
    shapes = dict(num_classes=10, vocab_size=512, latent_channels=16, scales=(1, 2, 3, 4, 5, 6, 8))  # mnist-var's
    var = count(VAR(VARConfig(**VAR_PRESETS["VAR-d4"], **shapes)))
    hmar = count(HMAR(HMARConfig(**HMAR_PRESETS["HMAR-d4"], **shapes)))
    assert abs(hmar / var - 1) < 0.1, (hmar, var)
    config = HMARConfig(**HMAR_PRESETS["HMAR-d16"], num_classes=1000)
    assert (config.embed_dim, config.num_heads, config.n_layers_train, config.depth) == (1024, 16, 8, 16)
    assert [HMARConfig(depth=d).n_layers_train for d in (2, 4, 16, 30)] == [1, 2, 8, 8]  # the depth dial
    with pytest.raises(ValueError, match="n_layers_train=5 must be in"):
        HMARConfig(depth=4, n_layers_train=5)


# ---------------------------------------------------------------------------------------------- schedules
def test_schedule_validation_errors_say_what_is_wrong():
    assert validate_mask_schedule(None, SCALES) == [[1], [1, 3], [16]]
    assert default_mask_schedule((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) == [[1], [1, 3], [1, 1, 2, 5], [16], [25], [36], [64],
                                                                         [100], [169], [256]]  # the official default
    assert validate_mask_schedule([[1], [2, 2], [4, 4, 8]], SCALES) == [[1], [2, 2], [4, 4, 8]]
    cases = [([[1], [4]], r"has 2 entries but the model has 3 scales \(1, 2, 4\)"),
             ([[1], [1, 3], [4, 4, 7]], r"mask_schedule\[2\] = \[4, 4, 7\] sums to 15, but scale 2 \(4x4\) has 16 tokens"),
             ([[1], [0, 4], [16]], r"mask_schedule\[1\] = \[0, 4\]: a scale's entry is a non-empty list of positive"),
             ([[1], [], [16]], r"mask_schedule\[1\] = \[\]"),
             ([[1], [4], [16.5]], r"mask_schedule\[2\]")]
    for schedule, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate_mask_schedule(schedule, SCALES)
    with pytest.raises(ConfigError, match=r"first scale cannot be refined .* use \[4\]"):
        validate_mask_schedule([[1, 3], [9], [16]], (2, 3, 4))
    # the sampler validates before any work; the pipeline too
    tokenizer, network = tiny_models()
    with pytest.raises(ConfigError, match="sums to 15"):
        sample_hmar(network, tokenizer, torch.tensor([0]), greedy(mask_schedule=[[1], [4], [15]]))
    # command-line forms
    assert parse_mask_schedule("1/1,3/4,4,8") == [[1], [1, 3], [4, 4, 8]]
    assert parse_mask_schedule("[[1], [4], [2, 14]]") == [[1], [4], [2, 14]]
    assert parse_mask_schedule("off") == "off" and parse_mask_schedule(" default") == "default"
    assert validate_mask_schedule("off", SCALES) == [[1], [4], [16]]
    assert validate_mask_schedule("default", SCALES) == [[1], [1, 3], [16]]
    with pytest.raises(ConfigError, match="cannot read the schedule"):
        parse_mask_schedule("1/1;3")
    with pytest.raises(ConfigError, match="mask_schedule 'of': use a list of step lists"):
        validate_mask_schedule("of", SCALES)


class StubNetwork:
    """A network whose next-scale and mask logits are given, for checking which positions get re-masked."""

    def __init__(self, ns_logits: dict[int, torch.Tensor], mask_logits: list[torch.Tensor]):
        self.scales, self.null_class = SCALES, 4
        self.ns_logits, self.mask_queue, self.masked = ns_logits, list(mask_logits), []

    def class_condition(self, labels):
        return torch.zeros(labels.shape[0], 8)

    def first_tokens(self, cond):
        return torch.zeros(cond.shape[0], 1, 8)

    def scale_tokens(self, si, features):
        return torch.zeros(features.shape[0], features.shape[1], 8)

    def mask_tokens(self, si, previous, current, masked):
        self.masked.append((si, masked.clone()))
        return torch.zeros(masked.shape[0], masked.shape[1], 8)

    def next_scale_logits(self, x, cond):
        return self.ns_logits[x.shape[1]]

    def mask_logits(self, x, cond):
        return self.mask_queue.pop(0)


def peaked(confidence: torch.Tensor, token: torch.Tensor, vocab: int = 32) -> torch.Tensor:
    """Logits whose softmax gives `token` the probability `confidence` (the rest shared evenly)."""
    rest = (1 - confidence) / (vocab - 1)
    probs = rest.unsqueeze(-1).expand(*confidence.shape, vocab).clone()
    probs.scatter_(-1, token.unsqueeze(-1), confidence.unsqueeze(-1))
    return probs.log()


def test_remasking_picks_the_least_confident_tokens(monkeypatch):
    tokenizer, _ = tiny_models()
    generator = torch.Generator().manual_seed(3)
    B = 2
    confidence = {l: torch.rand(B, l, generator=generator) * 0.5 + 0.4 for l in (1, 4, 16)}
    tokens = {l: torch.randint(0, 32, (B, l), generator=generator) for l in (1, 4, 16)}
    mask_confidence = [torch.rand(B, 16, generator=generator) * 0.5 + 0.4 for _ in range(2)]
    mask_tokens = [torch.randint(0, 32, (B, 16), generator=generator) for _ in range(2)]
    stub = StubNetwork({l: peaked(confidence[l], tokens[l]) for l in (1, 4, 16)},
                       [peaked(c, t) for c, t in zip(mask_confidence, mask_tokens)])
    # draw the most probable token (the confidence is its probability): deterministic choices to check against.
    # Uniform noise of exp(-1) everywhere makes every Gumbel term -log(-log(u)) 0, so Gumbel-max is the argmax, in
    # the fused kernel and the eager path alike
    monkeypatch.setattr(SampleNoise, "uniform",
                        lambda self, *shape: torch.full((len(self.generators), *shape), math.exp(-1.0)))
    settings = HMARSamplerConfig(cfg_scale=1.0, top_k=0, top_p=0.0, mask_schedule=[[1], [4], [6, 6, 4]])
    _, indices = sample_hmar(stub, tokenizer, torch.tensor([0, 1]), settings, return_indices=True)
    assert [si for si, _ in stub.masked] == [2, 2]
    first, second = stub.masked[0][1], stub.masked[1][1]
    for b in range(B):
        least = set(confidence[16][b].argsort()[:10].tolist())  # 6 kept, 6 + 4 re-masked
        assert set(first[b].nonzero().flatten().tolist()) == least
        again = sorted(least, key=lambda i: mask_confidence[0][b, i].item())[:4]  # of those, the 4 least confident
        assert set(second[b].nonzero().flatten().tolist()) == set(again)
        expected = tokens[16][b].clone()
        expected[sorted(least)] = mask_tokens[0][b, sorted(least)]
        expected[again] = mask_tokens[1][b, again]
        assert torch.equal(indices[2][b], expected)
    assert torch.equal(indices[1], tokens[4])  # a one-step scale keeps the next-scale draw

    # ties (all confidences equal, as greedy top_k=1 gives) re-mask the lowest positions first, stably
    stub = StubNetwork({l: peaked(torch.full((B, l), 0.5), tokens[l]) for l in (1, 4, 16)},
                       [peaked(torch.full((B, 16), 0.5), t) for t in mask_tokens])
    sample_hmar(stub, tokenizer, torch.tensor([0, 1]), settings)
    assert stub.masked[0][1][0].nonzero().flatten().tolist() == list(range(10))
    assert stub.masked[1][1][0].nonzero().flatten().tolist() == list(range(4))


def test_refinement_with_the_fused_draw_equals_the_eager_ops():
    # the fused CPU draw also returns each token's probability, HMAR's re-masking key: same tokens, same masks
    from effigen.nn import cpu_kernels

    tokenizer, network = tiny_models()
    settings = HMARSamplerConfig(cfg_scale=2.0, top_k=12, top_p=0.9, mask_schedule=[[1], [1, 3], [2, 6, 8]])
    results = []
    for enabled in (True, False):
        cpu_kernels.set_enabled(enabled)
        try:
            results.append(sample_hmar(network, tokenizer, torch.tensor([0, 1, 3]), settings,
                                       torch.Generator().manual_seed(4), return_indices=True))
        finally:
            cpu_kernels.set_enabled(True)
    (f_fused, fused), (f_eager, eager) = results
    assert all(torch.equal(a, b) for a, b in zip(fused, eager)) and torch.equal(f_fused, f_eager)


def test_editing_forces_tokens_through_refinement(monkeypatch):
    tokenizer, network = tiny_models()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :, :4] = 1.0  # keep the left half
    spec = EditSpec.from_images(tokenizer, x, keep)
    masked_records, original = [], network.mask_tokens

    def mask_tokens(si, previous, current, masked):
        masked_records.append((si, masked.clone()))
        return original(si, previous, current, masked)

    monkeypatch.setattr(network, "mask_tokens", mask_tokens)
    settings = HMARSamplerConfig(cfg_scale=2.0, top_k=0, top_p=0.0, mask_schedule=[[1], [1, 3], [2, 6, 8]])
    _, indices = sample_hmar(network, tokenizer, torch.full((2,), network.null_class), settings,
                             torch.Generator().manual_seed(0), edit=spec, return_indices=True)
    monkeypatch.undo()
    for k in range(3):
        kept = spec.keep[k].flatten(1)
        assert torch.equal(indices[k][kept], spec.indices[k][kept]), k
    assert not torch.equal(indices[2][~spec.keep[2].flatten(1)], spec.indices[2][~spec.keep[2].flatten(1)])
    assert [si for si, _ in masked_records] == [1, 2, 2]
    for si, masked in masked_records:
        assert not (masked & spec.keep[si].flatten(1)).any()  # forced tokens are never re-masked
    assert masked_records[0][1].sum(1).tolist() == [2, 2]  # 3 wanted, 2 free tokens (the right half of 2x2)
    assert masked_records[1][1].sum(1).tolist() == [8, 8]  # 14 wanted, 8 free
    assert masked_records[2][1].sum(1).tolist() == [8, 8]  # 8 wanted


# ---------------------------------------------------------------------------------------------- objectives
def test_lognorm_weights_and_stage_two_masks():
    for scales in ((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), (1, 2, 4)):
        weights = scale_loss_weights(scales, "lognorm")
        assert weights.shape == (sum(s * s for s in scales),) and abs(float(weights.sum()) - 1) < 1e-6
        assert torch.equal(scale_loss_weights(scales, "uniform"), torch.full_like(weights, 1 / weights.numel()))
    per_scale = [float(w.sum()) for w in torch.split(scale_loss_weights((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), "lognorm"),
                                                      [s * s for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)])]
    assert max(range(10), key=per_scale.__getitem__) == 4 and per_scale[0] < per_scale[-1] < per_scale[3]
    with pytest.raises(ValueError, match="unknown scale_weighting"):
        scale_loss_weights(SCALES, "cosine")

    scales = (1, 2, 3, 4)
    masked, ratio = draw_masks(scales, BatchRandom.local(0, 64))
    assert masked.shape == (64, 30) and not masked[:, 0].any()
    start = 1
    for side in scales[1:]:
        n = side * side
        assert torch.equal(masked[:, start:start + n].sum(1), torch.ceil(ratio * n).long())
        start += n
    # DDP equals one process: a process's slice of the global batch draws what the single process drew for it
    local = draw_masks(scales, BatchRandom(0, 0, 0, 64, 16, 16))[0]
    assert torch.equal(local, masked[16:32])


def test_stage_two_loss_only_sees_masked_positions():
    tokenizer, network = tiny_models()
    network.set_trainable("mask")
    objective = HMARObjective(HMARObjectiveConfig(stage="mask", label_dropout=0.0), num_classes=4, tokenizer=tokenizer)
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"images": images, "labels": torch.tensor([0, 1, 2, 3])}
    captured = {}

    class Capture(torch.nn.Module):  # a wrapper like DDP's (`.module`), keeping the logits for their gradient
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, labels, teacher, current, masked):
            logits = self.module(labels, teacher, current, masked)
            logits.retain_grad()
            captured.update(logits=logits, masked=masked)
            return logits

    model = Capture(network)
    out = objective.loss(model, batch, BatchRandom.local(0, 4))
    out["loss"].backward()
    grad = captured["logits"].grad.abs().sum(-1)
    assert (grad[~captured["masked"]] == 0).all() and (grad[captured["masked"]] > 0).all()
    assert 0 <= float(out["accuracy_masked"]) <= 1
    trained = {n for n, p in network.named_parameters() if p.grad is not None}
    assert trained and all(is_mask_branch(n) for n in trained)
    # the wrong stage's freezing is caught before it trains the wrong weights
    network.set_trainable("next_scale")
    with pytest.raises(RuntimeError, match="prepare_network"):
        HMARObjective(HMARObjectiveConfig(stage="mask"), num_classes=4, tokenizer=tokenizer).loss(model, batch,
                                                                                                  BatchRandom.local(0, 4))


def test_init_from_a_stage_one_state_copies_the_next_scale_branch():
    _, source = tiny_models(seed=1)
    tokenizer, network = tiny_models(seed=2)
    objective = HMARObjective(HMARObjectiveConfig(stage="mask"), num_classes=4, tokenizer=tokenizer)
    state = source.state_dict()
    note = objective.init_from_state(network, state, {"objective": {"stage": "next_scale"}}, "stage1")
    assert "initialised from the next-scale" in note
    mine = network.state_dict()
    for key, value in mine.items():
        if key.startswith(("mask_blocks.", "mask_head")):
            assert torch.equal(value, state[key.replace("mask_", "ns_", 1)]), key
        else:
            assert torch.equal(value, state[key]), key
    objective.init_from_state(network, state, {"objective": {"stage": "mask"}}, "stage2")  # a stage-2 folder: as is
    assert all(torch.equal(v, state[k]) for k, v in network.state_dict().items())


# ---------------------------------------------------------------------------------------------- CLI end to end
def _overrides(path, tokenizer, *extra):
    return [f"--tokenizer={tokenizer}", f"--trainer.output_dir={path}", "--network_preset=HMAR-Test",
            "--data.resolution=8", "--trainer.batch_size=8", "--trainer.checkpoint_every=0",
            "--trainer.sample_every=0", "--trainer.log_every=1", "--trainer.progress=false", "--trainer.precision=fp32",
            "--trainer.warmup_steps=0", "--trainer.max_minutes=null", *extra]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A tokenizer trained for 2 steps; HMAR stage 1 (12 steps) and stage 2 (6 steps) from the CLI."""
    from effigen.cli.main import main

    root = tmp_path_factory.mktemp("hmar")
    tokenizer_run = build_experiment_dict("mnist-msvq", overrides=[
        f"--trainer.output_dir={root / 'tokenizer'}", "--network_preset=MSVQ-Test", "--data.resolution=8",
        "--trainer.max_steps=2", "--trainer.batch_size=8", "--trainer.checkpoint_every=0",
        "--trainer.progress=false", "--objective.perceptual_weight=0", "--trainer.max_minutes=null"])
    tokenizer = build_and_train(tokenizer_run, quiet=True)["pipeline"]
    assert main(["train", "--preset", "mnist-hmar", *_overrides(root / "stage1", tokenizer, "--trainer.max_steps=12",
                                                                 "--trainer.learning_rate=3e-3")]) == 0
    assert main(["train", "--preset", "mnist-hmar-mask", *_overrides(root / "stage2", tokenizer, "--trainer.max_steps=6",
                                                                      "--trainer.learning_rate=3e-3",
                                                                      f"--init_from={root / 'stage1' / 'final'}")]) == 0
    return {"root": root, "tokenizer": tokenizer, "stage1": root / "stage1", "stage2": root / "stage2"}


def test_two_stages_train_only_their_parameters(stages):
    records = [json.loads(line) for line in (stages["stage1"] / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 12 and records[-1]["loss"] < records[0]["loss"]
    records = [json.loads(line) for line in (stages["stage2"] / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all("accuracy_masked" in r and 0 <= r["mask_ratio"] <= 1 for r in records)

    one = load_weights(stages["stage1"] / "final" / "generator" / "model.safetensors")
    two = load_weights(stages["stage2"] / "final" / "generator" / "model.safetensors")
    raw_one = load_weights(list_checkpoints(stages["stage1"])[-1] / "train_state" / "model.safetensors")
    raw_two = load_weights(list_checkpoints(stages["stage2"])[-1] / "train_state" / "model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        if is_mask_branch(key):
            if key != "mask_embed.weight":
                ns_key = key.replace("mask_", "ns_", 1)
                assert not torch.equal(two[key], one[ns_key]), key  # started as the ns branch, then trained
            assert not torch.equal(raw_two[key], raw_one[key]), key
        else:  # stage 2 (started from stage 1's final EMA weights) changes nothing else, raw or EMA
            assert torch.equal(two[key], one[key]) and torch.equal(raw_two[key], one[key]), key
    # stage 1 never trains the mask branch: its EMA equals its raw weights (the initial values)
    assert all(torch.equal(raw_one[key], one[key]) for key in one if is_mask_branch(key))
    # a stage-1 folder samples without refinement (its mask branch is untrained) and refuses a refining schedule
    first = Pipeline.from_pretrained(stages["stage1"] / "final")
    assert first.sampler_config.mask_schedule == "off" and first([0, 1], seed=0).shape == (2, 3, 8, 8)
    with pytest.raises(ConfigError, match="has not been through stage 2.*--schedule off"):
        first([0, 1], seed=0, mask_schedule="default")
    pipeline = Pipeline.from_pretrained(stages["stage2"] / "final")
    assert isinstance(pipeline.generator, HMAR) and pipeline.objective_config.stage == "mask"
    assert pipeline.sampler_config.mask_schedule == "default"
    assert pipeline.number_of_evaluations() == 3 * 2 + 1 * 2  # cfg 3: guided next-scale and mask passes
    assert pipeline.number_of_evaluations(mask_guidance_ratio=0.0, mask_schedule=[[1], [1, 1, 2], [8, 8]]) == 6 + 3


def test_sampling_from_the_cli_with_two_schedules(stages, tmp_path, run_cli, capsys):
    from PIL import Image

    folder = stages["stage2"] / "final"
    outputs = {}
    for name, args in (("default", []), ("compact", ["--schedule", "1/2,2/4,4,8"]),
                       ("json", ["--sampler.mask_schedule=[[1],[2,2],[4,4,8]]"]), ("off", ["--schedule", "off"])):
        code, out, err = run_cli(["sample", "--from", folder, "--classes", "0,1", "--num", "4", "--seed", "3",
                                  "--out", tmp_path / f"{name}.png", *args], capsys)
        assert code == 0, err
        outputs[name] = torch.from_numpy(np.asarray(Image.open(tmp_path / f"{name}.png")).copy())
    assert torch.equal(outputs["compact"], outputs["json"])  # two spellings of one schedule
    assert not torch.equal(outputs["default"], outputs["compact"]) and not torch.equal(outputs["off"], outputs["compact"])
    code, out, err = run_cli(["sample", "--from", folder, "--schedule", "1/1,3/4,4,7", "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "sums to 15, but scale 2 (4x4) has 16 tokens" in err
    code, out, err = run_cli(["edit", "--from", folder, "--image", tmp_path / "default.png", "--box", "0.25,0.25,0.75,0.75",
                              "--num", "2", "--sampler.mask_schedule=[[1],[1,3],[2,6,8]]", "--out", tmp_path / "edit.png"],
                             capsys)
    assert code == 0, err
    code, out, err = run_cli(["sample", "--from", folder, "--schedule", "[[1]]", "--out", tmp_path / "y.png"], capsys)
    assert code == 2 and "has 1 entries but the model has 3 scales" in err


def test_stage_two_resumes_exactly_after_a_kill(stages, tmp_path, monkeypatch):
    """The masks, ratios and label dropout come from BatchRandom: a killed and resumed stage-2 run (init_from again,
    then the checkpoint) ends with the weights of an uninterrupted one."""
    import effigen.training.trainer as trainer_module

    settings = _overrides(tmp_path, stages["tokenizer"], "--trainer.max_steps=6", "--trainer.checkpoint_every=3",
                          "--trainer.warmup_steps=2", f"--init_from={stages['stage1'] / 'final'}")

    def run(name):
        config = build_experiment_dict("mnist-hmar-mask", overrides=settings)
        config["trainer"]["output_dir"] = str(tmp_path / name)
        return build_and_train(config, quiet=True)

    run("straight")
    original = trainer_module.Trainer.train_step

    def killed(self, batches):
        if self.step == 4:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batches)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    monkeypatch.setattr(trainer_module.Trainer, "train_step", original)
    assert run("resumed")["steps_this_run"] == 3
    for name in ("train_state/model.safetensors", "generator/model.safetensors"):
        a = load_weights(list_checkpoints(tmp_path / "straight")[-1] / name)
        b = load_weights(list_checkpoints(tmp_path / "resumed")[-1] / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_init_from_errors_name_the_fix(stages, tmp_path):
    base = build_experiment_dict("mnist-hmar-mask", overrides=_overrides(tmp_path, stages["tokenizer"]))
    with pytest.raises(ConfigError, match="no pipeline folder with a generator there.*run the previous stage first"):
        parse_experiment({**base, "init_from": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="holds a HMAR generator.*starts from a VAR"):
        var = build_experiment_dict("mnist-var", overrides=[f"--tokenizer={stages['tokenizer']}", "--data.resolution=8"])
        parse_experiment({**var, "init_from": str(stages["stage1"] / "final")})
    wider = {**base, "init_from": str(stages["stage1"] / "final"), "network": {"embed_dim": 48, "num_heads": 2}}
    with pytest.raises(ConfigError, match="does not fit this experiment's network"):
        build_and_train(wider, quiet=True)


# ---------------------------------------------------------------------------------------------- converter
def _official_hmar_state(network: HMAR) -> dict[str, torch.Tensor]:
    """effigen's state dict in the official layout: plus the constant buffers that effigen computes."""
    state = dict(network.state_dict())
    state["lvl_1L"] = network.lvl_1L.clone()
    dense = network.attention_blocks.dense()
    state["attn_bias_for_masking"] = torch.zeros(1, 1, *dense.shape).masked_fill(~dense, float("-inf"))
    for name in ("base_blocks", "ns_blocks", "mask_blocks"):
        for i in range(len(getattr(network, name))):
            state[f"{name}.{i}.attn.zero_k_bias"] = torch.zeros(network.config.embed_dim)
    return state


CONVERTER_CASES = [
    (dict(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_channels=4, vocab_size=32,
          scales=(1, 2, 4), resolution=8, share_quant_resi=0, phi_count=3),
     dict(depth=3, n_layers_train=1, embed_dim=32, num_heads=2, num_classes=4)),
    (dict(base_channels=4, channel_multipliers=(1, 1, 2), num_res_blocks=2, latent_channels=3, vocab_size=16,
          scales=(1, 2, 3, 5), resolution=20, share_quant_resi=1, attention=False, mid_attention=False),
     dict(depth=3, n_layers_train=2, embed_dim=24, num_heads=3, attn_l2_norm=False, shared_aln=True, mlp_ratio=2.0,
          num_classes=1)),  # without l2-normalised attention the heads are not in the weights: official heads = depth
    (dict(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, latent_channels=4, vocab_size=24,
          scales=(1, 2, 3, 4, 6), resolution=12, share_quant_resi=3),
     dict(depth=2, n_layers_train=2, embed_dim=16, num_heads=4, mlp_ratio=3.0, num_classes=3)),  # no trunk
]


@pytest.mark.parametrize("vq_settings, hmar_settings", CONVERTER_CASES)
def test_converter_maps_every_key_on_non_official_sizes(tmp_path, vq_settings, hmar_settings):
    torch.manual_seed(0)
    tokenizer = randomize(MultiScaleVQ(MultiScaleVQConfig(**vq_settings)), 1).eval()
    network = randomize(HMAR(HMARConfig(vocab_size=vq_settings["vocab_size"], latent_channels=vq_settings["latent_channels"],
                                        scales=vq_settings["scales"], **hmar_settings)), 2).eval()
    torch.save(dict(tokenizer.state_dict()), tmp_path / "vae.pth")
    official = _official_hmar_state(network)
    assert {k.split(".")[0] for k in official} >= {"base_blocks", "ns_blocks", "mask_blocks"} - (
        set() if hmar_settings["depth"] > hmar_settings["n_layers_train"] else {"base_blocks"})
    torch.save(official, tmp_path / "hmar.pth")
    out = convert_hmar_official(tmp_path / "vae.pth", tmp_path / "hmar.pth", tmp_path / "converted")
    converted = Pipeline.from_pretrained(out)
    assert converted.generator.config == network.config and converted.tokenizer.config == tokenizer.config
    a, b = network.state_dict(), converted.generator.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "NSCLv1" in converted.info["licence"]
    x = torch.rand(2, 3, tokenizer.config.resolution, tokenizer.config.resolution) * 2 - 1
    indices = tokenizer.indices_from_images(x)
    with torch.no_grad():
        teacher = tokenizer.quantize.teacher_forcing_input(indices)
        labels = torch.zeros(2, dtype=torch.long)
        assert torch.equal(network(labels, teacher), converted.generator(labels, teacher))
    settings = dict(cfg_scale=2.0, top_k=0, top_p=0.0)
    original = Pipeline("hmar", network, HMARObjectiveConfig(stage="mask"), HMARSamplerConfig(**settings), {},
                        tokenizer=tokenizer)
    assert torch.equal(original([0, 0], seed=3), converted([0, 0], seed=3, **settings))


def test_converter_rejects_var_checkpoints_and_broken_layouts(tmp_path):
    vq_settings, hmar_settings = CONVERTER_CASES[0]
    tokenizer = randomize(MultiScaleVQ(MultiScaleVQConfig(**vq_settings)), 1)
    torch.save(dict(tokenizer.state_dict()), tmp_path / "vae.pth")
    var = VAR(VARConfig(depth=2, embed_dim=32, num_heads=2, num_classes=4, vocab_size=32, latent_channels=4, scales=(1, 2, 4)))
    torch.save(dict(var.state_dict()), tmp_path / "var.pth")
    with pytest.raises(CheckpointError, match="not an official HMAR state dict.*use var-official"):
        convert_hmar_official(tmp_path / "vae.pth", tmp_path / "var.pth", tmp_path / "out")
    network = HMAR(HMARConfig(vocab_size=32, latent_channels=4, scales=(1, 2, 4), **hmar_settings))
    state = _official_hmar_state(network)
    state["attn_bias_for_masking"] = torch.zeros_like(state["attn_bias_for_masking"])  # dense: not HMAR's pattern
    torch.save(state, tmp_path / "dense.pth")
    with pytest.raises(CheckpointError, match="not HMAR's block-diagonal pattern"):
        convert_hmar_official(tmp_path / "vae.pth", tmp_path / "dense.pth", tmp_path / "out")
    state = {k: v for k, v in _official_hmar_state(network).items() if not k.startswith("mask_blocks.0.")}
    torch.save(state, tmp_path / "nomask.pth")
    with pytest.raises(CheckpointError, match="1 ns_blocks and 0 mask_blocks"):
        convert_hmar_official(tmp_path / "vae.pth", tmp_path / "nomask.pth", tmp_path / "out")
    state = _official_hmar_state(network)
    state["ns_blocks.0.attn.zero_k_bias"][0] = 1.0
    torch.save(state, tmp_path / "bias.pth")
    with pytest.raises(CheckpointError, match="zero_k_bias is not zero; this is not an official HMAR checkpoint"):
        convert_hmar_official(tmp_path / "vae.pth", tmp_path / "bias.pth", tmp_path / "out")


def test_stage_two_with_two_processes_equals_one_process(stages, tmp_path):
    """Stage 2's masks, ratios and label dropout are drawn for the global batch (BatchRandom) and its loss is a
    per-sample mean: 2 torchrun processes train exactly what 1 process does."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo / "src")}
    states = []
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                   "effigen", "train", "--preset", "mnist-hmar-mask",
                   *_overrides(out, stages["tokenizer"], "--trainer.max_steps=3", "--trainer.device=cpu",
                               f"--init_from={stages['stage1'] / 'final'}")]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        states.append(load_weights(list_checkpoints(out)[-1] / "train_state" / "model.safetensors"))
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], atol=2e-6, rtol=1e-5, msg=key)
