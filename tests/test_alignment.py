"""REPA and HASTE (objectives/alignment.py): the losses on hand-computed cases, HASTE's layer pairing and termination,
the wrapped objective's loss against a direct computation, and training from the CLI with exact resume across the
switch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from effigen.config import ConfigError
from effigen.models.dit import DIT_PRESETS, DiT, DiTConfig
from effigen.nn.taps import Taps
from effigen.objectives.alignment import (
    AlignConfig, AlignedObjective, Projectors, attention_alignment_loss, repa_loss,
)
from effigen.objectives.flow_matching import RectifiedFlow, RectifiedFlowConfig
from effigen.rng import BatchRandom
from effigen.teachers import Teacher


class ToyTeacher(Teacher):
    """A deterministic 'ViT': patch pixels through a fixed projection; attention logits from fixed q/k projections.
    Counts its calls (the switch must stop running it)."""

    name, embed_dim, num_heads, depth, interpolates = "toy", 6, 2, 3, True

    def __init__(self, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.native_grid = 8
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * patch_size * patch_size, self.embed_dim, generator=generator))
        self.register_buffer("qk", torch.randn(self.depth, 2, self.embed_dim, self.embed_dim, generator=generator))
        self.calls = 0

    def _tokens(self, images, grid):
        self.calls += 1
        images = F.interpolate(images, size=(grid * self.patch_size,) * 2, mode="bilinear", align_corners=False)
        patches = F.unfold(images, self.patch_size, stride=self.patch_size).transpose(1, 2)  # (B, N, 3 p p)
        return patches @ self.proj

    def _features(self, images, grid):
        return self._tokens(images, grid)

    def _attention_logits(self, images, layers, grid):
        tokens = self._tokens(images, grid)
        out = {}
        for layer in layers:
            q, k = tokens @ self.qk[layer, 0], tokens @ self.qk[layer, 1]
            q, k = (x.view(x.shape[0], x.shape[1], 2, 3).transpose(1, 2) for x in (q, k))
            out[layer] = q @ k.transpose(-1, -2) / math.sqrt(3)
        return out


def test_repa_loss_is_the_mean_negative_cosine():
    target = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    assert repa_loss(target * 3, target).item() == pytest.approx(-1.0)
    assert repa_loss(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), target).item() == pytest.approx(0.0)
    # token 1 at 45 degrees (cos 1/sqrt 2), token 2 opposite (cos -1): mean of -cos = (-0.7071 + 1) / 2
    assert repa_loss(torch.tensor([[[1.0, 1.0], [0.0, -5.0]]]), target).item() == pytest.approx((1 - 0.5**0.5) / 2)


def test_attention_loss_is_the_cross_entropy_of_the_teachers_distribution():
    student = torch.log(torch.tensor([0.5, 0.25, 0.25])).view(1, 1, 1, 3)
    teacher = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 1, 3)
    assert attention_alignment_loss(student, teacher).item() == pytest.approx(math.log(2))
    teacher = torch.tensor([0.5, 0.25, 0.25]).view(1, 1, 1, 3)  # equal distributions: the entropy, 1.5 log 2
    assert attention_alignment_loss(student + 7.0, teacher).item() == pytest.approx(1.5 * math.log(2))


def test_hastes_default_pairing_is_the_papers():
    config = AlignConfig(method="haste", block=8)
    assert config.attention_pairs(28, 12) == [(4, 8), (5, 9), (6, 10), (7, 11)]  # SiT-XL/2 <-> DINOv2-B
    assert AlignConfig(method="haste", block=2).attention_pairs(4, 4) == [(0, 2), (1, 3)]
    with pytest.raises(ValueError, match="do not exist"):
        AlignConfig(method="haste", block=2, student_layers=(5,), teacher_layers=(0,)).attention_pairs(4, 4)


def _network():
    torch.manual_seed(0)
    return DiT(DiTConfig(**{**DIT_PRESETS["DiT-Test"], "depth": 3, "hidden_size": 32, "num_heads": 4,
                            "input_size": 16, "num_classes": 10}))


def _batch():
    generator = torch.Generator().manual_seed(1)
    return {"images": torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1, "labels": torch.tensor([0, 1, 2, 3])}


@pytest.mark.parametrize("method", ["repa", "haste"])
def test_the_wrapped_loss_is_the_denoising_loss_plus_the_alignment_terms(method):
    network, teacher = _network(), ToyTeacher()
    base = RectifiedFlow(RectifiedFlowConfig(), num_classes=10)
    config = AlignConfig(method=method, block=2, projector_dim=16, proj_coeff=0.5, attn_coeff=0.25, heads=2)
    objective = AlignedObjective(base, config, teacher, network)
    batch = _batch()
    out = objective.loss(network, batch, BatchRandom.local(0, 4))
    # the same computation by hand
    plain = base.loss(network, batch, BatchRandom.local(0, 4))
    random = BatchRandom.local(0, 4)
    x0 = batch["images"]
    noise, t = random.randn(3, 16, 16), base.sample_time(random)
    drop = random.rand() < base.config.label_dropout
    labels = torch.where(drop, torch.full_like(batch["labels"], 10), batch["labels"])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    _, features = network(x_t, t, labels, taps=Taps(blocks=(1,), attention=(0, 1)))
    proj = repa_loss(objective.projectors(features.blocks[1])[0], teacher.features(x0, grid=4))
    expected = plain["loss"] + 0.5 * proj
    if method == "haste":  # student blocks 0, 1 <-> the toy teacher's last two, heads 0, 1
        logits = teacher.attention_logits(x0, [1, 2], grid=4)
        attn = (attention_alignment_loss(features.attention[0][:, :2], logits[1].softmax(-1))
                + attention_alignment_loss(features.attention[1][:, :2], logits[2].softmax(-1))) / 2
        expected = expected + 0.25 * attn
        assert out["attn_loss"].item() == pytest.approx(attn.item(), rel=1e-6)
    assert out["proj_loss"].item() == pytest.approx(proj.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # the alignment terms reach the network below the tapped block (the adaLN-zero gates keep attention weights'
    # gradients at 0 at initialisation, so look at the gates and the patch embedding)
    (out["loss"] - plain["loss"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.projectors.parameters())
    assert network.x_embedder.proj.weight.grad.abs().sum() > 0
    assert network.blocks[1].adaLN_modulation[1].weight.grad.abs().sum() > 0
    assert network.blocks[2].adaLN_modulation[1].weight.grad is None or \
        network.blocks[2].adaLN_modulation[1].weight.grad.abs().sum() == 0  # above the tapped block: no signal


def test_terms_stop_at_the_configured_step_and_the_teacher_is_no_longer_run():
    network, teacher = _network(), ToyTeacher()
    base = RectifiedFlow(RectifiedFlowConfig(), num_classes=10)
    objective = AlignedObjective(base, AlignConfig(method="haste", block=2, projector_dim=8, stop_step=5), teacher,
                                 network)
    batch = _batch()

    def at(step):
        return BatchRandom(0, step, 0, 4, 0, 4)

    assert objective.loss(network, batch, at(4))["proj_loss"] != 0 and teacher.calls > 0
    calls = teacher.calls
    after = objective.loss(network, batch, at(5))
    assert teacher.calls == calls and after["proj_loss"] == 0 and after["attn_loss"] == 0
    assert torch.equal(after["loss"], base.loss(network, batch, at(5))["loss"])


def test_bad_alignment_settings_are_named():
    network = _network()
    base = RectifiedFlow(RectifiedFlowConfig(), num_classes=10)
    with pytest.raises(ValueError, match="align.block=9 .1-indexed. but the network has 3 blocks"):
        AlignedObjective(base, AlignConfig(method="repa", block=9), ToyTeacher(), network)
    flat = ToyTeacher()
    flat.num_heads = 0
    with pytest.raises(ValueError, match="HASTE aligns attention maps, and the toy teacher has none"):
        AlignedObjective(base, AlignConfig(method="haste", block=2), flat, network)
    with pytest.raises(ConfigError, match="method var's VAR has no feature taps|needs a teacher"):
        from effigen.training.experiment import build_experiment_config

        build_experiment_config("smoke", overrides=["--align.method=repa", "--data.name=digits", "--data.resolution=16"])
    with pytest.raises(ConfigError, match="align.block=0"):
        build_experiment_config("smoke", overrides=["--align.method=repa", "--align.block=0"])


def _train(tmp_path, name, steps, *more):
    from effigen.training.experiment import build_experiment_dict
    from effigen.training.run import build_and_train

    overrides = [f"--trainer.output_dir={tmp_path / name}", f"--trainer.max_steps={steps}", "--trainer.checkpoint_every=2",
                 "--align.method=haste", "--align.block=2", "--align.projector_dim=16", "--align.stop_step=3",
                 "--network.depth=3", "--network.num_heads=4", *more]
    return build_and_train(build_experiment_dict("smoke", overrides=overrides), quiet=True)


def test_haste_trains_from_the_experiment_and_resumes_exactly_across_the_switch(tmp_path, monkeypatch):
    import effigen.teachers as teachers
    from safetensors.torch import load_file

    from effigen.pipeline import Pipeline

    monkeypatch.setattr(teachers, "load_teacher", lambda spec: ToyTeacher(), raising=False)
    _train(tmp_path, "straight", 5)
    _train(tmp_path, "resumed", 2)  # stops before the switch (step 3) ...
    _train(tmp_path, "resumed", 5)  # ... and resumes across it
    for name in ("generator/model.safetensors", "train_state/model.safetensors", "train_state/auxiliary.safetensors"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "step_0000005" / name))
        b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_0000005" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert "projectors.0.0.weight" in load_file(str(tmp_path / "straight" / "checkpoints" / "step_0000005" /
                                                   "train_state" / "auxiliary.safetensors"))
    pipeline = Pipeline.from_pretrained(tmp_path / "straight" / "final")  # samples without the projector
    assert set(pipeline.components) == {"generator"} and pipeline.info["align"]["method"] == "haste"
    assert pipeline([1], seed=0).shape == (1, 3, 16, 16)
    import json

    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["proj_loss"] != 0 for r in records] == [True, True, True, False, False]


@pytest.mark.parametrize("preset", ["mnist-sit-repa", "mnist-sit-haste"])
def test_the_aligned_presets_train_with_the_built_in_teacher(tmp_path, preset):
    from effigen.training.experiment import build_experiment_dict
    from effigen.training.run import build_and_train

    overrides = [f"--trainer.output_dir={tmp_path}", "--trainer.max_steps=2", "--trainer.batch_size=8",
                 "--trainer.checkpoint_every=0", "--trainer.sample_every=0", "--trainer.progress=false",
                 "--network.hidden_size=32", "--network.num_heads=4", "--align.projector_dim=16",
                 "--sampler.num_steps=2", "--trainer.precision=fp32"]
    summary = build_and_train(build_experiment_dict(preset, overrides=overrides), quiet=True)
    records = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and '"proj_loss"' in records[-1]
    if preset.endswith("haste"):
        assert '"attn_loss"' in records[-1]
