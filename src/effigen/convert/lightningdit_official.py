"""Official LightningDiT checkpoints (hustvl/LightningDiT) -> effigen `dit-flow` pipeline folders.

Accepts the training checkpoint `{"model", "ema", "opt", "config"}` that the official `train.py` writes
(the EMA weights are used, as `inference.py` does) or a plain state dict. The architecture is read off the
tensors: RMSNorm (`norm1.weight`), SwiGLU (`mlp.w12`), RoPE (`feat_rope.*`, whose width gives the head
dimension), qk-norm, `wo_shift`.

Translations, all here in one place:
- time: LightningDiT runs t from 0 = noise to 1 = data and embeds the raw t; effigen's t is 1 - t_official,
  so the network gets `time_offset=1, time_scale=-1`;
- velocity: the official network predicts x_data - noise = -(effigen's velocity noise - x_data), so the
  output layer's weights and bias are negated (exact, no runtime cost);
- learned sigma: the official forward drops the second half of the output channels; the converter drops
  those rows of the output layer;
- sampler: the official grid linspace(0, 1, N) shifted by s (t' = s t / (1 + (s - 1) t)) is, in effigen's
  direction, the grid of N - 1 steps shifted by 1 / s; the guidance interval "no guidance while
  t_official < start" is effigen's cfg_interval (0, 1 - start); guidance touches the first 3 channels only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import CheckpointError, load_state_dict_strict, load_torch_file
from ..models.dit import DiT, DiTConfig
from ..objectives.flow_matching import FlowSamplerConfig, RectifiedFlowConfig
from .dit_official import check_vae, extract_state_dict

OFFICIAL_HEADS = {768: 12, 1024: 16, 1152: 16, 1536: 24, 1792: 28}


def lightningdit_config_from_state_dict(state: dict[str, torch.Tensor], num_heads: int | None = None) -> tuple[DiTConfig, bool]:
    """Returns the effigen config and whether the checkpoint had a learned-sigma half to drop."""
    try:
        proj = state["x_embedder.proj.weight"]
        table = state["y_embedder.embedding_table.weight"]
        positions = state["pos_embed"]
        final = state["final_layer.linear.weight"]
        modulation = state["blocks.0.adaLN_modulation.1.weight"]
    except KeyError as e:
        raise CheckpointError(f"not an official LightningDiT state dict: missing {e}") from e
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    rope = "feat_rope.freqs_cos" in state
    qk_norm = "blocks.0.attn.q_norm.weight" in state
    if num_heads is None:
        if rope:
            num_heads = hidden // state["feat_rope.freqs_cos"].shape[1]
        elif qk_norm:
            num_heads = hidden // state["blocks.0.attn.q_norm.weight"].shape[0]
        elif hidden in OFFICIAL_HEADS:
            num_heads = OFFICIAL_HEADS[hidden]
        else:
            raise CheckpointError(f"cannot tell the head count of width {hidden}; pass --num-heads")
    swiglu = "blocks.0.mlp.w12.weight" in state
    if swiglu:
        swiglu_hidden = state["blocks.0.mlp.w3.weight"].shape[1]
        mlp_ratio = 4.0 if int(2 / 3 * 4.0 * hidden) == swiglu_hidden else swiglu_hidden * 3 / (2 * hidden)
    else:
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    learned_sigma = final.shape[0] // (patch * patch) == 2 * in_channels
    config = DiTConfig(
        input_size=int(positions.shape[1] ** 0.5) * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=table.shape[0] - 1, learn_sigma=False,
        qk_norm=qk_norm, time_scale=-1.0, time_offset=1.0,
        norm="rmsnorm" if "blocks.0.norm1.weight" in state else "layernorm",
        mlp="swiglu" if swiglu else "gelu", rope=rope, adaln_shift=modulation.shape[0] == 6 * hidden,
    )
    return config, learned_sigma


def translate_state_dict(state: dict[str, torch.Tensor], config: DiTConfig, learned_sigma: bool) -> dict[str, torch.Tensor]:
    state = {k: v.float().clone() for k, v in state.items()}
    weight, bias = state["final_layer.linear.weight"], state["final_layer.linear.bias"]
    if learned_sigma:  # rows are (patch row, patch col, channel): keep the first C channels of each patch cell
        C, p = config.in_channels, config.patch_size
        keep = (torch.arange(p * p * 2 * C).view(p * p, 2 * C)[:, :C]).flatten()
        weight, bias = weight[keep], bias[keep]
    state["final_layer.linear.weight"], state["final_layer.linear.bias"] = -weight, -bias  # velocity sign
    return state


def load_official_lightningdit(path: str | Path, num_heads: int | None = None, prefer: str = "ema") -> DiT:
    state = extract_state_dict(load_torch_file(path), prefer)
    config, learned_sigma = lightningdit_config_from_state_dict(state, num_heads)
    network = DiT(config)
    load_state_dict_strict(network, translate_state_dict(state, config, learned_sigma), str(path))
    return network.eval()


def official_sampler(num_sampling_steps: int = 250, timestep_shift: float = 0.3, cfg_scale: float = 6.7,
                     cfg_interval_start: float | None = 0.125) -> FlowSamplerConfig:
    """The official `inference.py` settings in effigen's conventions (see the module docstring)."""
    return FlowSamplerConfig(
        solver="euler", num_steps=num_sampling_steps - 1, cfg_scale=cfg_scale,
        cfg_interval=None if cfg_interval_start is None else (0.0, 1.0 - cfg_interval_start), cfg_channels=3,
        time_shift=1.0 / timestep_shift if timestep_shift > 0 else 1.0,
    )


def convert_lightningdit_official(checkpoint: str | Path, out: str | Path, num_heads: int | None = None,
                                  sampler: FlowSamplerConfig | None = None, vae=None) -> Path:
    """`vae`: the VA-VAE as a KLVAE with its latent statistics (`convert.sd_vae.load_kl_vae(..., latent_stats=)`),
    stored as the folder's decoder; None = latents only."""
    from ..pipeline import Pipeline

    network = load_official_lightningdit(checkpoint, num_heads)
    objective = RectifiedFlowConfig(time_sampling="logit_normal", cosine_loss_weight=1.0)
    info = {"source": "hustvl/LightningDiT", "checkpoint": str(checkpoint)}
    check_vae(network, vae)
    return Pipeline("dit-flow", network, objective, sampler or official_sampler(), info, tokenizer=vae).save_pretrained(out)
