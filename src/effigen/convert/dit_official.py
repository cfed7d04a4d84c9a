"""Official DiT checkpoints (facebookresearch/DiT) -> effigen `dit-ddpm` pipeline folders.

Accepts the released files (`DiT-XL-2-256x256.pt`: a plain state dict) and the official training
checkpoints (`{"model", "ema", "opt", "args"}`; the EMA weights are used). effigen's DiT keeps the
official parameter names, so conversion is a validated copy; the configuration is read off the tensor
shapes (width, depth, patch size, channels, classes, learned sigma, input size). The head count is not
recorded in the weights: it is taken from the official sizes (S: 6, B: 12, L: 16, XL: 16 heads) or
must be given.

The official sampler settings are recorded in the folder: 1000-step linear schedule, guidance on the
first 3 channels (the published numbers depend on it), DDIM/DDPM over a respaced schedule.
Licence: the released DiT weights are CC-BY-NC.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..io import CheckpointError, load_state_dict_strict, load_torch_file
from ..models.dit import DiT, DiTConfig
from ..objectives.ddpm import DDPMConfig, DDPMSamplerConfig

OFFICIAL_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}


def extract_state_dict(checkpoint, prefer: str = "ema") -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict) and prefer in checkpoint and isinstance(checkpoint[prefer], dict):
        return checkpoint[prefer]
    if isinstance(checkpoint, dict) and "model" in checkpoint and isinstance(checkpoint["model"], dict):
        return checkpoint["model"]
    return checkpoint


def dit_config_from_state_dict(state: dict[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    try:
        proj = state["x_embedder.proj.weight"]  # (D, C, p, p)
        table = state["y_embedder.embedding_table.weight"]  # (K + 1, D)
        positions = state["pos_embed"]  # (1, L, D)
        final = state["final_layer.linear.weight"]  # (p * p * C_out, D)
    except KeyError as e:
        raise CheckpointError(f"not an official DiT state dict: missing {e}") from e
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    out_channels = final.shape[0] // (patch * patch)
    grid = math.isqrt(positions.shape[1])
    if num_heads is None:
        if hidden not in OFFICIAL_HEADS:
            raise CheckpointError(f"width {hidden} is not an official DiT size; pass the head count (--num-heads)")
        num_heads = OFFICIAL_HEADS[hidden]
    return DiTConfig(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
                     num_heads=num_heads, num_classes=table.shape[0] - 1, learn_sigma=out_channels == 2 * in_channels,
                     time_scale=1000.0)


def load_official_dit(path: str | Path, num_heads: int | None = None, prefer: str = "ema") -> DiT:
    state = extract_state_dict(load_torch_file(path), prefer)
    config = dit_config_from_state_dict(state, num_heads)
    network = DiT(config)
    load_state_dict_strict(network, {k: v.float() for k, v in state.items()}, str(path))
    return network.eval()


def convert_dit_official(checkpoint: str | Path, out: str | Path, num_heads: int | None = None,
                         num_steps: int = 250, cfg_scale: float = 1.5, vae=None) -> Path:
    """`vae`: a KLVAE (e.g. `convert.sd_vae.load_kl_vae`) stored as the folder's decoder; None = latents only."""
    from ..pipeline import Pipeline

    network = load_official_dit(checkpoint, num_heads)
    objective = DDPMConfig(num_timesteps=1000, beta_schedule="linear", learn_sigma=network.config.learn_sigma)
    sampler = DDPMSamplerConfig(solver="ddpm", num_steps=num_steps, cfg_scale=cfg_scale, cfg_channels=3)
    info = {"source": "facebookresearch/DiT", "checkpoint": str(checkpoint), "licence": "CC-BY-NC 4.0"}
    check_vae(network, vae)
    return Pipeline("dit-ddpm", network, objective, sampler, info, tokenizer=vae).save_pretrained(out)


def check_vae(network: DiT, vae) -> None:
    if vae is None:
        return
    config = network.config
    if vae.config.latent_channels != config.in_channels or vae.config.resolution // vae.config.downsample_factor != config.input_size:
        raise CheckpointError(
            f"the VAE makes {vae.config.latent_channels} x {vae.config.resolution // vae.config.downsample_factor}^2 "
            f"latents at {vae.config.resolution} px, the network denoises {config.in_channels} x {config.input_size}^2; "
            "use the VAE the network was trained with (and --resolution for its image size)")
