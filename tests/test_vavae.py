"""VA-VAE's vision-foundation alignment (VF loss) on the KL-VAE objective (objectives/kl_vae.py): the margin terms
on hand-computed cases, the distance-matrix term's rotation invariance, the adaptive weight, the switch-off being the
old loss exactly, config errors, and a training run of the mnist-vavae preset that resumes exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effigen.config import ConfigError, config_from_dict
from effigen.io import load_weights
from effigen.objectives.autoencoder import AuxiliaryModules, AutoencoderLoss, PatchDiscriminator
from effigen.objectives.kl_vae import KLVAELoss, KLVAELossConfig, vf_loss_terms
from effigen.rng import BatchRandom
from effigen.teachers.base import Teacher
from effigen.tokenizers.kl_vae import KLVAE, KLVAEConfig


class ToyTeacher(Teacher):
    """A frozen stand-in for a vision encoder: per-token tanh of a fixed 1x1 conv of the average-pooled image."""

    name, patch_size, embed_dim, native_grid, interpolates = "toy", 4, 6, 8, True

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.proj = nn.Conv2d(3, self.embed_dim, 1)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=generator))
            self.proj.bias.copy_(torch.randn(self.proj.bias.shape, generator=generator) * 0.1)
        self.frozen()

    def _features(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        return torch.tanh(self.proj(F.adaptive_avg_pool2d(images, grid))).flatten(2).transpose(1, 2)


class FixedGridTeacher(ToyTeacher):
    name, native_grid, interpolates = "fixed", 3, False


def tiny_vae(latent_channels: int = 8) -> KLVAE:
    torch.manual_seed(0)
    return KLVAE(KLVAEConfig(base_channels=16, channel_multipliers=(1, 2), num_res_blocks=1, resolution=16,
                             latent_channels=latent_channels))


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def unit(cosines) -> torch.Tensor:
    """Unit vectors in 2-D at the given cosines to (1, 0)."""
    c = torch.tensor(cosines, dtype=torch.float64)
    return torch.stack((c, (1 - c.square()).clamp_min(0).sqrt()), -1)


# ---------------------------------------------------------------------------------------------- the two terms
def test_marginal_cosine_term_by_hand_and_its_margin():
    cosines = [1.0, 0.6, 0.5 + 1e-3, 0.5, 0.5 - 1e-3, 0.0, -1.0]
    z = unit(cosines)[None] * 3.0  # lengths do not matter, only directions
    f = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(len(cosines), 2)[None]
    cos_term, _ = vf_loss_terms(z, f, cos_margin=0.5, distmat_margin=0.25)
    # ReLU(1 - 0.5 - cos): zero from cos = 0.5 on, then 1e-3, 0.5, 1.5
    expected = [0.0, 0.0, 0.0, 0.0, 1e-3, 0.5, 1.5]
    assert cos_term.item() == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    for c, want in zip(cosines, expected):  # token by token: the margin clips exactly at cos = 1 - m1
        one, _ = vf_loss_terms(unit([c])[None], f[:, :1], cos_margin=0.5)
        assert one.item() == pytest.approx(want, abs=1e-12), c
    no_margin, _ = vf_loss_terms(z, f, cos_margin=0.0)
    assert no_margin.item() == pytest.approx(sum(1 - c for c in cosines) / len(cosines), abs=1e-12)


def test_marginal_distance_matrix_term_by_hand_and_its_margin():
    # f: tokens (1,0), (1,0), (0,1); z': (1,0), (0.6,0.8), (0,1)
    f = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    z = torch.tensor([[[2.0, 0.0], [0.6, 0.8], [0.0, 0.5]]], dtype=torch.float64)
    # S_f = [[1,1,0],[1,1,0],[0,0,1]], S_z = [[1,.6,0],[.6,1,.8],[0,.8,1]], |S_z - S_f| = [[0,.4,0],[.4,0,.8],[0,.8,0]]
    cos_term, distmat = vf_loss_terms(z, f, cos_margin=0.5, distmat_margin=0.25)
    assert distmat.item() == pytest.approx((2 * 0.15 + 2 * 0.55) / 9, abs=1e-12)
    assert cos_term.item() == pytest.approx(0.0, abs=1e-12)  # cosines 1, 0.6, 1 all within the margin
    _, no_margin = vf_loss_terms(z, f, distmat_margin=0.0)
    assert no_margin.item() == pytest.approx((2 * 0.4 + 2 * 0.8) / 9, abs=1e-12)
    # two tokens whose similarity differs by just under / just over m2 = 0.25: clipped to zero / the excess
    f2 = unit([1.0, 1.0])[None]
    for diff, want in [(0.25 - 1e-3, 0.0), (0.25, 0.0), (0.25 + 1e-3, 2 * 1e-3 / 4)]:
        _, d = vf_loss_terms(unit([1.0, 1.0 - diff])[None], f2, distmat_margin=0.25)
        assert d.item() == pytest.approx(want, abs=1e-12), diff
    with pytest.raises(ValueError, match="differ in shape"):
        vf_loss_terms(torch.zeros(1, 3, 2), torch.zeros(1, 4, 2))


def test_distance_matrix_term_is_invariant_to_rotations():
    g = torch.Generator().manual_seed(0)
    z, f = torch.randn(3, 16, 8, generator=g, dtype=torch.float64), torch.randn(3, 16, 8, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    r, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    cos, distmat = vf_loss_terms(z, f)
    cos_q, distmat_q = vf_loss_terms(z @ q, f @ q)  # a common rotation: both terms unchanged
    torch.testing.assert_close(distmat_q, distmat, rtol=0, atol=1e-12)
    torch.testing.assert_close(cos_q, cos, rtol=0, atol=1e-12)
    _, distmat_qr = vf_loss_terms(z @ q, f @ r)  # the token-token similarities of each side are its own: even two
    torch.testing.assert_close(distmat_qr, distmat, rtol=0, atol=1e-12)  # different rotations leave L_mdms as it is
    cos_qr, _ = vf_loss_terms(z @ q, f @ r)
    assert abs(cos_qr.item() - cos.item()) > 1e-3  # while the per-token cosine term sees them


# ---------------------------------------------------------------------------------------------- the objective
def vf_objective(**overrides) -> KLVAELoss:
    config = KLVAELossConfig(vf_weight=0.1, vf_teacher="toy", **overrides)
    return KLVAELoss(config, teacher=ToyTeacher())


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_encoders_last_layer():
    vae = tiny_vae()
    objective = vf_objective()
    objective.prepare_network(vae)
    proj = objective.linear_proj
    assert isinstance(proj, nn.Conv2d) and proj.bias is None and tuple(proj.weight.shape) == (6, 8, 1, 1)
    x = images()
    random = BatchRandom(0, 0, 0, 2, 0, 2)
    out = objective.loss(vae, {"images": x}, random)
    assert {"vf_loss", "vf_cos", "vf_distmat", "vf_weight", "vf_adaptive", "l1", "kl"} <= set(out)
    out["loss"].backward()
    got = {n: p.grad.clone() for n, p in vae.named_parameters()}
    proj_grad = proj.weight.grad.clone()
    vae.zero_grad(set_to_none=True), proj.zero_grad(set_to_none=True)

    # recompute by hand: the sampled z (same noise), the teacher's tokens at the 8x8 latent grid, the two terms
    noise = BatchRandom(0, 0, 0, 2, 0, 2).randn(8, 8, 8)
    mean, logvar = vae.posterior(x)
    z = mean + torch.exp(0.5 * logvar) * noise
    reconstruction = vae.decode_raw(z)
    rec = (reconstruction - x).abs().mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    f = ToyTeacher().features(x, grid=8)
    zp = proj(z).flatten(2).transpose(1, 2)
    cos = F.relu(0.5 - F.cosine_similarity(zp, f, dim=-1)).mean()
    zn, fn = F.normalize(zp, dim=-1), F.normalize(f, dim=-1)
    distmat = F.relu((zn @ zn.transpose(1, 2) - fn @ fn.transpose(1, 2)).abs() - 0.25).mean()
    vf = distmat + cos
    last = vae.encoder.conv_out.weight
    ratio = (torch.autograd.grad(rec, last, retain_graph=True)[0].norm()
             / (torch.autograd.grad(vf, last, retain_graph=True)[0].norm() + 1e-4))
    torch.testing.assert_close(out["vf_adaptive"], ratio, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["vf_weight"], 0.1 * ratio, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["vf_loss"], vf.detach(), rtol=1e-6, atol=1e-7)
    total = rec + 1e-6 * kl + 0.1 * ratio.detach() * vf
    torch.testing.assert_close(out["loss"], total, rtol=1e-6, atol=1e-7)
    names = [n for n, _ in vae.named_parameters()]
    for name, want in zip(names, torch.autograd.grad(total, list(vae.parameters()), retain_graph=True)):
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-7, msg=name)  # the weight carries no gradient
    torch.testing.assert_close(proj_grad, torch.autograd.grad(total, proj.weight)[0], rtol=1e-4, atol=1e-8)
    assert not any(p.requires_grad for p in objective.teacher.parameters())


def test_constant_vf_weight_when_not_adaptive_and_the_official_clamp():
    vae = tiny_vae()
    objective = vf_objective(adaptive_vf=False)
    objective.prepare_network(vae)
    out = objective.loss(vae, {"images": images()}, BatchRandom(0, 0, 0, 2, 0, 2))
    assert "vf_adaptive" not in out and out["vf_weight"].item() == pytest.approx(0.1)
    rec_plain = KLVAELoss(KLVAELossConfig()).loss(vae, {"images": images()}, BatchRandom(0, 0, 0, 2, 0, 2))["loss"]
    torch.testing.assert_close(out["loss"], rec_plain + 0.1 * out["vf_loss"], rtol=1e-6, atol=1e-7)
    # the ratio is clamped to [0, 1e4] for the GAN (VQGAN) and to [0, 1e8] for the VF term (LightningDiT's code)
    w = nn.Parameter(torch.ones(4))
    big, tiny = 1e6 * w.sum(), 1e-9 * w.sum()
    assert AutoencoderLoss.adaptive_weight(big, tiny, w).item() == 1e4
    assert AutoencoderLoss.adaptive_weight(big, tiny, w, max_weight=1e8).item() == pytest.approx(1e8)
    ratio = AutoencoderLoss.adaptive_weight(3 * w.sum(), 2 * w.sum(), w, max_weight=1e8)
    assert ratio.item() == pytest.approx(3 * 2 / (2 * 2 + 1e-4)) and not ratio.requires_grad


def old_kl_loss(objective: KLVAELoss, model, x, random) -> dict[str, torch.Tensor]:
    """The KL-VAE loss as it was before VA-VAE (commit 9aee36a), spelled out."""
    config = objective.config
    noise = random.randn(*model.latent_shape(x.shape[-1]))
    reconstruction, mean, logvar = model(x, noise)
    reconstruction = reconstruction.float()
    l2 = (reconstruction - x).square().mean()
    l1 = (reconstruction - x).abs().mean()
    rec = config.l2_weight * l2 + config.l1_weight * l1
    perceptual = objective.perceptual(reconstruction, x)
    rec = rec + config.perceptual_weight * perceptual
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    loss = rec + config.kl_weight * kl
    disc = objective.discriminator
    frozen = {k: v.detach() for k, v in disc.named_parameters()}
    gan_g = -torch.func.functional_call(disc, frozen, (reconstruction,)).float().mean()
    last = model.decoder.last_layer
    weight = (torch.autograd.grad(rec, last, retain_graph=True)[0].norm()
              / (torch.autograd.grad(gan_g, last, retain_graph=True)[0].norm() + 1e-4)).clamp(0.0, 1e4).detach()
    gan_d = 0.5 * (F.relu(1 - disc(x.detach()).float()).mean() + F.relu(1 + disc(reconstruction.detach()).float()).mean())
    loss = loss + (weight * config.gan_weight * gan_g + gan_d)
    return {"l2": l2, "l1": l1, "perceptual": perceptual, "gan_g": gan_g, "gan_d": gan_d, "gan_weight": weight,
            "kl": kl, "loss": loss}


def test_vf_weight_zero_is_exactly_the_old_loss():
    vae = tiny_vae(4)
    config = dict(l2_weight=1.0, perceptual_weight=0.1, perceptual_net="digits-net", gan_weight=0.5,
                  discriminator_layers=1, discriminator_channels=8)
    objective = KLVAELoss(KLVAELossConfig(**config, vf_weight=0.0, vf_teacher="ignored when off"))
    assert objective.teacher is None
    objective.prepare_network(vae)  # nothing to build
    assert objective.linear_proj is None
    disc = objective.trainable_modules()
    assert isinstance(disc, PatchDiscriminator) and all(k.startswith("main.") for k in disc.state_dict())
    x = images()
    out = objective.loss(vae, {"images": x}, BatchRandom(0, 3, 0, 2, 0, 2))
    assert not any(k.startswith("vf_") for k in out)
    out["loss"].backward()
    got = [p.grad.clone() for p in [*vae.parameters(), *disc.parameters()]]
    vae.zero_grad(set_to_none=True), disc.zero_grad(set_to_none=True)
    old = old_kl_loss(objective, vae, x, BatchRandom(0, 3, 0, 2, 0, 2))
    assert out.keys() == old.keys()
    for key in old:
        assert torch.equal(out[key], old[key]), key
    old["loss"].backward()
    for a, b in zip(got, [p.grad for p in [*vae.parameters(), *disc.parameters()]]):
        assert torch.equal(a, b)


def test_auxiliary_modules_with_vf_and_the_discriminator_before_the_gan_starts():
    vae = tiny_vae()
    objective = vf_objective(gan_weight=0.5, gan_start_step=2, discriminator_layers=1, discriminator_channels=8)
    objective.prepare_network(vae)
    aux = objective.trainable_modules()
    assert isinstance(aux, AuxiliaryModules) and set(aux) == {"discriminator", "linear_proj"}
    keys = set(aux.state_dict())
    assert "linear_proj.weight" in keys and all(k == "linear_proj.weight" or k.startswith("discriminator.main.")
                                                for k in keys)
    early = objective.loss(vae, {"images": images()}, BatchRandom(0, 1, 0, 2, 0, 2))
    assert "gan_g" not in early
    early["loss"].backward()  # every auxiliary parameter gets a gradient (zeros for the waiting discriminator: DDP)
    assert all(p.grad is not None and not p.grad.any() for p in objective.discriminator.parameters())
    assert objective.linear_proj.weight.grad.abs().sum() > 0
    aux.zero_grad(set_to_none=True), vae.zero_grad(set_to_none=True)
    late = objective.loss(vae, {"images": images()}, BatchRandom(0, 2, 0, 2, 0, 2))
    assert {"gan_g", "gan_d", "vf_loss"} <= set(late) and torch.isfinite(late["loss"])
    late["loss"].backward()
    assert all(p.grad is not None for p in aux.parameters())


def test_vf_settings_are_checked():
    def build(**objective):
        return config_from_dict(KLVAELossConfig, objective, "objective")

    assert build(vf_weight=0.1, vf_teacher="mnist-vit").vf_weight == 0.1
    for settings, words in [
        ({"vf_weight": -0.1}, "vf_weight = -0.1 is out of range"),
        ({"vf_weight": 0.1}, "set vf_teacher"),
        ({"vf_weight": 0.1, "vf_teacher": "  "}, "set vf_teacher"),
        ({"cos_margin": 2.0}, "cos_margin = 2.0 is out of range"),
        ({"distmat_margin": -0.25}, "distmat_margin = -0.25 is out of range"),
        ({"cos_weight": float("nan")}, "cos_weight"),
        ({"vf_weight": 0.1, "vf_teacher": "toy", "cos_weight": 0, "distmat_weight": 0}, "aligns nothing"),
        ({"vf_wieght": 0.1}, "valid keys"),
    ]:
        with pytest.raises(ConfigError, match=words):
            build(**settings)
    # a teacher whose fixed grid cannot serve the latent grid is named before training
    objective = KLVAELoss(KLVAELossConfig(vf_weight=0.1, vf_teacher="fixed"), teacher=FixedGridTeacher())
    with pytest.raises(ConfigError, match=r"vf_teacher='fixed' cannot serve the 8x8 latent grid"):
        objective.prepare_network(tiny_vae())
    with pytest.raises(RuntimeError, match="prepare_network"):
        vf_objective().loss(tiny_vae(), {"images": images()}, BatchRandom(0, 0, 0, 2, 0, 2))


def test_an_unknown_teacher_is_a_config_error():
    objective = KLVAELoss(KLVAELossConfig(vf_weight=0.1, vf_teacher="no-such-teacher"))  # loads nothing yet
    with pytest.raises(ConfigError, match="objective.vf_teacher='no-such-teacher'"):
        objective.prepare_network(tiny_vae())


# ---------------------------------------------------------------------------------------------- training end to end
def _vavae_run(path, steps: int) -> dict:
    from effigen.training.experiment import build_experiment_dict

    return build_experiment_dict("mnist-vavae", overrides=[
        f"--trainer.output_dir={path}", "--network_preset=KL-Test", "--network.latent_channels=8",
        "--data.resolution=16", f"--trainer.max_steps={steps}", "--trainer.batch_size=4",
        "--trainer.checkpoint_every=2", "--trainer.sample_every=0", "--trainer.log_every=1",
        "--trainer.progress=false", "--trainer.precision=fp32", "--trainer.warmup_steps=1",
        "--objective.vf_teacher=toy"])


def test_mnist_vavae_trains_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    import effigen.teachers
    from effigen.pipeline import Pipeline
    from effigen.training import trainer as trainer_module
    from effigen.training.run import build_and_train
    from effigen.training.trainer import list_checkpoints

    loaded = []

    def toy_load_teacher(spec, *args, **kwargs):
        loaded.append(spec)
        return ToyTeacher()

    monkeypatch.setattr(effigen.teachers, "load_teacher", toy_load_teacher, raising=False)
    straight = build_and_train(_vavae_run(tmp_path / "straight", 4), quiet=True)
    assert straight["steps"] == 4 and loaded == ["toy"]
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for r in records:
        for key in ("loss", "l1", "l2", "perceptual", "kl", "vf_loss", "vf_cos", "vf_distmat", "vf_weight", "vf_adaptive"):
            assert math.isfinite(r[key]), (key, r)
    # the final folder is the tokenizer alone, calibrated; the projection lives in the training state only
    pipeline = Pipeline.from_pretrained(straight["pipeline"])
    vae = pipeline.tokenizer
    assert isinstance(vae, KLVAE) and vae.config.latent_channels == 8 and len(vae.config.channel_std) == 8
    final = load_weights(tmp_path / "straight" / "final" / "tokenizer" / "model.safetensors")
    assert final.keys() == vae.state_dict().keys() and not any("linear_proj" in k for k in final)
    assert loaded == ["toy"]  # loading the trained tokenizer does not load the teacher

    original_step = trainer_module.Trainer.train_step

    def killed_after_two(self, batches):
        if self.step == 2:
            raise KeyboardInterrupt("simulated kill")
        return original_step(self, batches)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module.Trainer, "train_step", killed_after_two)
        with pytest.raises(KeyboardInterrupt):
            build_and_train(_vavae_run(tmp_path / "resumed", 4), quiet=True)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step_0000002"]
    summary = build_and_train(_vavae_run(tmp_path / "resumed", 4), quiet=True)
    assert summary["steps_this_run"] == 2

    def state(folder):
        last = list_checkpoints(folder)[-1] / "train_state"
        return (load_weights(last / "model.safetensors"), load_weights(last / "auxiliary.safetensors"),
                torch.load(last / "optimizer.pt", weights_only=True)["optimizer"])

    a, b = state(tmp_path / "straight"), state(tmp_path / "resumed")
    assert set(a[1]) == {"linear_proj.weight"}  # the VF projection is checkpointed (no GAN in this preset)
    for one, two in zip(a[:2], b[:2]):
        assert one.keys() == two.keys() and one
        for key in one:
            assert torch.equal(one[key], two[key]), key
    for key, values in a[2]["state"].items():
        for name, value in values.items():
            assert torch.equal(value, b[2]["state"][key][name]), (key, name)
    metrics = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["vf_loss"] for r in metrics] == [r["vf_loss"] for r in records]


def test_two_processes_equal_one_process_with_vf_and_a_waiting_gan(tmp_path):
    """DDP with the discriminator and the VF projection in one auxiliary wrapper, across gan_start_step (before it
    the discriminator gets zero gradients so that DDP's reduction completes): the same run as one process on the
    whole batch. The built-in mnist-net teacher (a subprocess cannot take a monkeypatched one)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    args = ["--preset", "mnist-vavae", "--network_preset=KL-Test", "--network.latent_channels=8", "--data.resolution=16",
            "--trainer.max_steps=4", "--trainer.checkpoint_every=4", "--trainer.batch_size=8", "--trainer.device=cpu",
            "--trainer.precision=fp32", "--trainer.sample_every=0", "--trainer.warmup_steps=1",
            "--trainer.progress=false", "--objective.vf_teacher=mnist-net", "--objective.gan_weight=0.5",
            "--objective.gan_start_step=2", "--objective.discriminator_layers=1", "--objective.discriminator_channels=8",
            "--objective.perceptual_weight=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    for nproc in (1, 2):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "effigen", "train", *args, f"--trainer.output_dir={tmp_path / str(nproc)}"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = "checkpoints/step_0000004/train_state/auxiliary.safetensors"
    one, two = load_weights(tmp_path / "1" / state), load_weights(tmp_path / "2" / state)
    assert {k.split(".")[0] for k in one} == {"discriminator", "linear_proj"}
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-6, rtol=1e-5, msg=key)
    records = [[json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in "12"]
    for a, b in zip(*records):
        for key in ("loss", "vf_loss", "vf_weight", "gan_d"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
    # the autoencoders differ only by rounding (conv biases before GroupNorm get near-zero gradients that Adam turns
    # into +-lr steps: see test_training's tokenizer comparison)
    a, b = (load_weights(tmp_path / n / "final" / "tokenizer" / "model.safetensors") for n in "12")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-3, rtol=0, msg=key)
