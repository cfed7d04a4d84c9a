"""Official DiCo checkpoints (shallowdream204/DiCo, arXiv 2505.11196) -> effigen `dico-ddpm` pipeline folders.

Accepts the released files (`DiCo-XL-256x256.pt`: a bare EMA state dict) and the official training checkpoints
(`{"model", "ema", "opt", "args"}`, as train_accelerate.py writes them; the EMA weights are used, as the
official sample_ddp.py does). effigen's DiCo keeps the official parameter names, so conversion is a validated
copy; the configuration (width, per-level depth, FFN ratio, channels, classes, learned sigma) is read off the
tensor shapes. The input size is not stored in the weights (a conv net runs at any size): it is given, default
32 (256 px images through the SD VAE).

The official sampler conventions are recorded in the folder: 1000-step linear DDPM schedule, epsilon + learned
range variance, integer timesteps into the embedding (effigen t * 1000), guidance on the first 3 channels only
(the DiT code DiCo inherits), DDIM / ancestral DDPM over a respaced schedule. GELU is the exact (erf) one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import CheckpointError, load_state_dict_strict, load_torch_file
from ..models.dico import DiCo, DiCoConfig
from ..objectives.ddpm import DDPMConfig, DDPMSamplerConfig
from .dit_official import extract_state_dict

LEVELS = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1")


def dico_config_from_state_dict(state: dict[str, torch.Tensor], input_size: int = 32) -> DiCoConfig:
    try:
        stem = state["x_embedder.proj.weight"]  # (h, C, 3, 3)
        table = state["y_embedder.embedding_table_0.weight"]  # (K + 1, h)
        ffn = state["encoder_level_1.0.conv4.weight"]  # (r h, h, 1, 1)
        out = state["final_layer.out_proj.weight"]  # (C_out, 2h, 3, 3)
    except KeyError as e:
        raise CheckpointError(f"not an official DiCo state dict: missing {e}") from e
    hidden, in_channels = stem.shape[0], stem.shape[1]
    depth = [len({k.split(".")[1] for k in state if k.startswith(level + ".")}) for level in LEVELS]
    return DiCoConfig(input_size=input_size, in_channels=in_channels, hidden_size=hidden, depth=depth,
                      mlp_ratio=ffn.shape[0] / hidden, num_classes=table.shape[0] - 1,
                      learn_sigma=out.shape[0] == 2 * in_channels, time_scale=1000.0)


def load_official_dico(path: str | Path, input_size: int = 32, prefer: str = "ema") -> DiCo:
    state = extract_state_dict(load_torch_file(path), prefer)
    network = DiCo(dico_config_from_state_dict(state, input_size))
    load_state_dict_strict(network, {k: v.float() for k, v in state.items()}, str(path))
    return network.eval()


def convert_dico_official(checkpoint: str | Path, out: str | Path, input_size: int = 32, num_steps: int = 250,
                          cfg_scale: float = 1.5, vae=None) -> Path:
    """`vae`: a KLVAE stored as the folder's decoder; None = latents only. Defaults: sample_ddp.py's (250 steps,
    cfg 1.5)."""
    from ..pipeline import Pipeline
    from .dit_official import check_vae

    network = load_official_dico(checkpoint, input_size)
    objective = DDPMConfig(num_timesteps=1000, beta_schedule="linear", learn_sigma=network.config.learn_sigma)
    sampler = DDPMSamplerConfig(solver="ddpm", num_steps=num_steps, cfg_scale=cfg_scale, cfg_channels=3)
    info = {"source": "shallowdream204/DiCo", "checkpoint": str(checkpoint)}
    check_vae(network, vae)
    return Pipeline("dico-ddpm", network, objective, sampler, info, tokenizer=vae).save_pretrained(out)
