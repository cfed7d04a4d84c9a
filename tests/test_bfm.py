import dataclasses

import pytest
import torch

from effigen.config import ConfigError
from effigen.convert.bfm_official import bfm_config_from_state_dict
from effigen.models.bfm import BFM, BFM_PRESETS, BFMConfig, segment_edges, segment_of
from effigen.objectives.bfm import (BFMObjectiveConfig, BFMSamplerConfig, BlockwiseFlowMatching, fra_coefficient,
                                    segment_split)
from effigen.pipeline import Pipeline
from effigen.rng import BatchRandom
from effigen.samplers.blockwise import blockwise_euler, blockwise_euler_maruyama, segment_grids, steps_per_segment

from conftest import randomize


def tiny(**kw) -> BFMConfig:
    return BFMConfig(**{**dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, num_heads=2, num_classes=4,
                               segments=3, segment_depth=1, feature_alignment_depth=1, frn_depth=1, adaln_lora_dim=8,
                               projector_hidden=16, projection_dim=8), **kw})


def batch(n=6, size=8):
    g = torch.Generator().manual_seed(0)
    return {"images": torch.rand(n, 3, size, size, generator=g) * 2 - 1, "labels": torch.randint(4, (n,), generator=g)}


# ---------------------------------------------------------------------------------------------- segment routing
@pytest.mark.parametrize("K", [1, 2, 3, 6])
def test_segment_routing_boundaries_belong_to_the_segment_they_start(K):
    edges = segment_edges(K)
    assert edges[0] == 1 and edges[-1] == 0 and len(edges) == K + 1
    # every edge but t = 0 starts a segment (edge k starts segment k); t = 0 closes the last one
    assert segment_of(edges, K).tolist() == list(range(K)) + [K - 1]
    inside = (edges[:-1] + edges[1:]) / 2  # segment midpoints
    assert segment_of(inside, K).tolist() == list(range(K))
    just_below = edges[:-1] - 1e-4  # still in the segment each edge starts
    assert segment_of(just_below, K).tolist() == list(range(K))
    # the sampler's own float32 grid points route to the segment being integrated
    for k, grid in enumerate(segment_grids(K, 4)):
        assert (segment_of(grid[:-1], K) == k).all()


def test_forward_routes_each_sample_to_its_segment_blocks():
    torch.manual_seed(0)
    model = randomize(BFM(tiny())).eval()
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([0.9, 0.1, 0.5, 0.95]), torch.tensor([0, 1, 2, 4])
    per_sample = model(x, t, y, segment=torch.tensor([0, 2, 1, 0]))
    for i, k in enumerate([0, 2, 1, 0]):
        assert torch.allclose(per_sample[i:i + 1], model(x[i:i + 1], t[i:i + 1], y[i:i + 1], segment=k), atol=1e-5)
    assert torch.allclose(model(x, t, y), per_sample, atol=1e-6)  # segment from t
    # the other segments' blocks do not touch a segment's output
    before = model(x, t, y, segment=0)
    with torch.no_grad():
        for p in model.velocity_blocks[1].parameters():
            p.add_(1.0)
    assert torch.equal(model(x, t, y, segment=0), before)
    assert not torch.allclose(model(x, t, y, segment=1), per_sample, atol=1e-3)
    with pytest.raises(ValueError, match="segments 0..2"):
        model(x, t, y, segment=3)


def test_shapes_init_and_trunk_conditions_the_velocity_per_token():
    model = BFM(tiny())
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 4])
    v, features, projected = model(x, t, y, return_features=True, return_projection=True)
    assert v.shape == x.shape and features.shape == (2, 16, 32) and projected.shape == (2, 16, 8)
    assert torch.count_nonzero(v) == 0  # zero-initialised output layer
    model = randomize(model)
    v = model(x, t, y, segment=1)
    changed = model(x, t, y, segment=1, start_features=model.trunk(x, t, y) + 1.0, coeff=0.0)
    assert not torch.allclose(v, changed)  # the features enter the velocity blocks' condition
    assert torch.allclose(model.unpatchify(model.patchify(x)), x)


def test_presets_and_official_layout():
    ti = BFM(BFMConfig(**BFM_PRESETS["BFM-Ti/4"]))
    assert 4.5e6 < sum(p.numel() for p in ti.parameters()) < 5.3e6  # DiT recipes' 5.0M
    xl = BFM_PRESETS["BFM-XL/2"]
    assert (xl["segments"], xl["segment_depth"], xl["feature_alignment_depth"], xl["frn_depth"]) == (6, 5, 20, 4)
    # the converter reads a config back from the state dict (RoPE tables are not saved, as in the official files)
    config = tiny()
    state = BFM(config).state_dict()
    assert not any("freqs" in k for k in state)
    assert bfm_config_from_state_dict(state, in_channels=3, input_size=8) == dataclasses.replace(config, time_scale=1.0)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny(input_size=9)
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny(hidden_size=30, num_heads=3)
    with pytest.raises(ValueError, match="proj_loss_weight > 0"):
        BFMObjectiveConfig(proj_loss_weight=0.05, teacher="")


# ---------------------------------------------------------------------------------------------- FRA
def test_fra_coefficient_is_zero_at_the_segment_start_and_one_at_its_end():
    edges = segment_edges(3)
    for k in range(3):
        start, end = edges[k].expand(2), edges[k + 1].expand(2)
        assert torch.equal(fra_coefficient(start, start, end), torch.zeros(2))
        assert torch.allclose(fra_coefficient(end, start, end), torch.ones(2))
        assert torch.allclose(fra_coefficient((start + end) / 2, start, end), torch.full((2,), 0.5))


def test_fra_at_coefficient_zero_is_the_cached_trunk():
    model = randomize(BFM(tiny())).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.full((2,), 0.6), torch.tensor([1, 2])
    start = model.trunk(x, t, y)
    assert torch.allclose(model(x, t, y, segment=1, start_features=start, coeff=0.0), model(x, t, y, segment=1))
    approx = model(x, t, y, start_features=start, coeff=torch.full((2,), 0.5), features_only=True)
    assert torch.allclose(approx, start + 0.5 * model.residual_approximation(x, t, y), atol=1e-6)


def test_fra_stage_trains_only_the_frn_on_the_frozen_trunk():
    model = randomize(BFM(tiny()))
    objective = BlockwiseFlowMatching(BFMObjectiveConfig(stage="fra"), num_classes=4)
    objective.prepare_network(model)
    out = objective.loss(model, batch(), BatchRandom.local(0, 6))
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith("frn_blocks."), name
        assert (p.grad is not None) == name.startswith("frn_blocks."), name
    assert out["start_only_mse"] > 0
    # a stage-1 state without FRN (an official train.py model) loads; the FRN keeps its init
    fresh = BFM(tiny())
    frn_before = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("frn_blocks.")}
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("frn_blocks.")}
    assert "no FRN" in objective.init_from_state(fresh, state, {}, "stage1")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in frn_before.items())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ConfigError, match="frn_depth"):
        objective.prepare_network(BFM(tiny(frn_depth=0)))


# ---------------------------------------------------------------------------------------------- stage 1 loss
def test_batch_split_is_contiguous_and_balanced_and_times_stay_in_their_segment():
    assert segment_split(7, 3).bincount().tolist() == [3, 2, 2]  # the official counts
    assert segment_split(2, 3).tolist() == [0, 1]
    objective = BlockwiseFlowMatching(BFMObjectiveConfig(proj_loss_weight=0.0), num_classes=4)
    x0 = torch.zeros(3, 3, 8, 8)
    random = BatchRandom(0, 0, 0, global_size=9, offset=3, local_size=3)  # rank 1 of 3 holds every segment
    segment, t, t_start, t_end, _, _ = objective._draw(x0, random, 3)
    assert segment.tolist() == [0, 1, 2]
    assert ((t <= t_start) & (t >= t_end)).all() and torch.allclose(t_start, segment_edges(3)[:3])
    with pytest.raises(ConfigError, match="per-process batch of at least 3"):
        objective._draw(x0[:2], BatchRandom(0, 0, 0, global_size=4, offset=2, local_size=2), 3)


def test_two_processes_equal_one_process(tmp_path):
    """DDP: the interleaved segment split gives every process every segment, and the result equals one process."""
    from test_training import _final_state, _torchrun

    settings = ["--preset", "mnist-bfm", "--network_preset=BFM-Test", "--trainer.max_steps=2", "--trainer.batch_size=8",
                "--trainer.checkpoint_every=0", "--trainer.sample_every=0", "--trainer.device=cpu",
                "--trainer.precision=fp32", "--trainer.progress=false"]
    _torchrun([*settings, f"--trainer.output_dir={tmp_path / 'single'}"], 1)
    _torchrun([*settings, f"--trainer.output_dir={tmp_path / 'multi'}"], 2)
    single, multi = _final_state(tmp_path / "single"), _final_state(tmp_path / "multi")
    for a, b in zip(single[:2], multi[:2]):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=1e-5, msg=key)


def test_teacher_free_mode_trains_without_projector_or_teacher():
    torch.manual_seed(0)
    model = BFM(tiny(projection_dim=0))
    assert model.linear_projection is None
    objective = BlockwiseFlowMatching(BFMObjectiveConfig(proj_loss_weight=0.0), num_classes=4)
    objective.prepare_network(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    data, losses = batch(), []
    for step in range(8):
        out = objective.loss(model, data, BatchRandom.local(0, 6))  # the same draws: the loss must go down
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert "proj_loss" not in out and objective._teacher is None
    with_projector = BFM(tiny())
    objective.prepare_network(with_projector)  # teacher-free: a projector, if built, is frozen (no DDP unused params)
    assert not any(p.requires_grad for p in with_projector.linear_projection.parameters())
    assert {"mse_segment0", "mse_segment1", "mse_segment2"} <= set(out)
    assert losses[-1] < losses[0]


def test_alignment_uses_the_teacher_and_reaches_the_projector():
    model = randomize(BFM(tiny(input_size=32, patch_size=4, projection_dim=128)))
    objective = BlockwiseFlowMatching(BFMObjectiveConfig(proj_loss_weight=0.5, teacher="mnist-vit"), num_classes=4)
    objective.prepare_network(model)
    out = objective.loss(model, batch(3, 32), BatchRandom.local(0, 3))
    out["loss"].backward()
    assert -1 <= out["proj_loss"] <= 1
    assert model.linear_projection[0].weight.grad.abs().sum() > 0
    wrong = BFM(tiny(input_size=32, patch_size=4, projection_dim=8))
    with pytest.raises(ConfigError, match="projection_dim=128"):
        objective.loss(wrong, batch(3, 32), BatchRandom.local(0, 3))


# ---------------------------------------------------------------------------------------------- samplers
def test_step_budgets_split_over_segments_and_non_dividing_budgets_are_errors():
    assert steps_per_segment(12, 3) == 4 and steps_per_segment(3, 3) == 1
    with pytest.raises(ValueError, match="use 9 or 12"):
        steps_per_segment(10, 3)
    with pytest.raises(ValueError, match="use 3"):
        steps_per_segment(2, 3)
    grids = segment_grids(3, 4)
    assert [len(g) for g in grids] == [5, 5, 5]
    assert all(g[0] == e for g, e in zip(grids, segment_edges(3))) and grids[-1][-1] == 0
    sde = segment_grids(3, 4, last_step=0.04)
    assert len(sde[-1]) == 5 and torch.isclose(sde[-1][-2], torch.tensor(0.04)) and sde[-1][-1] == 0

    model = BFM(tiny())
    objective = BlockwiseFlowMatching(BFMObjectiveConfig(stage="fra", proj_loss_weight=0.0), num_classes=4)
    with pytest.raises(ConfigError, match="num_steps 10 does not divide among the model's 3 segments"):
        objective.sample(model, torch.tensor([0]), (3, 8, 8), BFMSamplerConfig(num_steps=10))
    assert objective.evaluations_per_sample(BFMSamplerConfig(num_steps=12), model) == 12
    assert objective.evaluations_per_sample(BFMSamplerConfig(num_steps=12, cfg_scale=2.0), model) == 24
    guided_late = BFMSamplerConfig(num_steps=12, cfg_scale=2.0, cfg_interval=(0.0, 0.5))
    assert objective.evaluations_per_sample(guided_late, model) == 12 + 6  # t = 0.5 .. 0.083 guided
    fra = BFMSamplerConfig(num_steps=12, fra=True)
    assert objective.trunk_evaluations_per_sample(fra, model) == 3  # once per segment
    assert objective.evaluations_per_sample(BFMSamplerConfig(num_steps=6, solver="euler_maruyama",
                                                             sde_ending="official"), model) == 7


def test_euler_is_exact_on_a_straight_path():
    x0 = torch.randn(2, 3, 8, 8)

    def velocity(x, t, k, j):  # the exact velocity of the linear path through x0: (x_t - x0) / t
        return (x - x0) / t.view(-1, 1, 1, 1)

    for K, n in [(1, 1), (3, 2), (6, 5)]:
        assert torch.allclose(blockwise_euler(velocity, torch.randn(2, 3, 8, 8), segment_grids(K, n)), x0, atol=1e-5)
    # the SDE draws noise on every step but the final one to t = 0; the official ending on every step, then repeats
    # the last interval without noise
    for ending, draws in (("mean", 3 * 4 - 1), ("official", 3 * 4)):
        used = []
        out = blockwise_euler_maruyama(velocity, torch.randn(2, 3, 8, 8), segment_grids(3, 4, 0.04),
                                       lambda i: used.append(i) or torch.zeros(2, 3, 8, 8), ending=ending)
        assert used == list(range(draws)) and torch.isfinite(out).all()


def test_sampler_runs_the_trunk_once_per_segment_with_fra(monkeypatch):
    model = randomize(BFM(tiny())).eval()
    calls = {"trunk": 0, "frn": 0, "segments": []}
    trunk, residual, velocity = model._trunk, model._residual, model._velocity

    def count(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)
        return wrapped

    monkeypatch.setattr(model, "_trunk", count("trunk", trunk))
    monkeypatch.setattr(model, "_residual", count("frn", residual))
    monkeypatch.setattr(model, "_velocity", lambda p, c, f, k: calls["segments"].append(k) or velocity(p, c, f, k))
    objective = BlockwiseFlowMatching(BFMObjectiveConfig(stage="fra", proj_loss_weight=0.0), num_classes=4)
    labels = torch.tensor([0, 1])
    plain = objective.sample(model, labels, (3, 8, 8), BFMSamplerConfig(num_steps=9), torch.Generator().manual_seed(0))
    assert calls["trunk"] == 9 and calls["frn"] == 0 and calls["segments"] == [0] * 3 + [1] * 3 + [2] * 3
    calls.update(trunk=0, frn=0, segments=[])
    out = objective.sample(model, labels, (3, 8, 8), BFMSamplerConfig(num_steps=9, fra=True),
                           torch.Generator().manual_seed(0))
    assert calls["trunk"] == 3 and calls["frn"] == 6 and out.shape == plain.shape and torch.isfinite(out).all()
    # guidance switched on inside a segment (t <= 0.5 starts inside segment 1): the start features are rebuilt for
    # the doubled batch once, where the official sampler fails
    calls.update(trunk=0, frn=0, segments=[])
    objective.sample(model, labels, (3, 8, 8), BFMSamplerConfig(num_steps=9, fra=True, cfg_scale=2.0,
                                                                cfg_interval=(0.0, 0.5)), torch.Generator().manual_seed(0))
    assert calls["trunk"] == 4
    stage1 = BlockwiseFlowMatching(BFMObjectiveConfig(proj_loss_weight=0.0), num_classes=4)
    with pytest.raises(ConfigError, match="never trained"):
        stage1.sample(model, labels, (3, 8, 8), BFMSamplerConfig(num_steps=9, fra=True))


def test_same_seed_same_samples_and_pipeline_round_trip(tmp_path):
    model = randomize(BFM(tiny())).eval()
    objective = BFMObjectiveConfig(stage="fra", proj_loss_weight=0.0)
    pipeline = Pipeline("bfm", model, objective, BFMSamplerConfig(num_steps=6, fra=True, cfg_scale=1.5), {})
    a = pipeline([0, 1, 2], output_type="latent", seed=3)
    assert torch.equal(a, pipeline([0, 1, 2], output_type="latent", seed=3))
    assert torch.allclose(a, pipeline([0, 1, 2], output_type="latent", seed=3, batch_size=1), atol=1e-5)
    loaded = Pipeline.from_pretrained(pipeline.save_pretrained(tmp_path / "bfm"))
    assert loaded.sampler_config == pipeline.sampler_config and loaded.objective_config.stage == "fra"
    assert torch.equal(loaded([0, 1, 2], output_type="latent", seed=3), a)
    sde = loaded([0, 1], output_type="latent", seed=3, solver="euler_maruyama")
    assert torch.isfinite(sde).all() and not torch.allclose(sde, a[:2])


def test_train_both_stages_from_the_cli(tmp_path):
    from effigen.cli.main import main

    common = ["--network_preset=BFM-Test", "--trainer.batch_size=6", "--trainer.checkpoint_every=0",
              "--trainer.sample_every=0", "--trainer.progress=false", "--trainer.precision=fp32",
              "--trainer.warmup_steps=0", "--trainer.max_minutes=null", "--trainer.max_steps=2",
              "--sampler.num_steps=2", "--trainer.log_every=1"]
    assert main(["train", "--preset", "mnist-bfm", f"--trainer.output_dir={tmp_path / 's1'}", *common]) == 0
    assert main(["train", "--preset", "mnist-bfm-fra", f"--trainer.output_dir={tmp_path / 's2'}",
                 f"--init_from={tmp_path / 's1' / 'final'}", *common]) == 0
    stage1, stage2 = (Pipeline.from_pretrained(tmp_path / s / "final") for s in ("s1", "s2"))
    assert stage2.sampler_config.fra and stage2.objective_config.stage == "fra"
    s1, s2 = stage1.generator.state_dict(), stage2.generator.state_dict()
    changed = {k for k in s1 if not torch.equal(s1[k], s2[k])}
    assert changed and all(k.startswith("frn_blocks.") for k in changed)  # stage 2 moved only the FRN
    assert stage2([0, 1], num_steps=4).shape == (2, 3, 32, 32)
