"""VAR's multi-scale residual VQ tokenizer (`effigen.tokenizers.msvq`) and its training objective
(`effigen.objectives.vq_tokenizer`): token round trips, the phi layouts, the teacher-forcing input, the VQ loss
and its gradients, usage tracking, dead-code restarts, input errors, and a tokenizer run end to end (GAN and
perceptual terms on, exact resume). Parity with the official code is in tests/parity/test_var_parity.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from effigen.training.run import build_and_train
from effigen.training.experiment import build_experiment_dict
from effigen.io import load_weights
from effigen.objectives.vq_tokenizer import (MSVQ_PRESETS, PatchDiscriminator, PerceptualDistance, VQTokenizerLoss,
                                             VQTokenizerLossConfig)
from effigen.pipeline import Pipeline
from effigen.rng import BatchRandom
from effigen.tokenizers.msvq import MultiScaleVQ, MultiScaleVQConfig
from effigen.training import trainer as trainer_module
from effigen.training.trainer import list_checkpoints


def tiny_config(**overrides) -> MultiScaleVQConfig:
    """MSVQ-Test at 8 px: 2x downsampling to a 4x4 latent, scales (1, 2, 4), 32 codes of 4 channels."""
    return MultiScaleVQConfig(**{**MSVQ_PRESETS["MSVQ-Test"], "resolution": 8, **overrides})


def make_tokenizer(seed: int = 0, **overrides) -> MultiScaleVQ:
    torch.manual_seed(seed)
    return MultiScaleVQ(tiny_config(**overrides)).eval()


def images(batch: int = 3, seed: int = 1, resolution: int = 8) -> torch.Tensor:
    return torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def tokenizer() -> MultiScaleVQ:
    return make_tokenizer()


# ---------------------------------------------------------------------------------------------- round trips
def test_indices_latents_and_decode_shapes_round_trip(tokenizer):
    x = images(3)
    indices = tokenizer.indices_from_images(x)
    assert [tuple(i.shape) for i in indices] == [(3, 1), (3, 4), (3, 16)]
    assert all(i.dtype == torch.int64 and 0 <= i.min() and i.max() < 32 for i in indices)
    latent = tokenizer.encode(x)
    assert latent.shape == (3, 4, 4, 4)
    with torch.no_grad():
        assert torch.allclose(tokenizer.latent_from_indices(indices), latent, atol=1e-6)
        decoded = tokenizer.decode(latent)
        # the cumulative latents after each scale: the last is encode(x); each equals the partial sum of the scales
        features = tokenizer.features(x)
        cumulative = tokenizer.quantize.quantize(features, return_latents=True)
        assert len(cumulative) == 3 and torch.equal(cumulative[-1], latent)
        for k in range(3):
            assert torch.allclose(tokenizer.latent_from_indices(indices[: k + 1]), cumulative[k], atol=1e-6), k
        assert all(torch.equal(a, b) for a, b in zip(tokenizer.quantize.quantize(features), indices))
    assert decoded.shape == (3, 3, 8, 8) and decoded.min() >= -1 and decoded.max() <= 1
    assert torch.equal(tokenizer.reconstruct(x), decoded)
    # the tokens of a sample do not depend on the batch it is in
    alone = tokenizer.indices_from_images(x[1:2])
    assert all(torch.equal(a[0], b[1]) for a, b in zip(alone, indices))


def test_single_scale_identity_recovers_codes_exactly():
    """A feature map built from codes is quantized back to those codes; with phi = identity (quant_resi=0) the
    latent is the feature map itself."""
    for quant_resi in (0.5, 0.0):
        tokenizer = make_tokenizer(scales=(4,), quant_resi=quant_resi, share_quant_resi=1)
        quant = tokenizer.quantize
        codes = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            f = quant.embed(codes, 4)
            (indices,) = quant.quantize(f)
            (latent,) = quant.quantize(f, return_latents=True)
        assert torch.equal(indices, codes), quant_resi
        if quant_resi == 0.0:
            assert torch.allclose(latent, f, atol=1e-6)
        else:
            assert not torch.allclose(latent, f, atol=1e-3)  # phi mixes in its conv at the last scale too


def test_multi_scale_identity_constant_map_is_the_first_scales_code():
    """With phi = identity and a zero code in the codebook, a constant feature map equal to one code is taken
    whole by scale 1; every finer scale picks the zero code and the latent is the map itself."""
    tokenizer = make_tokenizer(quant_resi=0.0, share_quant_resi=1)
    quant = tokenizer.quantize
    with torch.no_grad():
        quant.embedding.weight[5] = 0.0
        code = quant.embedding.weight[11]
        f = code.view(1, 4, 1, 1).expand(2, 4, 4, 4).clone()
        indices = quant.quantize(f)
        latent = quant.quantize(f, return_latents=True)[-1]
    assert torch.equal(indices[0], torch.full((2, 1), 11))
    assert torch.equal(indices[1], torch.full((2, 4), 5)) and torch.equal(indices[2], torch.full((2, 16), 5))
    assert torch.allclose(latent, f, atol=1e-5)


# ---------------------------------------------------------------------------------------------- phi layouts
def test_phi_selection_follows_the_official_ticks():
    scales = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    tokenizer = MultiScaleVQ(MultiScaleVQConfig(base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                                                latent_channels=4, vocab_size=8, scales=scales, resolution=32,
                                                share_quant_resi=4, attention=False, mid_attention=False))
    quant = tokenizer.quantize
    phis = list(quant.quant_resi.qresi_ls)
    assert [next(j for j, p in enumerate(phis) if p is quant.phi(si)) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    keys = [k for k in tokenizer.state_dict() if k.startswith("quantize.")]
    assert keys == ["quantize.ema_vocab_hit_SV", *[f"quantize.quant_resi.qresi_ls.{k}.{p}" for k in range(4)
                                                   for p in ("weight", "bias")], "quantize.embedding.weight"]


def test_phi_layouts_non_shared_shared_and_identity():
    non_shared = make_tokenizer(share_quant_resi=0).quantize
    assert [non_shared.phi(si) for si in range(3)] == list(non_shared.quant_resi)  # one per scale, in order
    assert len({id(non_shared.phi(si)) for si in range(3)}) == 3
    assert {f"quantize.quant_resi.{k}.weight" for k in range(3)} <= set(non_shared.state_dict(prefix="quantize."))
    fewer = make_tokenizer(share_quant_resi=0, phi_count=2).quantize  # `default_qresi_counts`: nearest of 2 ticks
    # ticks (1/4, 3/4): scale 2 of 3 sits at 1/2, a tie that goes to the first (numpy argmin), as officially
    assert [list(fewer.quant_resi).index(fewer.phi(si)) for si in range(3)] == [0, 0, 1]
    shared = make_tokenizer(share_quant_resi=1).quantize
    assert shared.phi(0) is shared.phi(1) is shared.phi(2)
    assert [k for k in shared.state_dict(prefix="quantize.") if "quant_resi" in k] == [
        "quantize.quant_resi.qresi.weight", "quantize.quant_resi.qresi.bias"]
    identity = make_tokenizer(share_quant_resi=1, quant_resi=0.0).quantize
    assert not [k for k in identity.state_dict() if "quant_resi" in k]
    h = torch.randn(1, 4, 4, 4)
    assert torch.equal(identity.phi(0)(h), h)
    phi = shared.phi(0)
    assert torch.allclose(phi(h), 0.5 * h + 0.5 * F.conv2d(h, phi.weight, phi.bias, padding=1), atol=1e-6)


# ---------------------------------------------------------------------------------------------- teacher forcing
def test_teacher_forcing_input_is_the_downsampled_cumulative_latent(tokenizer):
    x = images(2)
    indices = tokenizer.indices_from_images(x)
    with torch.no_grad():
        teacher = tokenizer.quantize.teacher_forcing_input(indices)
        cumulative = tokenizer.quantize.quantize(tokenizer.features(x), return_latents=True)
    assert teacher.shape == (2, 4 + 16, 4) and teacher.dtype == torch.float32
    blocks = torch.split(teacher, [4, 16], dim=1)
    for k, (side, block) in enumerate(zip((2, 4), blocks)):
        expected = F.interpolate(cumulative[k], size=(side, side), mode="area").permute(0, 2, 3, 1).reshape(2, side * side, 4)
        assert torch.allclose(block, expected, atol=1e-5), k
    # the last block is the latent after all but the last scale (no resize at the latent side)
    assert torch.allclose(blocks[-1], cumulative[-2].flatten(2).transpose(1, 2), atol=1e-5)
    # sampling's next_input builds the same inputs step by step
    quant, f_hat = tokenizer.quantize, torch.zeros(2, 4, 4, 4)
    with torch.no_grad():
        for k, side in enumerate((1, 2)):
            f_hat, nxt = quant.next_input(k, f_hat, quant.embed(indices[k], side))
            assert torch.allclose(nxt, blocks[k], atol=1e-5), k
        f_hat, nxt = quant.next_input(2, f_hat, quant.embed(indices[2], 4))
    assert nxt is None and torch.allclose(f_hat, cumulative[-1], atol=1e-5)


# ---------------------------------------------------------------------------------------------- VQ loss
def test_vq_loss_value_and_straight_through_gradients(tokenizer):
    tokenizer.train()
    x = images(4)
    with torch.no_grad():
        f = tokenizer.features(x)
        cumulative = tokenizer.quantize.quantize(f, return_latents=True)
        expected_loss = sum((1 + 0.25) * F.mse_loss(c, f) for c in cumulative) / 3
        expected_reconstruction = tokenizer.decoder(tokenizer.post_quant_conv(cumulative[-1]))
    reconstruction, vq_loss, hits = tokenizer(x)
    assert torch.isfinite(vq_loss) and torch.allclose(vq_loss, expected_loss, rtol=1e-5)
    assert torch.allclose(reconstruction, expected_reconstruction, atol=1e-5)  # forward value = decode(f_hat)
    assert hits.shape == (3, 32) and hits.sum(1).tolist() == [4.0, 16.0, 64.0]

    # the reconstruction loss reaches the encoder through the straight-through estimator, not the codebook
    (reconstruction - x).square().mean().backward(retain_graph=True)
    assert tokenizer.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tokenizer.quant_conv.weight.grad.abs().sum() > 0
    assert tokenizer.decoder.conv_out.weight.grad.abs().sum() > 0
    assert tokenizer.quantize.embedding.weight.grad is None
    tokenizer.zero_grad(set_to_none=True)
    # the VQ loss reaches the codes that were used (and only those), the phi convs and the encoder (commitment)
    vq_loss.backward()
    grad = tokenizer.quantize.embedding.weight.grad
    used = hits.sum(0) > 0
    assert grad[used].abs().sum(1).min() > 0 and grad[~used].abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tokenizer.quantize.quant_resi.parameters())
    assert tokenizer.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tokenizer.decoder.conv_out.weight.grad is None


# ---------------------------------------------------------------------------------------------- usage and restarts
def test_usage_ema_is_updated_by_training_forwards_only(tokenizer):
    quant = tokenizer.quantize
    x = images(4)
    tokenizer.indices_from_images(x), tokenizer.encode(x), tokenizer.reconstruct(x)
    assert quant.ema_vocab_hit_SV.abs().sum() == 0 and quant.restart_pool is None
    tokenizer.train()
    _, _, first = tokenizer(x)
    assert torch.equal(quant.ema_vocab_hit_SV, first)  # the first update copies the hits
    _, _, second = tokenizer(images(4, seed=2))
    assert torch.allclose(quant.ema_vocab_hit_SV, 0.99 * first + 0.01 * second)
    ema = quant.ema_vocab_hit_SV.clone()
    tokenizer.eval()
    tokenizer.indices_from_images(x)
    assert torch.equal(quant.ema_vocab_hit_SV, ema)
    # usage: per scale, % of codes whose EMA exceeds 8 % of a uniform share
    expected = [100.0 * float((row > row.sum() / 32 * 0.08).float().mean()) for row in ema]
    assert quant.usage() == pytest.approx(expected)
    assert all(0 < u <= 100 for u in quant.usage())


def test_eval_mode_forward_does_not_touch_usage_or_the_restart_pool(tokenizer):
    """An evaluation pass through forward (e.g. a validation loss) must not count as training: the official
    quantizer updates `ema_vocab_hit_SV` only `if self.training`."""
    quant = tokenizer.quantize
    tokenizer.train()
    tokenizer(images(4))
    ema, pool = quant.ema_vocab_hit_SV.clone(), quant.restart_pool.clone()
    tokenizer.eval()
    with torch.no_grad():
        _, vq_loss, _ = tokenizer(images(4, seed=5))
    assert torch.isfinite(vq_loss)
    assert torch.equal(quant.ema_vocab_hit_SV, ema)
    assert torch.equal(quant.restart_pool, pool)


def _dead(quant, codes):
    with torch.no_grad():
        quant.ema_vocab_hit_SV.fill_(1.0)
        quant.ema_vocab_hit_SV[:, codes] = 0.0


def test_restart_dead_codes_moves_only_dead_codes_onto_batch_residuals(tokenizer):
    quant, B = tokenizer.quantize, 4
    assert quant.restart_dead_codes(0.5, torch.Generator().manual_seed(0)) == 0  # no training batch seen yet
    tokenizer.train()
    x = images(B)
    tokenizer(x)
    pool = quant.restart_pool
    per_sample = [min(4, s * s) for s in quant.scales]  # up to 4 fixed positions per sample at every scale
    assert pool.shape == (B * sum(per_sample), 4)
    with torch.no_grad():
        assert torch.allclose(pool[:B], tokenizer.features(x).mean((2, 3)), atol=1e-5)  # scale 1: the means of f
    dead = torch.tensor([3, 7, 20, 31])
    _dead(quant, dead)
    ema, weight = quant.ema_vocab_hit_SV.clone(), quant.embedding.weight.detach().clone()
    assert quant.restart_dead_codes(0.5, torch.Generator().manual_seed(0)) == 4
    new = quant.embedding.weight.detach()
    alive = torch.ones(32, dtype=torch.bool)
    alive[dead] = False
    assert torch.equal(new[alive], weight[alive])
    assert not torch.equal(new[dead], weight[dead])
    distance_to_pool = (new[dead, None, :] - pool[None]).abs().amax(-1).amin(-1)
    assert torch.equal(distance_to_pool, torch.zeros(4))  # each revived code is a residual vector of the batch
    # revived codes get the average usage, so they are not restarted again at once
    assert torch.allclose(quant.ema_vocab_hit_SV[:, dead], ema.mean(1, keepdim=True).expand(-1, 4))
    assert torch.equal(quant.ema_vocab_hit_SV[:, alive], ema[:, alive])
    assert quant.restart_dead_codes(0.5, torch.Generator().manual_seed(0)) == 0


def test_a_revived_code_is_used_by_the_residual_it_was_copied_from():
    # one scale: the residual is the feature map itself, independent of the codebook, so the pixel whose vector a
    # dead code was moved onto picks that code (distance 0) in the next pass
    tokenizer = make_tokenizer(scales=(4,), share_quant_resi=1).train()
    x = images(4)
    _, _, hits = tokenizer(x)
    dead = int(hits[0].argmin())
    _dead(tokenizer.quantize, [dead])
    before = tokenizer.quantize.embedding.weight[dead].detach().clone()
    assert tokenizer.quantize.restart_dead_codes(0.5, torch.Generator().manual_seed(3)) == 1
    assert not torch.equal(tokenizer.quantize.embedding.weight[dead], before)
    _, _, hits = tokenizer(x)
    assert hits[0, dead] >= 1


def test_after_step_restarts_every_restart_every_steps_deterministically(tokenizer):
    tokenizer.train()
    tokenizer(images(4))
    dead = torch.arange(0, 32, 3)
    _dead(tokenizer.quantize, dead)
    twin, other_seed = copy.deepcopy(tokenizer), copy.deepcopy(tokenizer)
    weight = tokenizer.quantize.embedding.weight.detach().clone()
    objective = VQTokenizerLoss(VQTokenizerLossConfig(restart_every=3, restart_threshold=0.5))
    assert objective.after_step(tokenizer, 1, seed=0) == {"restarted_codes": 0.0}
    assert objective.after_step(tokenizer, 2, seed=0) == {"restarted_codes": 0.0}
    assert torch.equal(tokenizer.quantize.embedding.weight, weight)
    assert objective.after_step(tokenizer, 3, seed=0) == {"restarted_codes": float(len(dead))}
    changed = (tokenizer.quantize.embedding.weight != weight).any(1)
    assert changed.nonzero().flatten().tolist() == dead.tolist()
    # seeded by (seed, step): the same on a replica, different for another seed
    VQTokenizerLoss(VQTokenizerLossConfig(restart_every=3, restart_threshold=0.5)).after_step(twin, 3, seed=0)
    assert torch.equal(twin.quantize.embedding.weight, tokenizer.quantize.embedding.weight)
    VQTokenizerLoss(VQTokenizerLossConfig(restart_every=3, restart_threshold=0.5)).after_step(other_seed, 3, seed=1)
    assert not torch.equal(other_seed.quantize.embedding.weight, tokenizer.quantize.embedding.weight)
    # restart_every=0 disables restarts
    disabled = copy.deepcopy(twin)
    _dead(disabled.quantize, dead)
    before = disabled.quantize.embedding.weight.detach().clone()
    assert VQTokenizerLoss(VQTokenizerLossConfig(restart_every=0)).after_step(disabled, 3, seed=0) == {"restarted_codes": 0.0}
    assert torch.equal(disabled.quantize.embedding.weight, before)


# ---------------------------------------------------------------------------------------------- input errors
def test_bad_inputs_and_configs_are_clear_errors(tokenizer):
    for bad in (torch.zeros(1, 3, 16, 16), torch.zeros(1, 1, 8, 8), torch.zeros(3, 8, 8)):
        with pytest.raises(ValueError, match=r"expected images \(B, 3, 8, 8\)"):
            tokenizer.indices_from_images(bad)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 8, 8\)"):
        tokenizer.train()(torch.zeros(2, 3, 12, 12))
    with pytest.raises(ValueError, match="does not match the last scale 4"):
        tokenizer.quantize.quantize(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"must end at the latent side 4 .*e\.g\. scales=\(1, 2, 3, 4\)"):
        tiny_config(scales=(1, 2, 3))
    with pytest.raises(ValueError, match=r"must end at the latent side 8 \(resolution 16 / downsampling 2\)"):
        tiny_config(resolution=16)
    with pytest.raises(ValueError, match="strictly increasing"):
        tiny_config(scales=(2, 1, 4))
    with pytest.raises(ValueError, match="not a multiple of the downsampling factor 4"):
        tiny_config(channel_multipliers=(1, 2, 2), resolution=10, scales=(1, 2))


# ---------------------------------------------------------------------------------------------- the objective
def _batch(n=2):
    return {"images": images(n), "labels": torch.zeros(n, dtype=torch.long)}


def test_gan_terms_reach_only_their_own_parameters_with_the_adaptive_weight():
    tokenizer = make_tokenizer().train()
    objective = VQTokenizerLoss(VQTokenizerLossConfig(gan_weight=0.5, discriminator_layers=1, discriminator_channels=8))
    disc = objective.trainable_modules()
    assert isinstance(disc, PatchDiscriminator)
    batch = _batch()
    x = batch["images"]
    out = objective.loss(tokenizer, batch, BatchRandom.local(0, 2))
    assert {"gan_g", "gan_d", "gan_weight", "l2", "vq", "usage_scale0", "usage_scale2"} <= set(out)
    out["loss"].backward()
    disc_grads = [p.grad.clone() for p in disc.parameters()]
    tokenizer_grads = {n: p.grad.clone() for n, p in tokenizer.named_parameters() if p.grad is not None}
    disc.zero_grad(set_to_none=True), tokenizer.zero_grad(set_to_none=True)

    # recompute each side on its own (the training forward is deterministic)
    reconstruction, vq_loss, _ = tokenizer(x)
    rec = (reconstruction - x).square().mean()
    gan_g = -disc(reconstruction).mean()
    last = tokenizer.decoder.last_layer
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_g, last, retain_graph=True)[0]
    weight = (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4)
    assert torch.allclose(out["gan_weight"], weight, rtol=1e-4)
    hinge = 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(reconstruction.detach())).mean())
    assert torch.allclose(out["gan_d"], hinge, rtol=1e-5)
    for got, want in zip(disc_grads, torch.autograd.grad(hinge, list(disc.parameters()), retain_graph=True)):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)  # no generator term leaks into the discriminator
    generator_loss = rec + vq_loss + weight.detach() * 0.5 * gan_g
    names = [n for n, _ in tokenizer.named_parameters()]
    want = torch.autograd.grad(generator_loss, list(tokenizer.parameters()), allow_unused=True)
    for name, w in zip(names, want):
        if w is None:
            assert name not in tokenizer_grads or tokenizer_grads[name].abs().sum() == 0, name
        else:
            assert torch.allclose(tokenizer_grads[name], w, atol=1e-6, rtol=1e-4), name  # no hinge term leaks in


def test_gan_waits_for_gan_start_step():
    tokenizer = make_tokenizer().train()
    objective = VQTokenizerLoss(VQTokenizerLossConfig(gan_weight=0.5, gan_start_step=5, discriminator_layers=1))
    early = objective.loss(tokenizer, _batch(), BatchRandom(0, 4, local_size=2))
    assert "gan_g" not in early and "gan_d" not in early
    late = objective.loss(tokenizer, _batch(), BatchRandom(0, 5, local_size=2))
    assert "gan_g" in late and torch.isfinite(late["loss"])
    assert VQTokenizerLoss(VQTokenizerLossConfig()).trainable_modules() is None  # no GAN, no discriminator


def test_perceptual_distance_on_a_builtin_feature_net():
    distance = PerceptualDistance("mnist-net")
    x, y = images(2), images(2, seed=9)
    assert distance(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert distance(x, y) > 0 and torch.allclose(distance(x, y), distance(y, x))
    assert not any(p.requires_grad for p in distance.parameters())
    objective = VQTokenizerLoss(VQTokenizerLossConfig(perceptual_weight=0.5, perceptual_net="mnist-net"))
    out = objective.loss(make_tokenizer().train(), _batch(), BatchRandom.local(0, 2))
    assert torch.isfinite(out["perceptual"]) and out["perceptual"] > 0
    with pytest.raises(FileNotFoundError, match="neither a built-in feature net"):
        PerceptualDistance("no-such-net")


def test_gan_at_a_resolution_too_small_for_the_discriminator_is_a_clear_error():
    """The default PatchGAN (discriminator_layers=2) needs images of side >= 12; at 8 px the loss must say which
    setting to change instead of failing inside conv2d ("Kernel size can't be greater than actual input size")."""
    objective = VQTokenizerLoss(VQTokenizerLossConfig(gan_weight=0.1, discriminator_channels=8))
    with pytest.raises(ValueError, match="discriminator_layers"):
        objective.loss(make_tokenizer().train(), _batch(), BatchRandom.local(0, 2))


# ---------------------------------------------------------------------------------------------- training end to end
def _tokenizer_run(path, steps, *extra):
    return build_experiment_dict("mnist-msvq", overrides=[
        f"--trainer.output_dir={path}", "--network_preset=MSVQ-Test", "--data.resolution=8",
        f"--trainer.max_steps={steps}", "--trainer.batch_size=8", "--trainer.checkpoint_every=2",
        "--trainer.sample_every=0", "--trainer.log_every=1", "--trainer.progress=false", "--trainer.precision=fp32",
        "--trainer.warmup_steps=1", "--trainer.ema_decay=0.5",
        "--objective.perceptual_weight=0.1", "--objective.perceptual_net=mnist-net",
        "--objective.gan_weight=0.1", "--objective.discriminator_layers=1", "--objective.discriminator_channels=8",
        "--objective.restart_every=1", *extra])


def _checkpoint(folder):
    last = list_checkpoints(folder)[-1]
    state = last / "train_state"
    return (load_weights(state / "model.safetensors"), load_weights(last / "tokenizer" / "model.safetensors"),
            load_weights(state / "auxiliary.safetensors"),
            torch.load(state / "optimizer.pt", weights_only=True)["optimizer"])


def test_tokenizer_training_with_gan_and_perceptual_terms_resumes_exactly(tmp_path):
    straight = build_and_train(_tokenizer_run(tmp_path / "straight", 4), quiet=True)
    assert straight["steps"] == 4
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for r in records:
        for key in ("loss", "l2", "vq", "perceptual", "gan_g", "gan_d", "gan_weight"):
            assert torch.isfinite(torch.tensor(r[key])), (key, r)
    assert records[0]["restarted_codes"] > 0  # a fresh codebook has dead codes; restart_every=1 revives them
    assert len(straight["codebook_usage_per_scale"]) == 3

    # the final folder is a tokenizer-only pipeline
    pipeline = Pipeline.from_pretrained(straight["pipeline"])
    assert pipeline.generator is None and isinstance(pipeline.tokenizer, MultiScaleVQ)
    assert pipeline.tokenizer.config.scales == (1, 2, 4) and pipeline.tokenizer.config.resolution == 8
    x = images(2)
    assert pipeline.tokenizer.reconstruct(x).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="tokenizer, not a generator"):
        pipeline([0])
    final = load_weights(tmp_path / "straight" / "final" / "tokenizer" / "model.safetensors")
    assert final.keys() == pipeline.tokenizer.state_dict().keys()

    # killed after the step-2 checkpoint, then the same command again: bit for bit the uninterrupted run
    original_step = trainer_module.Trainer.train_step

    def killed_after_two(self, batches):
        if self.step == 2:
            raise KeyboardInterrupt("simulated kill")
        return original_step(self, batches)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module.Trainer, "train_step", killed_after_two)
        with pytest.raises(KeyboardInterrupt):
            build_and_train(_tokenizer_run(tmp_path / "resumed", 4), quiet=True)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step_0000002"]
    summary = build_and_train(_tokenizer_run(tmp_path / "resumed", 4), quiet=True)
    assert summary["steps_this_run"] == 2
    a, b = _checkpoint(tmp_path / "straight"), _checkpoint(tmp_path / "resumed")
    for one, two in zip(a[:3], b[:3]):  # raw weights (with the usage EMA), EMA tokenizer, discriminator
        assert one.keys() == two.keys() and one
        for key in one:
            assert torch.equal(one[key], two[key]), key
    for key, state in a[3]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b[3]["state"][key][name]), (key, name)
    assert any(k.startswith("main.") for k in a[2])  # the PatchGAN's weights are checkpointed
