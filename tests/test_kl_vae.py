import pytest
import torch

from effigen.rng import BatchRandom
from effigen.tokenizers.kl_vae import KLVAE, KLVAEConfig, KLVAELoss, KLVAELossConfig


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
