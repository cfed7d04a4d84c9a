import pytest
import torch

from effigen.rng import BatchRandom
from effigen.objectives.kl_vae import KLVAELoss, KLVAELossConfig
from effigen.tokenizers.kl_vae import KLVAE, KLVAEConfig


def tiny():
    return KLVAE(KLVAEConfig(base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1, resolution=16,
                             attention_resolutions=(8,)))


def test_stable_diffusion_vae_names_and_size():
    with torch.device("meta"):
        vae = KLVAE(KLVAEConfig())
    keys = set(vae.state_dict())
    for key in ["encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down.0.downsample.conv.weight", "encoder.mid.attn_1.q.weight", "encoder.mid.block_2.conv2.bias",
                "encoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.bias", "decoder.up.3.upsample.conv.weight",
                "decoder.up.0.block.2.conv2.weight", "decoder.mid.attn_1.proj_out.weight", "decoder.conv_out.bias"]:
        assert key in keys, key
    assert "decoder.up.0.upsample.conv.weight" not in keys and "encoder.down.3.downsample.conv.weight" not in keys
    assert vae.encoder.conv_out.out_channels == 8
    # SD's f8 KL-VAE has 83.65M parameters (34.16M encoder, 49.49M decoder)
    assert abs(sum(p.numel() for p in vae.parameters()) / 1e6 - 83.65) < 0.05


def test_round_trip_shapes_and_scaling():
    vae = tiny().eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = vae.encode(images)
    assert latents.shape == (2, 4, 8, 8)
    mean, _ = vae.posterior(images)
    torch.testing.assert_close(latents, mean * 0.18215)
    decoded = vae.decode(latents)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1
    with pytest.raises(ValueError, match="multiple of"):
        vae.encode(torch.zeros(1, 3, 15, 15))


def test_training_steps_lower_the_reconstruction_loss():
    torch.manual_seed(0)
    vae = tiny()
    objective = KLVAELoss(KLVAELossConfig())
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    losses = []
    for step in range(30):
        out = objective.loss(vae, {"images": images}, BatchRandom(0, step, 0, 4, 0, 4))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["l1"].item())
    assert losses[-1] < 0.6 * losses[0]


# ---------------------------------------------------------------------------------------------- weights layouts
from pathlib import Path  # noqa: E402

from effigen.config import ConfigError  # noqa: E402
from effigen.convert.sd_vae import diffusers_to_ldm, kl_config_from_state_dict, ldm_to_diffusers, load_kl_vae  # noqa: E402
from effigen.data import DataError  # noqa: E402
from effigen.io import save_weights  # noqa: E402


def attention_vae():
    torch.manual_seed(1)
    return KLVAE(KLVAEConfig(base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1, resolution=16,
                             attention_resolutions=(8,))).eval()


def test_diffusers_layout_round_trip_and_architecture_from_weights():
    vae = attention_vae()
    ldm = vae.state_dict()
    diffusers = ldm_to_diffusers(ldm)
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in diffusers  # LDM's up.1 is diffusers' first up block
    assert "encoder.mid_block.attentions.0.to_out.0.weight" in diffusers
    assert diffusers["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2  # linear in diffusers, 1x1 conv in LDM
    assert "encoder.down_blocks.1.attentions.0.to_k.weight" in diffusers
    back = diffusers_to_ldm(diffusers)
    assert back.keys() == ldm.keys() and all(torch.equal(back[k], ldm[k]) for k in ldm)
    config = kl_config_from_state_dict(ldm, resolution=16)
    assert (config.base_channels, tuple(config.channel_multipliers), config.num_res_blocks, config.latent_channels,
            tuple(config.attention_resolutions)) == (32, (1, 2), 1, 4, (8,))


def test_single_file_loading_drops_training_keys(tmp_path):
    vae = attention_vae()
    state = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    state["model.diffusion_model.x"] = torch.zeros(1)  # the rest of a Stable Diffusion checkpoint
    save_weights(state, tmp_path / "sd.safetensors")
    loaded = load_kl_vae(tmp_path / "sd.safetensors", resolution=16, scaling_factor=0.5)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded.encode(images), vae.posterior(images)[0] * 0.5)
    # a VA-VAE training checkpoint: {"state_dict": ...} with loss.* keys, plus per-channel latent statistics
    torch.save({"state_dict": {**vae.state_dict(), "loss.discriminator.w": torch.zeros(2)}}, tmp_path / "vavae.pt")
    torch.save({"mean": torch.arange(4.0).view(1, 4, 1, 1), "std": torch.full((1, 4, 1, 1), 2.0)}, tmp_path / "stats.pt")
    vavae = load_kl_vae(tmp_path / "vavae.pt", resolution=16, latent_stats=tmp_path / "stats.pt")
    expected = (vae.posterior(images)[0] - torch.arange(4.0).view(1, 4, 1, 1)) / 2.0
    torch.testing.assert_close(vavae.encode(images), expected)
    torch.testing.assert_close(vavae.decode(vavae.encode(images)), vae.decode_raw(vae.posterior(images)[0]).clamp(-1, 1))
    with pytest.raises(Exception, match="does not exist"):
        load_kl_vae(tmp_path / "missing.safetensors")


def test_diffusers_autoencoder_gives_the_same_outputs(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                                        latent_channels=4, norm_num_groups=32, sample_size=16,
                                        down_block_types=("DownEncoderBlock2D",) * 2,
                                        up_block_types=("UpDecoderBlock2D",) * 2).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.save_pretrained(tmp_path / "vae")
    vae = load_kl_vae(tmp_path)  # a pipeline folder with vae/
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = reference.encode(images).latent_dist
        torch.testing.assert_close(vae.posterior(images)[0], posterior.mean, atol=1e-5, rtol=1e-4)
        z = posterior.mean
        torch.testing.assert_close(vae.decode_raw(z), reference.decode(z).sample, atol=1e-4, rtol=1e-4)
    assert vae.config.scaling_factor == reference.config.scaling_factor


def test_calibrated_latents_have_unit_statistics():
    vae = attention_vae()
    images = torch.rand(32, 3, 16, 16) * 2 - 1
    vae.calibrate_latents([images[:16], images[16:]])
    latents = vae.encode(images)
    torch.testing.assert_close(latents.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(latents.std(dim=(0, 2, 3), unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(vae.decode(latents), vae.decode_raw(vae.posterior(images)[0]).clamp(-1, 1), atol=1e-5, rtol=0)


def test_kl_loss_with_perceptual_and_gan_terms():
    vae = tiny()
    objective = KLVAELoss(KLVAELossConfig(perceptual_weight=0.1, perceptual_net="digits-net", gan_weight=0.5,
                                          discriminator_layers=1))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    out = objective.loss(vae, {"images": images}, BatchRandom(0, 3, 0, 2, 0, 2))
    assert {"l1", "kl", "perceptual", "gan_g", "gan_d", "gan_weight"} <= set(out)
    out["loss"].backward()
    assert all(p.grad is not None for p in objective.discriminator.parameters())
    assert vae.decoder.last_layer.grad is not None and torch.isfinite(out["loss"])


# ---------------------------------------------------------------------------------------------- latent caches
from effigen.data.latents import LatentDataset, cache_latents, pick_views  # noqa: E402


class _Images(torch.utils.data.Dataset):
    name, split, resolution, class_names = "toy", "train", 16, ["a", "b"]

    def __init__(self, n=10):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 2


def test_latent_cache_round_trip_with_flips(tmp_path):
    vae, data = attention_vae(), _Images(10)
    cache_latents(vae, data, tmp_path / "cache", flip=True, batch_size=4, shard_size=4, progress=False)
    dataset = LatentDataset(tmp_path / "cache", resolution=16)
    assert len(dataset) == 10 and len(dataset.index["shards"]) == 3 and dataset.stores_flipped
    pairs = torch.stack([dataset[i][0] for i in range(10)])
    torch.testing.assert_close(pick_views(pairs, None), vae.encode(data.images), atol=1e-5, rtol=0)
    torch.testing.assert_close(pick_views(pairs, torch.ones(10, dtype=torch.bool)), vae.encode(data.images.flip(-1)),
                               atol=1e-5, rtol=0)
    assert dataset.labels().tolist() == [i % 2 for i in range(10)] and dataset.class_names == ["a", "b"]
    # complete caches are reused; another tokenizer's is refused, by the builder and by the reader
    cache_latents(vae, data, tmp_path / "cache", flip=True, progress=False)
    other = tiny()
    with pytest.raises(DataError, match="another tokenizer"):
        cache_latents(other, data, tmp_path / "cache", flip=True, progress=False)
    from effigen.data.latents import tokenizer_fingerprint

    with pytest.raises(DataError, match="another tokenizer"):
        LatentDataset(tmp_path / "cache", fingerprint=tokenizer_fingerprint(other))
    with pytest.raises(DataError, match="data.resolution=16"):
        LatentDataset(tmp_path / "cache", resolution=32)
    (tmp_path / "cache" / "latents-00001.safetensors").write_bytes(b"truncated")
    with pytest.raises(DataError, match="rebuild"):
        LatentDataset(tmp_path / "cache")
    with pytest.raises(DataError, match="cache-latents"):
        LatentDataset(tmp_path / "nothing")


def test_latent_generator_trains_from_the_cli_and_decodes(tmp_path):
    from effigen.cli.main import main
    from effigen.pipeline import Pipeline

    common = ["--trainer.progress=false", "--trainer.batch_size=8", "--trainer.precision=fp32"]
    assert main(["train", "--preset", "mnist-klvae", "--network_preset=KL-Test", "--trainer.max_steps=3",
                 f"--trainer.output_dir={tmp_path / 'vae'}", "--trainer.sample_every=0", *common]) == 0
    vae_config = Pipeline.from_pretrained(tmp_path / "vae" / "final").tokenizer.config
    assert len(vae_config.channel_mean) == 4 and vae_config.scaling_factor == 1.0  # calibrated at the end of the run
    assert main(["cache-latents", "--tokenizer", str(tmp_path / "vae" / "final"), "--out", str(tmp_path / "cache"),
                 "--data.name=mnist", "--data.resolution=32", "--data.holdout_fraction=0.9", "--flip"]) == 0
    # token ids need a VQ tokenizer: a clear error, nothing written
    assert main(["cache-latents", "--tokenizer", str(tmp_path / "vae" / "final"), "--tokens", "--out",
                 str(tmp_path / "ids"), "--data.name=mnist", "--data.resolution=32"]) == 2
    assert not (tmp_path / "ids" / "index.json").exists()
    assert main(["train", "--preset", "mnist-lightningdit-latent", f"--tokenizer={tmp_path / 'vae' / 'final'}",
                 "--data.name=latents", f"--data.root={tmp_path / 'cache'}", "--data.horizontal_flip=true",
                 "--network_preset=LightningDiT-Test", "--network.hidden_size=32", "--network.depth=1",
                 "--network.num_heads=2", "--network.patch_size=2", "--trainer.max_steps=2",
                 f"--trainer.output_dir={tmp_path / 'dit'}", "--sampler.num_steps=2", *common]) == 0
    pipeline = Pipeline.from_pretrained(tmp_path / "dit" / "final")
    assert pipeline.latent_shape == (4, 16, 16) and pipeline.info["dataset"] == "mnist"
    images = pipeline([0, 1], seed=0)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    assert pipeline([0, 1], seed=0, output_type="latent").shape == (2, 4, 16, 16)
    # DDPM with learned variance on the same cache: the network's output channels double over the latent's
    assert main(["train", "--preset", "mnist-dit-ddpm", f"--tokenizer={tmp_path / 'vae' / 'final'}",
                 "--data.name=latents", f"--data.root={tmp_path / 'cache'}", "--network_preset=DiT-Test",
                 "--network.hidden_size=32", "--network.depth=1", "--network.num_heads=2", "--network.patch_size=2",
                 "--trainer.max_steps=1", f"--trainer.output_dir={tmp_path / 'ddpm'}", "--sampler.num_steps=2", *common]) == 0
    ddpm = Pipeline.from_pretrained(tmp_path / "ddpm" / "final")
    assert ddpm.generator.config.in_channels == 4 and ddpm.generator.config.learn_sigma
    assert ddpm([3], seed=0).shape == (1, 3, 32, 32)
    # a continuous latent space is not a token space for VAR (the tokenizer's declared output decides, not its class)
    from effigen.training.experiment import build_experiment_config

    with pytest.raises(ConfigError, match=r"\(a KLVAE\) produces continuous latents 4x16x16; method var works on "
                                          "multiscale outputs"):
        build_experiment_config("mnist-var", overrides=[f"--tokenizer={tmp_path / 'vae' / 'final'}"])


def test_decoder_samples_channels_last_and_trains_in_nchw():
    """Eval + no_grad: channels-last weights (fast oneDNN convolutions), an NCHW-contiguous output equal to the NCHW
    decoder's up to summation order; `train()` converts the weights back so training runs exactly as before."""
    from effigen.tokenizers.autoencoder import ConvAutoencoderSpec, Decoder

    torch.manual_seed(0)
    spec = ConvAutoencoderSpec(base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1, resolution=16)
    decoder = Decoder(spec)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        nchw = decoder(z)  # train mode: the NCHW path
        decoder.eval()
        fast = decoder(z)
    assert decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.is_contiguous() and torch.allclose(fast, nchw, atol=1e-5, rtol=1e-4)
    decoder.train()
    assert all(p.is_contiguous() for p in decoder.parameters())
    decoder(z).square().mean().backward()  # gradients flow in NCHW
    assert decoder.conv_in.weight.grad is not None
