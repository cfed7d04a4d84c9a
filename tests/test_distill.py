"""Guided distillation (post/distill.py, arXiv 2210.03142): the w embedding, stage 1 at initialisation, the progressive
target, a toy convergence check of "one student step = two teacher steps", and the folder / CLI round trip."""

import math

import pytest
import torch
from torch import nn

from effigen.config import ConfigError
from effigen.io import load_weights
from effigen.models.dit import DiT, DiTConfig
from effigen.objectives.ddpm import DDPMConfig, DDPMSamplerConfig, GaussianDiffusion
from effigen.objectives.flow_matching import FlowSamplerConfig, RectifiedFlow, RectifiedFlowConfig
from effigen.pipeline import Pipeline
from effigen.post.distill import (
    DiffusionFamily,
    FlowFamily,
    GuidanceDistillation,
    ProgressiveDistillation,
    step,
    student_from_teacher,
)
from effigen.rng import BatchRandom

from conftest import randomize


def tiny(**overrides) -> DiTConfig:
    base = dict(input_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=2)
    return DiTConfig(**{**base, **overrides})


# ------------------------------------------------------------------------------------------- the w embedding
def test_guidance_embedding_off_adds_nothing_and_on_is_wired():
    off = DiT(tiny())
    assert not any(k.startswith("w_embedder") for k in off.state_dict())
    x, t, y = torch.randn(2, 3, 4, 4), torch.rand(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="guidance_embed=True"):
        off(x, t, y, guidance=torch.ones(2))
    on = randomize(DiT(tiny(guidance_embed=True)))
    assert {k for k in on.state_dict() if not k.startswith("w_embedder")} == set(off.state_dict())
    with pytest.raises(ValueError, match="pass guidance=w"):
        on(x, t, y)
    # with a trained (non-zero) last layer, w changes the output
    assert not torch.allclose(on(x, t, y, guidance=torch.zeros(2)), on(x, t, y, guidance=torch.full((2,), 2.0)))


def test_stage1_student_is_the_teachers_conditional_prediction_at_init():
    teacher = randomize(DiT(tiny())).eval()
    student = student_from_teacher(teacher).eval()
    x, t, y = torch.randn(3, 3, 4, 4), torch.rand(3), torch.tensor([0, 1, 2])
    with torch.no_grad():
        cond = teacher(x, t, y)
        for w in (0.0, 2.5):
            assert torch.equal(student(x, t, y, guidance=torch.full((3,), w)), cond)
    # so the stage-1 loss is zero at w = 0 (its target there is the conditional prediction)
    family = FlowFamily(RectifiedFlow(RectifiedFlowConfig(prediction="data", time_sampling="uniform"), 2))
    objective = GuidanceDistillation(family, teacher, num_classes=2, w_min=0.0, w_max=0.0)
    batch = {"images": torch.rand(4, 3, 4, 4) * 2 - 1, "labels": torch.tensor([0, 1, 0, 1])}
    assert objective.loss(student, batch, BatchRandom.local(0, 4))["loss"].item() < 1e-10
    objective = GuidanceDistillation(family, teacher, num_classes=2, w_min=1.0, w_max=3.0)
    assert objective.loss(student, batch, BatchRandom.local(0, 4))["loss"].item() > 1e-6  # guided target differs


@pytest.mark.parametrize("kind", ["flow-linear", "flow-gvp", "ddpm-eps", "ddpm-v", "ddpm-x"])
def test_progressive_target_makes_one_step_land_on_the_teachers_two(kind):
    torch.manual_seed(0)
    if kind.startswith("flow"):
        family = FlowFamily(RectifiedFlow(RectifiedFlowConfig(path=kind.split("-")[1], prediction="velocity"), 2))
    else:
        family = DiffusionFamily(GaussianDiffusion(DDPMConfig(learn_sigma=False), 2), kind.split("-")[1])
    grid = family.grid(8)
    assert torch.equal(family.grid(4), grid[::2])  # the grids nest under halving
    index = torch.tensor([0, 2, 4, 6])
    t, s = grid[index], grid[index + 2]
    z_t, z_s = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    target = family.step_target(z_t, z_s, t, s)
    torch.testing.assert_close(family.step_regression(target, z_t, t, s), z_s, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("teacher_prediction", ["noise", "velocity", "data"])
@pytest.mark.parametrize("student", ["teacher", "eps", "x", "v"])
def test_stage1_target_is_the_teachers_x0_whatever_either_predicts(teacher_prediction, student):
    """A DDPM teacher's output is read in its own parameterisation, the student's in its own: an exact teacher gives
    the data point as target, and an exact student in its parameterisation matches it."""
    objective = GaussianDiffusion(DDPMConfig(learn_sigma=False, prediction=teacher_prediction), 2)
    family = DiffusionFamily(objective, student)
    x0, noise = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4)
    k = torch.tensor([0, 250, 600, 999])
    alpha, sigma = family.coefficients(k, 4)
    z = alpha * x0 + sigma * noise
    exact = {"eps": noise, "x": x0, "v": alpha * noise - sigma * x0}
    teacher_output = exact[DiffusionFamily.KINDS[teacher_prediction]]
    torch.testing.assert_close(family.teacher_regression(teacher_output, z, k), x0, atol=2e-3, rtol=1e-3)
    expected_student = DiffusionFamily.KINDS[teacher_prediction] if student == "teacher" else student
    assert family.parameterization == expected_student
    torch.testing.assert_close(family.regression(exact[expected_student], z, k), x0, atol=2e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------- toy convergence
class MixtureDenoiser(nn.Module):
    """The exact guided E[x_0 | z_t] of a few fixed images per class on the linear path (a converged teacher)."""

    def __init__(self, points: torch.Tensor, point_labels: torch.Tensor, num_classes: int):
        super().__init__()
        self.points, self.point_labels, self.num_classes = points, point_labels, num_classes

    def posterior_mean(self, z, t, labels):
        alpha, sigma = (1 - t).view(-1, 1), t.view(-1, 1)
        d2 = ((z.flatten(1)[:, None] - alpha[:, :, None] * self.points.flatten(1)[None]) ** 2).sum(-1)  # (B, P)
        allowed = (labels[:, None] == self.num_classes) | (labels[:, None] == self.point_labels[None])
        logits = torch.where(allowed, -d2 / (2 * sigma**2), torch.full_like(d2, -math.inf))
        return (logits.softmax(-1) @ self.points.flatten(1)).view_as(z)

    def forward(self, z, t, labels, guidance=None):
        cond = self.posterior_mean(z, t, labels)
        if guidance is None:
            return cond
        uncond = self.posterior_mean(z, t, torch.full_like(labels, self.num_classes))
        w = guidance.view(-1, 1, 1, 1)
        return (1 + w) * cond - w * uncond


def test_one_student_step_matches_two_teacher_steps_after_training():
    torch.manual_seed(0)
    points = torch.rand(4, 3, 4, 4) * 2 - 1
    point_labels = torch.tensor([0, 0, 1, 1])
    teacher = MixtureDenoiser(points, point_labels, 2)
    family = FlowFamily(RectifiedFlow(RectifiedFlowConfig(prediction="data", time_sampling="uniform"), 2))
    objective = ProgressiveDistillation(family, teacher, num_classes=2, w_min=0.0, w_max=3.0, student_steps=2)
    student = DiT(tiny(guidance_embed=True, hidden_size=64))

    # a fixed evaluation set: every grid point of the student, w in {0, 1.5, 3}
    generator = torch.Generator().manual_seed(1)
    n = 96
    pick = torch.randint(4, (n,), generator=generator)
    labels, x0 = point_labels[pick], points[pick]
    index = 2 * torch.randint(2, (n,), generator=generator)
    grid = objective.teacher_grid
    t, t_mid, t_next = grid[index], grid[index + 1], grid[index + 2]
    z = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * torch.randn(n, 3, 4, 4, generator=generator)
    w = torch.tensor([0.0, 1.5, 3.0]).repeat(n // 3)
    with torch.no_grad():
        reference = objective.teacher_two_steps(z, t, t_mid, t_next, labels, w, 3)

    def mismatch() -> float:
        with torch.no_grad():
            one = step(family, student(z, t, labels, guidance=w), z, t, t_next)
        return ((one - reference) ** 2).mean().item()

    before = mismatch()
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-3)
    for i in range(300):
        pick = torch.randint(4, (64,), generator=generator)
        batch = {"images": points[pick], "labels": point_labels[pick]}
        loss = objective.loss(student, batch, BatchRandom(0, i, 0, 64, 0, 64))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = mismatch()
    assert after < 0.05 * before, (before, after)


# ------------------------------------------------------------------------------------------- folders and the CLI
CLASSES = [str(i) for i in range(10)]


def make_teacher(folder, method="dit-flow"):
    torch.manual_seed(0)
    config = DiTConfig(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                       learn_sigma=method == "dit-ddpm")
    network = randomize(DiT(config), std=0.02)
    info = {"dataset": "mnist", "resolution": 8, "class_names": CLASSES}
    if method == "dit-flow":
        objective, sampler = RectifiedFlowConfig(prediction="data"), FlowSamplerConfig(solver="heun", num_steps=3, cfg_scale=2.0)
    else:
        objective, sampler = DDPMConfig(), DDPMSamplerConfig(num_steps=10, cfg_scale=3.0)
    return Pipeline(method, network, objective, sampler, info).save_pretrained(folder)


def distill_args(teacher, out, *extra):
    return ["--from", str(teacher), "--out", str(out), "--batch-size", "4", "--trainer.precision=fp32",
            "--trainer.progress=false", "--trainer.log_every=1", *map(str, extra)]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    from effigen.cli.distill import run

    root = tmp_path_factory.mktemp("distill")
    teacher = make_teacher(root / "teacher")
    assert run(distill_args(teacher, root / "out", "--steps", 1, "--teacher-steps", 2, "--max-steps", 2)) == 0
    return root


def test_all_stages_write_pipeline_folders_that_sample_with_the_distilled_steps(distilled):
    out = distilled / "out"
    stage1 = Pipeline.from_pretrained(out / "guidance" / "final")
    assert stage1.method.name == "dit-distilled" and stage1.sampler_config.num_steps == 2
    assert stage1.generator.config.guidance_embed
    final = Pipeline.from_pretrained(out / "final")
    assert final.sampler_config.num_steps == 1 and final.sampler_config.guidance_w == 1.0  # teacher cfg 2.0 = 1 + w
    assert final.objective_config.teacher_method == "dit-flow" and final.objective_config.stage == "progressive"
    assert final.number_of_evaluations() == 1
    calls = []
    final.generator.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    images = final([0, 1, 2], seed=0)
    assert images.shape == (3, 3, 8, 8) and torch.isfinite(images).all() and calls == [3]
    torch.testing.assert_close(final([0, 1, 2], seed=0), images, rtol=0, atol=0)
    # round 2 started from round 1's student: its teacher was stage 1's final folder
    assert (out / "progressive_2to1" / "final" / "model_index.json").is_file()


def test_stochastic_sampler_is_seeded_and_differs_from_the_deterministic_one(distilled):
    pipeline = Pipeline.from_pretrained(distilled / "out" / "guidance" / "final")  # 2 steps
    a = pipeline([3, 4], seed=5, stochastic=True)
    torch.testing.assert_close(pipeline([3, 4], seed=5, stochastic=True), a, rtol=0, atol=0)
    assert not torch.allclose(a, pipeline([3, 4], seed=5))
    assert not torch.allclose(a, pipeline([3, 4], seed=6, stochastic=True))
    assert pipeline.number_of_evaluations(stochastic=True) == 2


def test_a_stage_resumes_exactly(distilled):
    from effigen.cli.distill import run

    teacher = distilled / "teacher"
    common = ["--stage", "guidance", "--teacher-steps", 2, "--steps", 2, "--trainer.checkpoint_every=2"]
    assert run(distill_args(teacher, distilled / "a", *common, "--max-steps", 4)) == 0
    assert run(distill_args(teacher, distilled / "b", *common, "--max-steps", 2)) == 0
    assert run(distill_args(teacher, distilled / "b", *common, "--max-steps", 4)) == 0  # resumes from step 2
    a = load_weights(distilled / "a" / "final" / "generator" / "model.safetensors")
    b = load_weights(distilled / "b" / "final" / "generator" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["w_embedder.mlp.2.weight"], torch.zeros_like(a["w_embedder.mlp.2.weight"]))


def test_ddpm_teacher_distills_with_v_parameterisation(tmp_path):
    from effigen.cli.distill import run

    teacher = make_teacher(tmp_path / "teacher", "dit-ddpm")
    assert run(distill_args(teacher, tmp_path / "out", "--steps", 1, "--teacher-steps", 2, "--max-steps", 1,
                            "--parameterization", "v", "--w-max", 3)) == 0
    pipeline = Pipeline.from_pretrained(tmp_path / "out" / "final")
    assert pipeline.objective_config.parameterization == "v" and pipeline.sampler_config.guidance_w == 2.0
    images = pipeline([1, 2], seed=0)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_latent_teacher_distils_in_its_latent_space_and_students_decode(tmp_path):
    from effigen.cli.distill import run
    from effigen.data.latents import LatentDataset
    from effigen.tokenizers.kl_vae import KLVAE, KLVAEConfig

    torch.manual_seed(0)
    vae = randomize(KLVAE(KLVAEConfig(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, resolution=8,
                                      scaling_factor=1.0)), std=0.05).eval()
    config = DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    info = {"dataset": "mnist", "resolution": 8, "class_names": CLASSES}
    teacher = Pipeline("dit-flow", randomize(DiT(config), std=0.02), RectifiedFlowConfig(prediction="velocity"),
                       FlowSamplerConfig(solver="euler", num_steps=2, cfg_scale=2.0), info, vae).save_pretrained(tmp_path / "t")
    assert run(distill_args(teacher, tmp_path / "out", "--steps", 1, "--teacher-steps", 2, "--max-steps", 1,
                            "--data.holdout_fraction=0.9")) == 0
    cache = LatentDataset(tmp_path / "out" / "latents", 8)
    assert cache[0][0].shape == (4, 4, 4) and len(cache) > 0  # the students trained on the teacher's latents
    for folder in (tmp_path / "out" / "guidance" / "final", tmp_path / "out" / "final"):
        student = Pipeline.from_pretrained(folder)
        assert student.method.name == "dit-distilled" and isinstance(student.tokenizer, KLVAE)
        assert all(torch.equal(a, b) for a, b in zip(student.tokenizer.state_dict().values(), vae.state_dict().values()))
        assert student([0, 1], seed=0, output_type="latent").shape == (2, 4, 4, 4)
        images = student([0, 1], seed=0)
        assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_clear_errors(tmp_path, distilled):
    from effigen.cli.distill import run
    from effigen.io import write_json

    teacher = distilled / "teacher"
    with pytest.raises(ConfigError, match="not a pipeline folder"):
        run(["--from", str(tmp_path), "--out", str(tmp_path / "o")])
    token = tmp_path / "var"
    (token / "generator").mkdir(parents=True)
    write_json(token / "model_index.json", {"method": "var"})
    write_json(token / "generator" / "config.json", {})
    with pytest.raises(ConfigError, match="token models"):
        run(["--from", str(token), "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="not --steps 4 times a power of two"):
        run(distill_args(teacher, tmp_path / "o", "--teacher-steps", 12))
    with pytest.raises(ConfigError, match="--stage progressive starts from a stage-1"):
        run(distill_args(teacher, tmp_path / "o", "--stage", "progressive"))
    with pytest.raises(ConfigError, match="outside the trained range"):
        run(distill_args(teacher, tmp_path / "o", "--w-max", 0.5))
    with pytest.raises(ConfigError, match="already a dit-distilled student"):
        run(distill_args(distilled / "out" / "final", tmp_path / "o"))
