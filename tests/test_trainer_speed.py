"""The Trainer's CPU fast paths change no numbers that matter: the fused AdamW kernel takes torch's reference AdamW step
(within fp32 rounding) and is restored on resume from a checkpoint written without it; the tokenizer's in-place SiLU
(frozen encoders) gives the same features as the out-of-place one and leaves autoencoder training differentiable."""

from pathlib import Path

import torch
from torch import nn

from effigen.io import atomic_directory, save_weights

from effigen.tokenizers.autoencoder import ConvAutoencoderSpec, Decoder, Encoder
from effigen.training.trainer import Trainer, TrainerConfig


class Regression:
    def loss(self, model, batch, random):
        images = batch["images"].flatten(1)
        return {"loss": ((model(images) - images.flip(1)) ** 2).mean()}


def save_folder(path: Path, ema_state: dict, extra) -> None:
    with atomic_directory(path) as tmp:
        (tmp / "generator").mkdir()
        save_weights(ema_state, tmp / "generator" / "model.safetensors")
        extra(tmp)


def make_trainer(tmp_path, **settings) -> Trainer:
    config = TrainerConfig(output_dir=str(tmp_path), max_steps=3, batch_size=4, learning_rate=1e-2, weight_decay=0.1,
                           precision="fp32", device="cpu", progress=False, log_every=1, checkpoint_every=0, **settings)
    torch.manual_seed(0)
    return Trainer(config, nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 12)), Regression(), [],
                   save_folder=save_folder)


def batches():
    images = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    while True:
        yield images, torch.zeros(4, dtype=torch.long)


def test_cpu_trainer_uses_fused_adamw_and_takes_the_reference_step(tmp_path):
    fused = make_trainer(tmp_path / "fused")
    assert all(group["fused"] for group in fused.optimizer.param_groups)
    reference = make_trainer(tmp_path / "reference")
    for group in reference.optimizer.param_groups:  # torch's default on CPU: the per-tensor for-loop
        group["fused"], group["foreach"] = None, False
    source = batches()
    for _ in range(3):
        fused.train_step(source)
        reference.train_step(source)
    for a, b in zip(fused.network.parameters(), reference.network.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused.ema.network.parameters(), reference.ema.network.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_from_a_checkpoint_without_the_fused_kernel_uses_it(tmp_path):
    writer = make_trainer(tmp_path)
    for group in writer.optimizer.param_groups:
        group["fused"], group["foreach"] = None, None  # what checkpoints written before the fused kernel hold
    writer.train_step(batches())
    folder = writer.save_checkpoint()
    reader = make_trainer(tmp_path)
    reader.load_checkpoint(folder)
    assert reader.step == 1 and all(group["fused"] for group in reader.optimizer.param_groups)
    reader.train_step(batches())  # the fused kernel continues from the for-loop's moments
    assert reader.optimizer.state[next(reader.network.parameters())]["step"] == 2


def test_in_place_silu_keeps_features_and_gradients():
    spec = ConvAutoencoderSpec(in_channels=3, out_channels=3, base_channels=8, channel_multipliers=(1, 2),
                               num_res_blocks=1, encoder_out_channels=4, decoder_in_channels=4, resolution=8)
    torch.manual_seed(0)
    encoder, decoder = Encoder(spec), Decoder(spec)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # frozen: the in-place path
        frozen = decoder(encoder(x))
    trained = decoder(encoder(x))  # parameters require grad: out of place
    torch.testing.assert_close(frozen, trained, rtol=0, atol=0)
    trained.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
