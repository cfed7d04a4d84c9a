"""RAE (arXiv 2510.11690): the dimension-dependent shift, the tokenizer's noise augmentation and token checks, the
DiT^DH head (shapes, per-token conditioning), autoguidance, and the CLI from tokenizer to samples."""

from __future__ import annotations

import math

import pytest
import torch

from effigen.config import ConfigError
from effigen.models.dit import DIT_PRESETS, DiT, DiTConfig
from effigen.objectives.rae import (RAEDecoderLoss, RAEDecoderLossConfig, RAEFlow, RAEFlowConfig, RAESamplerConfig,
                                    dimension_shift, shift_time)
from effigen.rng import BatchRandom
from effigen.samplers import make_time_grid
from effigen.samplers.guidance import autoguided_prediction
from effigen.teachers import Teacher
from effigen.tokenizers.rae import RAE, RAE_PRESETS, RAEConfig


# ------------------------------------------------------------------------------------------------------- the shift
def test_dimension_shift_formula_and_policy_below_one():
    assert dimension_shift(16 * 16 * 768) == pytest.approx(math.sqrt(48))  # the paper's s = 6.93
    assert dimension_shift(8 * 8 * 128) == pytest.approx(math.sqrt(2))
    assert dimension_shift(4096) == 1.0
    assert dimension_shift(7 * 7 * 64) == 1.0  # s = 0.875 < 1: clamped (the default policy)
    assert dimension_shift(7 * 7 * 64, below_one="allow") == pytest.approx(math.sqrt(3136 / 4096))
    with pytest.raises(ValueError, match="below 1.*shift_base"):
        dimension_shift(3136, below_one="error")
    assert dimension_shift(3136, base=3136 / 48) == pytest.approx(math.sqrt(48))  # RAE's relative shift, small latent


def test_shift_time_moves_mass_to_noise_and_matches_the_sampler_grid():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = math.sqrt(48)
    shifted = shift_time(t, s)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted >= t).all())  # t = 1 noise: pushed toward 1
    assert torch.allclose(shift_time(shifted, 1 / s), t)  # 1 / s inverts it
    assert torch.allclose(make_time_grid(10, shift=s), shift_time(t.flip(0), s))  # one formula for both


def test_training_times_are_shifted_by_the_latent_dimension():
    objective = RAEFlow(RAEFlowConfig(time_sampling="uniform", label_dropout=0.0), num_classes=2)
    seen = {}

    def model(x, t, labels):
        seen["t"] = t
        return torch.zeros_like(x)

    batch = {"images": torch.zeros(256, 128, 8, 8), "labels": torch.zeros(256, dtype=torch.long)}
    random = BatchRandom(0, 0, local_size=256)
    objective.loss(model, batch, random)
    plain = BatchRandom(0, 0, local_size=256)
    plain.randn(128, 8, 8)  # the noise is drawn first, then the times (objectives.flow_matching)
    plain = plain.rand()
    assert torch.allclose(seen["t"], shift_time(plain, math.sqrt(2)))
    fixed = RAEFlow(RAEFlowConfig(time_sampling="uniform", shift_dim=196608), num_classes=2)
    assert fixed.shift_for((1, 1, 1)) == pytest.approx(math.sqrt(48))  # an explicit dim wins over the data's
    sampler = RAESamplerConfig(num_steps=4)
    assert sampler.time_shift == 0 and objective.sampling_shift(sampler, (128, 8, 8)) == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match="time_shift"):
        RAESamplerConfig(time_shift=-1.0)


# ------------------------------------------------------------------------------------------------- the DDT head
def ddt(**changes) -> DiT:
    torch.manual_seed(0)
    config = DiTConfig(**{**DIT_PRESETS["DiTDH-Test"], "input_size": 4, "in_channels": 16, "num_classes": 3, **changes})
    return DiT(config)


def perturb(network: DiT) -> DiT:
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return network


def test_ddt_head_shapes_and_zero_init():
    network = ddt()
    assert network.head_embedder.proj.out_channels == 48 and isinstance(network.head_projector, torch.nn.Linear)
    assert [b.attn.num_heads for b in network.head_blocks] == [2] and network.head_rope.freqs_cos.shape == (16, 24)
    assert network.final_layer.linear.in_features == 48 and network.t_embedder.W.shape == (256,)
    x = torch.randn(2, 16, 4, 4)
    out = network(x, torch.rand(2), torch.tensor([0, 3]))
    assert out.shape == (2, 16, 4, 4) and out.abs().max() == 0  # zero-initialised output layer
    same_width = ddt(head_hidden_size=0, head_num_heads=0)
    assert isinstance(same_width.head_projector, torch.nn.Identity)
    with pytest.raises(ValueError, match="head_num_heads"):
        DiTConfig(**{**DIT_PRESETS["DiTDH-Test"], "head_hidden_size": 50, "head_num_heads": 4})
    with pytest.raises(ValueError, match="head_depth"):
        DiTConfig(**{**DIT_PRESETS["DiTDH-Test"], "learn_sigma": True})


def test_ddt_head_is_conditioned_per_token():
    network = perturb(ddt()).eval()
    x, t, y = torch.randn(1, 16, 4, 4), torch.tensor([0.4]), torch.tensor([1])
    captured = []
    hook = network.head_blocks[0].adaLN_modulation.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        out = network(x, t, y)
    hook.remove()
    modulation = captured[0]
    assert modulation.shape == (1, 16, 6 * 48)  # one (shift, scale, gate) x 2 per token
    assert (modulation[0, 0] - modulation[0, 1]).abs().max() > 1e-4  # they differ from token to token
    with torch.no_grad():  # time and class reach the head through the encoder tokens
        assert (network(x, torch.tensor([0.8]), y) - out).abs().max() > 1e-4
        assert (network(x, t, torch.tensor([3])) - out).abs().max() > 1e-4
    # a plain DiT of the same backbone has no head and a (B, 1, k D) modulation
    plain = DiT(DiTConfig(**{**DIT_PRESETS["LightningDiT-Test"], "patch_size": 1, "hidden_size": 32,
                             "input_size": 4, "in_channels": 16, "num_classes": 3}))
    assert not hasattr(plain, "head_blocks")


def test_ddt_network_round_trips_through_a_folder(tmp_path):
    from effigen.pipeline import Pipeline

    network = perturb(ddt()).eval()
    folder = Pipeline("dit-dh", network, RAEFlowConfig(), RAESamplerConfig(num_steps=2), {}).save_pretrained(tmp_path / "p")
    loaded = Pipeline.from_pretrained(folder)
    x, t, y = torch.randn(2, 16, 4, 4), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(loaded.generator(x, t, y), network(x, t, y))
    latents = loaded([0, 1], seed=3, output_type="latent")
    assert latents.shape == (2, 16, 4, 4) and torch.equal(latents, loaded([0, 1], seed=3, output_type="latent"))


# --------------------------------------------------------------------------------------------------- autoguidance
def test_autoguidance_combination_interval_and_skipped_guide():
    calls = []

    def model(x, t, labels):
        return torch.full_like(x, 2.0)

    def guide(x, t, labels):
        calls.append(labels.clone())
        return torch.full_like(x, 1.0)

    x, labels = torch.zeros(2, 1, 2, 2), torch.tensor([4, 5])
    out = autoguided_prediction(model, guide, x, torch.tensor([0.5, 0.9]), labels, 3.0, (0.0, 0.7))
    assert torch.equal(out[0], torch.full((1, 2, 2), 1.0 + 3.0 * (2.0 - 1.0)))  # guide + s (model - guide)
    assert torch.equal(out[1], torch.full((1, 2, 2), 2.0))  # outside the interval: the model alone
    assert torch.equal(calls[0], labels)  # the guide sees the same (conditional) labels
    calls.clear()
    autoguided_prediction(model, guide, x, torch.tensor([0.8, 0.9]), labels, 3.0, (0.0, 0.7))
    autoguided_prediction(model, guide, x, torch.tensor([0.5, 0.5]), labels, 1.0)
    assert calls == []  # outside everywhere, or scale 1: the guide is not evaluated


def test_autoguided_sampling_uses_the_guidance_model_component(tmp_path):
    from effigen.pipeline import Pipeline

    network, guide = perturb(ddt()).eval(), perturb(ddt(depth=1, hidden_size=16, num_heads=1)).eval()
    sampler = RAESamplerConfig(num_steps=3, cfg_scale=1.5, guidance="autoguidance", cfg_interval=(0.0, 0.7))
    pipeline = Pipeline("dit-dh", network, RAEFlowConfig(), sampler, {}, components={"guidance_model": guide})
    guided = pipeline([0, 1], seed=0, output_type="latent")
    unguided = pipeline([0, 1], seed=0, output_type="latent", cfg_scale=1.0)
    assert (guided - unguided).abs().max() > 1e-5
    assert pipeline.number_of_evaluations() == 1 + 2 + 2  # t = 1 lies outside [0, 0.7]; 2/3 and 1/3 inside
    loaded = Pipeline.from_pretrained(pipeline.save_pretrained(tmp_path / "ag"))
    assert torch.allclose(loaded([0, 1], seed=0, output_type="latent"), guided, atol=1e-6)
    bare = Pipeline("dit-dh", network, RAEFlowConfig(), sampler, {})
    with pytest.raises(ConfigError, match="guidance_model"):
        bare([0], seed=0, output_type="latent")


# ------------------------------------------------------------------------------------------------ the tokenizer
def test_rae_noise_augmentation_and_round_trip_shapes():
    torch.manual_seed(0)
    rae = RAE(RAEConfig(**RAE_PRESETS["RAE-Test"]))
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    z = rae.encoder_tokens(images)
    assert z.shape == (3, 128, 4, 4)
    assert torch.allclose(z.mean(1), torch.zeros(3, 4, 4), atol=1e-4)  # LayerNorm without affine per token
    assert torch.allclose(z.var(1, unbiased=False), torch.ones(3, 4, 4), atol=1e-3)
    noise = torch.randn(3, 128, 4, 4)
    clean = rae(images, noise, torch.zeros(3))
    assert torch.allclose(clean, rae.decode_raw(z), atol=1e-6)  # sigma 0: no augmentation
    noisy = rae(images, noise, torch.tensor([0.0, 0.4, 0.8]))
    assert torch.allclose(noisy[0], clean[0], atol=1e-6) and (noisy[2] - clean[2]).abs().max() > 1e-4
    assert torch.allclose(noisy[1], rae.decode_raw(z + 0.4 * noise)[1], atol=1e-5)  # z + sigma eps per sample
    # the objective draws sigma = noise_tau U(0, 1) per sample from the trainer's stream
    objective = RAEDecoderLoss(RAEDecoderLossConfig(perceptual_weight=0.0), 0)
    logs = objective.loss(rae, {"images": images, "labels": torch.zeros(3, dtype=torch.long)},
                          BatchRandom(0, 1, local_size=3))
    assert logs["loss"].requires_grad and 0 <= float(logs["noise_sigma"]) <= 0.8
    # normalised latents after calibration: zero mean, unit variance per element over the calibration images
    rae.calibrate_latents([images])
    latents = rae.encode(images)
    assert torch.allclose(latents.mean(0), torch.zeros(128, 4, 4), atol=1e-4)
    assert rae.decode(latents).shape == (3, 3, 16, 16) and rae.decode(latents).abs().max() <= 1
    assert rae.output.shape == (128, 4, 4) and rae.output.downsample_factor == 4


class FixedTokens(Teacher):
    """An encoder that returns 9 tokens of width 128 (a fixed 3x3 grid) whatever grid is asked for."""

    name, embed_dim, native_grid = "fixed", 128, 3

    def features(self, images, grid=None):
        return torch.randn(images.shape[0], 9, 128)


def test_token_count_mismatch_is_a_clear_error():
    rae = RAE(RAEConfig(**RAE_PRESETS["RAE-Test"]), encoder=FixedTokens())
    with pytest.raises(ValueError, match=r"gives 9 tokens of width 128.*4x4 = 16 tokens.*network.grid"):
        rae.encode(torch.zeros(1, 3, 16, 16))
    wide = RAE(RAEConfig(**{**RAE_PRESETS["RAE-Test"], "encoder_dim": 64}))  # mnist-vit's tokens are 128 wide
    with pytest.raises(ValueError, match="width 128.*width 64.*encoder_dim"):
        wide.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"decodes latents \(B, 128, 4, 4\).*got \(1, 128, 3, 3\)"):
        rae.decode(torch.zeros(1, 128, 3, 3))
    with pytest.raises(ValueError, match="resolution"):
        RAEConfig(**{**RAE_PRESETS["RAE-Test"], "grid": 5})


# ---------------------------------------------------------------------------------------------------------- CLI
def test_cli_trains_the_rae_then_dit_dh_and_samples(tmp_path):
    from effigen.cli.main import main
    from effigen.convert.rae_official import attach_guidance_model
    from effigen.pipeline import Pipeline

    common = ["--trainer.progress=false", "--trainer.batch_size=8", "--trainer.precision=fp32",
              "--data.holdout_fraction=0.95", "--trainer.sample_every=0"]
    assert main(["train", "--preset", "mnist-rae", "--network_preset=RAE-Test", "--data.resolution=16",
                 "--objective.perceptual_weight=0", "--trainer.max_steps=2", f"--trainer.output_dir={tmp_path / 'rae'}",
                 *common]) == 0
    tokenizer = Pipeline.from_pretrained(tmp_path / "rae" / "final").tokenizer
    assert isinstance(tokenizer, RAE) and tokenizer.latent_var.min() > 0 and tokenizer.latent_mean.abs().max() > 0
    assert main(["cache-latents", "--tokenizer", str(tmp_path / "rae" / "final"), "--out", str(tmp_path / "cache"),
                 "--data.name=mnist", "--data.resolution=16", "--data.holdout_fraction=0.95"]) == 0
    generator = ["--preset", "mnist-dit-dh", f"--tokenizer={tmp_path / 'rae' / 'final'}", "--data.name=latents",
                 f"--data.root={tmp_path / 'cache'}", "--network_preset=DiTDH-Test", "--trainer.max_steps=2",
                 "--sampler.num_steps=2", "--data.resolution=16", *common[:3]]
    assert main(["train", *generator, f"--trainer.output_dir={tmp_path / 'dh'}"]) == 0
    assert main(["train", *generator, "--network.hidden_size=16", "--network.num_heads=1",
                 f"--trainer.output_dir={tmp_path / 'guide'}"]) == 0
    pipeline = Pipeline.from_pretrained(tmp_path / "dh" / "final")
    assert pipeline.latent_shape == (128, 4, 4) and pipeline.generator.config.head_depth == 1
    assert main(["sample", "--from", str(tmp_path / "dh" / "final"), "--guidance-from", str(tmp_path / "guide" / "final"),
                 "--num", "2", "--steps", "2", "--cfg-scale", "1.5", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
    assert main(["sample", "--from", str(tmp_path / "dh" / "final"), "--guidance-from", str(tmp_path / "rae" / "final"),
                 "--num", "1", "--out", str(tmp_path / "bad.png")]) != 0  # a tokenizer folder guides nothing
    attach_guidance_model(tmp_path / "dh" / "final", tmp_path / "guide" / "final", tmp_path / "ag")
    images = Pipeline.from_pretrained(tmp_path / "ag")([0, 1], seed=0, guidance="autoguidance", cfg_scale=1.5)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1


def test_official_stage1_decoder_layout_loads(tmp_path):
    """A state dict in the official GeneralDecoder layout (ViT-MAE names, separate q/k/v, a trainable CLS token, the
    sin-cos table with a zero CLS row) and a stat.pt load into the RAE tokenizer and decode the same."""
    from effigen.convert.rae_official import convert_rae_decoder
    from effigen.pipeline import Pipeline

    torch.manual_seed(0)
    config = RAEConfig(**{**RAE_PRESETS["RAE-Test"], "decoder_cls_token": True, "decoder_gelu": "exact",
                          "decoder_layer_norm_eps": 1e-12, "decoder_mlp_ratio": 3.0})
    ours = perturb_all(RAE(config)).eval()
    d = ours.decoder
    official = {"decoder_embed.weight": d.embed.weight, "decoder_embed.bias": d.embed.bias,
                "decoder_pos_embed": d.pos_embed, "trainable_cls_token": d.cls_token,
                "decoder_norm.weight": d.norm.weight, "decoder_norm.bias": d.norm.bias,
                "decoder_pred.weight": d.head.weight, "decoder_pred.bias": d.head.bias}
    for i, block in enumerate(d.blocks):
        q, k, v = block.attn.qkv.weight.chunk(3)
        qb, kb, vb = block.attn.qkv.bias.chunk(3)
        layer = f"decoder_layers.{i}."
        official.update({layer + "attention.attention.query.weight": q, layer + "attention.attention.query.bias": qb,
                         layer + "attention.attention.key.weight": k, layer + "attention.attention.key.bias": kb,
                         layer + "attention.attention.value.weight": v, layer + "attention.attention.value.bias": vb})
        for ours_name, name in (("attn.proj", "attention.output.dense"), ("norm1", "layernorm_before"),
                                ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"),
                                ("mlp.fc2", "output.dense")):
            module = block.get_submodule(ours_name)
            official[layer + name + ".weight"], official[layer + name + ".bias"] = module.weight, module.bias
    torch.save({k: v.detach().clone() for k, v in official.items()}, tmp_path / "model.pt")
    stats = {"mean": torch.randn(128, 4, 4), "var": torch.rand(128, 4, 4) + 0.5}
    torch.save(stats, tmp_path / "stat.pt")
    folder = convert_rae_decoder(tmp_path / "model.pt", tmp_path / "rae", "mnist-vit", num_heads=2,
                                 stats=tmp_path / "stat.pt")
    loaded = Pipeline.from_pretrained(folder).tokenizer
    assert loaded.config.decoder_cls_token and loaded.config.grid == 4 and loaded.config.resolution == 16
    z = torch.randn(2, 128, 4, 4)
    assert torch.allclose(loaded.decode_raw(z), ours.decode_raw(z), atol=1e-5)
    assert torch.equal(loaded.latent_mean, stats["mean"]) and torch.equal(loaded.latent_var, stats["var"])
    with pytest.raises(Exception, match="decoder_embed"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pt")
        convert_rae_decoder(tmp_path / "bad.pt", tmp_path / "bad", "mnist-vit")


def perturb_all(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("changes, head_depth", [
    ({}, None),
    ({"head_hidden_size": 0, "head_num_heads": 0}, 1),  # equal widths: no s_projector, the split is passed
    ({"absolute_positions": False, "adaln_shift": False, "norm": "layernorm", "mlp": "gelu", "qk_norm": True}, None),
])
def test_official_stage2_variants_convert_back(tmp_path, changes, head_depth):
    """effigen DiT^DH variants written in the official DDT.py layout (as train.py saves them) convert back to the same
    network: the config is read off the tensors (or --head-depth where widths agree)."""
    from effigen.convert.rae_official import load_official_rae
    from effigen.io import CheckpointError

    network = perturb(ddt(depth=2, **changes)).eval()
    depth = network.config.depth
    official = {}
    for key, value in network.state_dict().items():
        if key == "pos_embed" and not network.config.absolute_positions:
            continue  # use_pos_embed=False: the official model has no table
        for ours, theirs in (("x_embedder.", "s_embedder."), ("head_embedder.", "x_embedder."),
                             ("head_projector.", "s_projector."), ("feat_rope.", "enc_feat_rope."),
                             ("head_rope.", "dec_feat_rope.")):
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        if key.startswith("head_blocks."):
            index, rest = key.split(".", 2)[1:]
            key = f"blocks.{depth + int(index)}.{rest}"
        official[key] = value.clone()
    torch.save({"step": 1, "model": {}, "ema": official}, tmp_path / "stage2.pt")
    if head_depth is not None:
        with pytest.raises(CheckpointError, match="--head-depth"):
            load_official_rae(tmp_path / "stage2.pt")
    loaded = load_official_rae(tmp_path / "stage2.pt", head_depth=head_depth)
    assert (loaded.config.depth, loaded.config.head_depth) == (depth, 1)
    x, t, y = torch.randn(2, 16, 4, 4), torch.rand(2), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, y), network(x, t, y), atol=1e-6)
