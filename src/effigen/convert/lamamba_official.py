"""Official LaMamba-Diff checkpoints (yunxiangfu2001/LaMamba-Diff, arXiv 2408.02615) -> effigen `lamamba-ddpm` folders.

Accepts the official training checkpoints (`{"model", "ema", "opt", "args", "config"}`, as train.py writes them;
the EMA weights are used, as sample.py's `find_model` does) and bare state dicts. effigen's LaMamba keeps the
official parameter names, so conversion is a validated copy. Read off the tensor shapes: input channels, patch
size, grid (the learned position table), widths, blocks per level (encoder, bottleneck, decoder), heads per level
(relative position tables), window size, d_state, ssm ratio, dt rank, conv size and bias, MLP ratio, classes,
learned sigma. Not in the weights: the scan order (`MODEL.VSSM.CONTINUOUS_SCAN`), taken from the yaml config
beside the checkpoint (`--config`), else from the checkpoint's own 'config' tree, else the official default
(snake). The derived buffers (relative_position_index, the shifted-window attn_mask) are checked against the ones
effigen builds and then dropped, so a shift or window misread is an error, not a silent difference.

Official sampling conventions recorded in the folder: 1000-step linear DDPM schedule, epsilon + learned-range
variance, integer timesteps into the embedding (effigen t * 1000), guidance on ALL `in_chans` eps channels (the DiT
3-channel line is commented out in the official forward_with_cfg): cfg_channels = in_channels; ancestral DDPM over a
respaced schedule (sample.py: 250 steps; cfg 1.5 by default, 4.0 in sample.sh). GELU is the exact (erf) one.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..io import CheckpointError, load_state_dict_strict, load_torch_file
from ..models.lamamba import LaMamba, LaMambaConfig, shifted_window_mask
from ..objectives.ddpm import DDPMConfig, DDPMSamplerConfig
from .dit_official import extract_state_dict

def _count(state, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def read_official_yaml(path: str | Path) -> dict:
    """The MODEL tree of an official yaml config (config.py's get_config merges it over its defaults)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"config file {path} is missing (the official yaml, e.g. configs/LaMamba-DIff-XL.yaml)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("MODEL", {}), dict):
        raise CheckpointError(f"{path} is not an official LaMamba-Diff yaml config (no MODEL section)")
    return data.get("MODEL", {})


def _model_settings(checkpoint, config_path: str | Path | None) -> dict:
    if config_path is not None:
        return read_official_yaml(config_path)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("config"), dict):
        return checkpoint["config"].get("MODEL", {}) or {}
    return {}


def _check_supported(model: dict, where: str) -> None:
    vssm = model.get("VSSM", {}) or {}
    unsupported = [(key, value, want) for key, value, want in (
        ("MODEL.SKIP_CONCAT", model.get("SKIP_CONCAT", False), False),
        ("MODEL.VSSM.SSM_FORWARDTYPE", str(vssm.get("SSM_FORWARDTYPE", "v2")), "v2"),
        ("MODEL.VSSM.DOWNSAMPLE", str(vssm.get("DOWNSAMPLE", "v1")), "v1"),
        ("MODEL.VSSM.NORM_LAYER", str(vssm.get("NORM_LAYER", "ln")).lower(), "ln"),
        ("MODEL.VSSM.MLP_ACT_LAYER", str(vssm.get("MLP_ACT_LAYER", "gelu")).lower(), "gelu"),
        ("MODEL.VSSM.SSM_ACT_LAYER", str(vssm.get("SSM_ACT_LAYER", "silu")).lower(), "silu"),
    ) if value != want]
    if unsupported:
        text = ", ".join(f"{k} = {v!r} (supported: {w!r})" for k, v, w in unsupported)
        raise CheckpointError(f"{where}: effigen's LaMamba implements the released configuration only; {text}")


def lamamba_config_from_state_dict(state: dict[str, torch.Tensor], scan: str = "snake") -> LaMambaConfig:
    try:
        stem = state["patch_embed.proj.weight"]  # (e, C, p, p)
        pos = state["pos_embed"]  # (1, S, S, e)
        table = state["y_embedder.embedding_table.weight"]  # (K + 1, cond)
        final = state["final_linear.weight"]  # (C_out, e)
        first = "layers.0.blocks.0."
        heads = [state[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]
                 for i in range(_count(state, "layers."))]
        rel = state[first + "attn.relative_position_bias_table"]  # ((2w - 1)^2, heads)
        A = state[first + "op.A_logs"]  # (4 * inner, N)
        dt = state[first + "op.dt_projs_weight"]  # (4, inner, rank)
        conv = state[first + "op.conv2d.weight"]  # (inner, 1, k, k)
        fc1 = state[first + "mlp.fc1.weight"]  # (r e, e)
    except KeyError as e:
        raise CheckpointError(f"not an official LaMamba-Diff state dict (or a level has no blocks): missing {e}") from e
    if any(k.startswith("layers_up.") and ".skip_conv." in k for k in state):
        raise CheckpointError("this checkpoint was trained with SKIP_CONCAT true (skip_conv keys); effigen's LaMamba "
                              "implements the released skip addition only")
    width, in_channels, patch = stem.shape[0], stem.shape[1], stem.shape[2]
    n = len(heads)
    depths = [_count(state, f"layers.{i}.blocks.") for i in range(n)]
    decoder = [_count(state, f"layers_up.{i}.blocks.") for i in range(n)]
    extra = decoder[1] == depths[n - 2] + 1 if n > 1 else False
    window = round((rel.shape[0] ** 0.5 + 1) / 2)  # the level-0 window, min(window_size, level-0 resolution)
    inner = dt.shape[1]
    ranks = {k: v.shape[2] for k, v in state.items() if k.endswith("op.dt_projs_weight")}  # (4, inner, rank)
    widths = {k: state[k.replace("dt_projs_weight", "out_proj.weight")].shape[0] for k in ranks}
    if all(r == math.ceil(widths[k] / 16) for k, r in ranks.items()):
        dt_rank = "auto"
    elif len(set(ranks.values())) == 1:
        dt_rank = dt.shape[2]
    else:
        raise CheckpointError(f"the dt ranks {sorted(set(ranks.values()))} are neither one value nor 'auto' "
                              "(ceil(width / 16) per block)")
    config = LaMambaConfig(
        input_size=pos.shape[1] * patch, in_channels=in_channels, patch_size=patch, embed_dim=width, depths=depths,
        bottleneck_depth=_count(state, "mid_layer.blocks."), decoder_extra_block=extra, num_heads=heads,
        window_size=window, mlp_ratio=fc1.shape[0] / width, d_state=A.shape[1], ssm_ratio=inner / width,
        dt_rank=dt_rank, d_conv=conv.shape[-1], conv_bias=first + "op.conv2d.bias" in state, scan=scan,
        num_classes=table.shape[0] - 1, learn_sigma=final.shape[0] == 2 * in_channels, time_scale=1000.0)
    expected = [d + int(extra and not (i == 0 and depths[-1] == 0)) for i, d in enumerate(depths[::-1])]
    if decoder != expected:
        raise CheckpointError(f"decoder blocks per level {decoder} do not follow the official rule from the encoder's "
                              f"{depths} (expected {expected})")
    return config


def _check_derived_buffers(network: LaMamba, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Drop the official derived buffers after checking that effigen builds the same windows, shifts and masks."""
    modules = dict(network.named_modules())
    kept = {}
    for key, value in state.items():
        if key.endswith("attn.relative_position_index"):
            attn = modules[key[: -len(".relative_position_index")]]
            if not torch.equal(value.long(), attn.relative_position_index):
                raise CheckpointError(f"{source}: {key} differs from the window effigen builds ({attn.window})")
        elif key.endswith(".attn_mask"):
            attn = modules[key[: -len("attn_mask")] + "attn"]
            if not attn.shift:
                raise CheckpointError(f"{source}: {key} says this block shifts its windows, effigen's does not")
        else:
            kept[key] = value
    for name, module in modules.items():  # every shifted block must carry the official mask
        if getattr(module, "shift", 0) and name.endswith("attn"):
            key = name[: -len("attn")] + "attn_mask"
            if key not in state:
                raise CheckpointError(f"{source}: effigen shifts the windows of {name[:-5]}, the checkpoint has "
                                      f"no {key}")
            res = int(state[key].shape[0] ** 0.5) * module.window
            ours = shifted_window_mask(res, res, module.window, module.shift) != 0
            if not torch.equal(ours, state[key] != 0):
                raise CheckpointError(f"{source}: {key} masks other token pairs than effigen's shifted window mask")
    return kept


def load_official_lamamba(path: str | Path, config_path: str | Path | None = None, scan: str | None = None,
                          prefer: str = "ema") -> LaMamba:
    """`scan`: override the scan order ("snake" / "raster"); None reads CONTINUOUS_SCAN (default true: snake)."""
    checkpoint = load_torch_file(path)
    model = _model_settings(checkpoint, config_path)
    _check_supported(model, str(config_path or path))
    if scan is None:
        scan = "snake" if (model.get("VSSM", {}) or {}).get("CONTINUOUS_SCAN", True) else "raster"
    state = extract_state_dict(checkpoint, prefer)
    config = lamamba_config_from_state_dict(state, scan)
    window = (model.get("VSSM", {}) or {}).get("WINDOW_SIZE")
    if window is not None and window != config.window_size and config.encoder_resolutions()[0] > config.window_size:
        raise CheckpointError(f"{path}: the config's WINDOW_SIZE {window} disagrees with the weights' window "
                              f"{config.window_size}")
    network = LaMamba(config)
    state = _check_derived_buffers(network, state, str(path))
    load_state_dict_strict(network, {k: v.float() for k, v in state.items()}, str(path))
    return network.eval()


def convert_lamamba_official(checkpoint: str | Path, out: str | Path, config_path: str | Path | None = None,
                             num_steps: int = 250, cfg_scale: float = 1.5, vae=None, scan: str | None = None) -> Path:
    """`vae`: a KLVAE stored as the folder's decoder; None = latents only. Defaults: sample.py's (250 ancestral
    DDPM steps, cfg 1.5; the README's sample.sh uses 4.0)."""
    from ..pipeline import Pipeline
    from .dit_official import check_vae

    network = load_official_lamamba(checkpoint, config_path, scan)
    objective = DDPMConfig(num_timesteps=1000, beta_schedule="linear", learn_sigma=network.config.learn_sigma)
    sampler = DDPMSamplerConfig(solver="ddpm", num_steps=num_steps, cfg_scale=cfg_scale,
                                cfg_channels=network.config.in_channels)
    info = {"source": "yunxiangfu2001/LaMamba-Diff", "checkpoint": str(checkpoint)}
    check_vae(network, vae)
    return Pipeline("lamamba-ddpm", network, objective, sampler, info, tokenizer=vae).save_pretrained(out)
