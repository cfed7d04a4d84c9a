"""Official BFM checkpoints (mlvlab/Blockwise-Flow-Matching, arXiv 2510.21167) -> effigen `bfm` pipeline folders.

Reads what accelerate's `save_state` writes in the official train.py / train_frn.py (`checkpoints/<step>/
model.safetensors` = raw model, `model_1.safetensors` = EMA, which configs/eval/BFM_XL.yaml samples from): a
safetensors state dict, possibly with torch.compile's `_orig_mod.` prefix (the official `init_from_ckpt` strips it).
effigen's BFM keeps the official parameter names, so conversion is a validated copy (bfloat16 files are widened to
float32, as the official load_state_dict into fp32 parameters does). Every hyperparameter is read off the tensor
shapes except two that the weights cannot tell apart: the latent channels (`in_channels`, default 4: SD-VAE) fix the
patch size from the patch-vector width, and the grid size (`input_size`, default 32, 256 px through SD-VAE) is not
stored (no absolute positions; RoPE tables are not in the state dict).

A checkpoint with `frn_blocks.*` (a train_frn.py model) is recorded as an FRA-stage model, so `fra: true` sampling is
allowed; without them it is a stage-1 model. The folder's sampler is the official eval config (configs/eval/BFM_XL.yaml:
Euler-Maruyama, 41 steps per segment, cfg 4.0 on all channels with guidance interval [0, 1], and the official
sample_sde's double last step, `sde_ending: official`). Only adaln_type "lora" (the released configuration) is
supported; use_swiglu, learn_sigma and "normal"/"swiglu" adaLN types are refused with the key that shows them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..io import CheckpointError, load_state_dict_strict, load_weights
from ..models.bfm import BFM, BFMConfig
from ..objectives.bfm import BFMObjectiveConfig, BFMSamplerConfig


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def bfm_config_from_state_dict(state: dict[str, torch.Tensor], in_channels: int = 4, input_size: int = 32) -> BFMConfig:
    try:
        hidden = state["t_embedder.mlp.0.weight"].shape[0]
        patch_dim = state["x_embedder.proj.weight"].shape[1]  # C p p
        head_dim = state["representation_blocks.0.attn.q_norm.weight"].shape[0]
        table = state["y_embedder.embedding_table.weight"]  # (K + 1, D)
        fc1 = state["representation_blocks.0.mlp.fc1.weight"]  # (r D, D)
        out = state["final_layer.linear.weight"]  # (p p C_out, D)
    except KeyError as e:
        raise CheckpointError(f"not an official BFM state dict (q/k RMSNorm, timm Mlp): missing {e}") from e
    if "representation_blocks.0.adaLN_modulation.2.weight" not in state or "global_adaLN_modulation.1.weight" not in state:
        raise CheckpointError("this BFM checkpoint does not use adaln_type 'lora' (the released configuration); "
                              "only 'lora' is supported")
    patch = math.isqrt(patch_dim // in_channels)
    if patch * patch * in_channels != patch_dim:
        raise CheckpointError(f"the patch vector has {patch_dim} entries, which is not in_channels={in_channels} "
                              "times a square: give the right --in-channels")
    if out.shape[0] != patch_dim:
        raise CheckpointError(f"final_layer.linear gives {out.shape[0]} values per patch but the input has {patch_dim}: "
                              "learn_sigma checkpoints are not supported")
    projection = state.get("linear_projection.0.weight")
    return BFMConfig(
        input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
        num_heads=hidden // head_dim, mlp_ratio=fc1.shape[0] / hidden, num_classes=table.shape[0] - 1,
        segments=_count(state, "velocity_blocks."), segment_depth=_count(state, "velocity_blocks.0."),
        feature_alignment_depth=_count(state, "representation_blocks."), frn_depth=_count(state, "frn_blocks."),
        adaln_lora_dim=state["representation_blocks.0.adaLN_modulation.1.weight"].shape[0],
        projector_hidden=2048 if projection is None else projection.shape[0],
        projection_dim=0 if projection is None else state["linear_projection.4.weight"].shape[0],
        time_scale=1.0)


def load_official_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_weights(path)
    else:  # a torch.save'd state dict (or {"ema": ...}) of the same model
        from ..io import load_torch_file
        from .dit_official import extract_state_dict

        state = extract_state_dict(load_torch_file(path), "ema")
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}


def load_official_bfm(path: str | Path, in_channels: int = 4, input_size: int = 32) -> BFM:
    state = load_official_state(path)
    network = BFM(bfm_config_from_state_dict(state, in_channels, input_size))
    load_state_dict_strict(network, {k: v.float() for k, v in state.items()}, str(path))
    return network.eval()


def official_sampler(steps_per_segment: int, segments: int, cfg_scale: float = 4.0, solver: str = "euler_maruyama",
                     fra: bool = False) -> BFMSamplerConfig:
    """configs/eval/BFM_XL.yaml: SDE, 41 steps per segment, cfg 4.0 in [guidance_low 0, guidance_high 1]."""
    return BFMSamplerConfig(solver=solver, num_steps=steps_per_segment * segments, fra=fra, cfg_scale=cfg_scale,
                            cfg_interval=(0.0, 1.0), diffusion_norm=2.0, last_step=0.04, sde_ending="official")


def convert_bfm_official(checkpoint: str | Path, out: str | Path, in_channels: int = 4, input_size: int = 32,
                         steps_per_segment: int = 41, cfg_scale: float = 4.0, vae=None) -> Path:
    """`vae`: a KLVAE stored as the folder's decoder; None = latents only."""
    from ..pipeline import Pipeline
    from .dit_official import check_vae

    network = load_official_bfm(checkpoint, in_channels, input_size)
    stage = "fra" if network.config.frn_depth > 0 else "velocity"
    objective = BFMObjectiveConfig(stage=stage, label_dropout=0.1, proj_loss_weight=0.0)
    sampler = official_sampler(steps_per_segment, network.config.segments, cfg_scale)
    info = {"source": "mlvlab/Blockwise-Flow-Matching", "checkpoint": str(checkpoint)}
    check_vae(network, vae)
    return Pipeline("bfm", network, objective, sampler, info, tokenizer=vae).save_pretrained(out)
