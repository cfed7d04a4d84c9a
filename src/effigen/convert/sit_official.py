"""Official SiT checkpoints (willisma/SiT, Ma et al. arXiv 2401.08740) -> effigen `dit-flow` pipeline folders.

SiT's network is DiT's (same keys and shapes, `models.py`), trained on an interpolant instead of DDPM. Accepted:
the released `SiT-XL-2-256x256.pt` (a plain state dict, with the learned-sigma half that SiT's forward drops) and
the training checkpoints `{"model", "ema", "opt", "args"}` that SiT's `train.py` writes, whose `"args"` is an
`argparse.Namespace`: they are read with `torch.load(weights_only=True)` and only `argparse.Namespace` allow-listed
(`load_official_checkpoint`, shared with the REPA converter); any other pickled object is refused. EMA weights are
used when present.

Read off the weights: width, depth, patch, channels, input size, classes, MLP ratio, qk-norm, learned sigma. The head
count is not stored: it comes from `args.model` ("SiT-XL/2" -> 16), else from SiT's sizes by width, else `num_heads`.
From `args` when present: path type (Linear or GVP) and prediction (velocity only).

Translations are LightningDiT's (`lightningdit_official`), since SiT runs time the same way:
- time: SiT's t goes from 0 = noise to 1 = data and the raw t is embedded; effigen's t = 1 - t_SiT, so the network
  gets `time_offset=1, time_scale=-1`;
- velocity: SiT predicts d x / d t_SiT = x_data - noise (Linear), the negative of effigen's; the output layer is
  negated; the learned-sigma rows are dropped;
- sampler (`official_sampler`): SiT's FID recipe is `sample.py SDE` with Euler-Maruyama, `--diffusion-form sigma`,
  `--diffusion-norm 1`, `--last-step Mean --last-step-size 0.04`, 250 steps, cfg 1.5 on the first 3 channels (the
  published numbers depend on it), no interval. SiT's grid linspace(0, 1 - 0.04, N) is effigen's
  linspace(1, 0.04, N) then a noiseless "Mean" step to 0, i.e. `num_steps = N - 1, last_step = 0.04` (N network
  evaluations either way). SiT's diffusion w = norm * sigma_t enters its step as sqrt(2 w) dW with drift
  v + w * score, so g^2 = 2 * norm * sigma_t: effigen's `diffusion_norm` (g^2 = diffusion_norm * sigma_t) is twice
  SiT's `--diffusion-norm`. SiT's ODE default is adaptive dopri5, which effigen does not have.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..io import CheckpointError, load_state_dict_strict
from ..models.dit import DiT, DiTConfig
from ..objectives.flow_matching import FlowSamplerConfig, RectifiedFlowConfig
from .dit_official import check_vae
from .lightningdit_official import lightningdit_config_from_state_dict, translate_state_dict

# SiT_models in SiT's and REPA's models: size letter -> heads (S 384 wide, B 768, L 1024, XL 1152)
SIZE_HEADS = {"S": 6, "B": 12, "L": 16, "XL": 16}
WIDTH_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
REQUIRED_KEYS = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "pos_embed", "final_layer.linear.weight",
                 "blocks.0.adaLN_modulation.1.weight", "blocks.0.mlp.fc1.weight")


def load_official_checkpoint(path: str | Path, prefer: str = "ema") -> tuple[dict[str, torch.Tensor], dict | None, str, dict]:
    """Read a SiT / REPA checkpoint safely. Returns (state dict, the training arguments as a dict or None, which
    weights: "ema", "model" or "state dict", the checkpoint's other scalar entries such as REPA's "steps").

    `torch.load(weights_only=True)` with `argparse.Namespace` allow-listed (the official `train.py` saves its parsed
    arguments), nothing else: a file holding any other pickled object is refused with a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is missing")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        detail = f"it references {found.group(1)}" if found else str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path} holds pickled objects other than tensors, plain containers and argparse.Namespace ({detail}); "
            "effigen reads checkpoints with torch.load(weights_only=True) and does not run pickled code. Re-save the "
            "weights from a trusted environment as a plain state dict: torch.save(torch.load(ckpt)['ema'], 'ema.pt')"
        ) from e
    except Exception as e:  # truncation, zip errors, not a torch file
        raise CheckpointError(f"{path} could not be read as a torch checkpoint (corrupt or truncated?): {e}") from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or a training checkpoint")
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else None
    for key in (prefer, "model"):
        if isinstance(checkpoint.get(key), dict):
            state, which = checkpoint[key], key
            break
    else:
        state, which = checkpoint, "state dict"
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: '{which}' is not a state dict (entries {bad[:4]} are not tensors); expected "
                              "{'model', 'ema', 'opt', 'args', ...} as train.py writes it, or a plain state dict")
    meta = {} if which == "state dict" else {k: v for k, v in checkpoint.items() if isinstance(v, (int, float, str))}
    return state, args, which, meta


def json_args(args: dict | None) -> dict | None:
    """The training arguments that JSON can hold (for the folder's info)."""
    if args is None:
        return None
    return {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool)) or v is None}


def heads_from_model_name(name: Any) -> int | None:
    """"SiT-XL/2" -> 16 (SiT's and REPA's SiT_models); None for any other name."""
    if not isinstance(name, str) or not name.startswith("SiT-") or "/" not in name:
        return None
    return SIZE_HEADS.get(name[4:].split("/")[0])


def resolve_heads(hidden: int, num_heads: int | None, args: dict | None, state: dict[str, torch.Tensor]) -> int:
    """The head count: given, else `args.model`, else qk-norm's width (head_dim), else SiT's sizes by width."""
    if num_heads is not None:
        return num_heads
    from_name = heads_from_model_name((args or {}).get("model"))
    if from_name is not None:
        return from_name
    if "blocks.0.attn.q_norm.weight" in state:
        return hidden // state["blocks.0.attn.q_norm.weight"].shape[0]
    if hidden in WIDTH_HEADS:
        return WIDTH_HEADS[hidden]
    raise CheckpointError(f"cannot tell the head count of width {hidden}: the weights do not store it and the checkpoint "
                          "names no official model (args.model); pass --num-heads")


def check_dit_shaped(state: dict[str, torch.Tensor], converter: str) -> None:
    if "blocks.0.norm1.weight" in state or "blocks.0.mlp.w12.weight" in state or "feat_rope.freqs_cos" in state:
        raise CheckpointError(f"this is a LightningDiT checkpoint (RMSNorm / SwiGLU / RoPE weights), not {converter}'s "
                              "layout; use `effigen convert lightningdit-official`")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"not an official {converter} state dict: missing {', '.join(missing)}")


def sit_config_from_state_dict(state: dict[str, torch.Tensor], num_heads: int | None = None,
                               args: dict | None = None) -> tuple[DiTConfig, bool]:
    """The effigen config in effigen's time convention, and whether the checkpoint has a learned-sigma half."""
    check_dit_shaped(state, "SiT")
    if any(k.startswith("projectors.") for k in state):
        raise CheckpointError("this checkpoint has REPA projectors (projectors.*); use `effigen convert repa-official`")
    hidden = state["x_embedder.proj.weight"].shape[0]
    heads = resolve_heads(hidden, num_heads, args, state)
    return lightningdit_config_from_state_dict(state, heads)


def objective_from_args(args: dict | None) -> RectifiedFlowConfig:
    """SiT's transport arguments (`--path-type`, `--prediction`) as effigen's objective: Linear or GVP, velocity."""
    args = args or {}
    path = str(args.get("path_type", "Linear"))
    prediction = str(args.get("prediction", "velocity"))
    paths = {"linear": "linear", "gvp": "gvp"}  # SiT's GVP (alpha = sin, sigma = cos in its time) is effigen's gvp
    if path.lower() not in paths:
        raise CheckpointError(f"SiT path type {path!r} is not supported (effigen has the Linear and GVP paths)")
    if prediction.lower() != "velocity":
        raise CheckpointError(f"SiT prediction {prediction!r} is not supported by this converter (velocity only)")
    return RectifiedFlowConfig(path=paths[path.lower()], prediction="velocity", time_sampling="uniform")


def official_sampler(num_steps: int = 250, cfg_scale: float = 1.5, diffusion_norm: float = 1.0,
                     last_step_size: float = 0.04) -> FlowSamplerConfig:
    """SiT's `sample.py SDE` (Euler-Maruyama, sigma diffusion, Mean last step) in effigen's conventions (see the
    module docstring): `num_steps` network evaluations, guidance on the first 3 channels."""
    if num_steps < 2:
        raise ValueError(f"SiT's SDE sampler needs num_steps >= 2 (its grid has num_steps points), got {num_steps}")
    return FlowSamplerConfig(solver="euler_maruyama", num_steps=num_steps - 1, cfg_scale=cfg_scale, cfg_interval=None,
                             cfg_channels=3, diffusion_norm=2.0 * diffusion_norm, last_step=last_step_size)


def load_official_sit(path: str | Path, num_heads: int | None = None) -> tuple[DiT, dict | None, str]:
    state, args, which, _ = load_official_checkpoint(path)
    config, learned_sigma = sit_config_from_state_dict(state, num_heads, args)
    network = DiT(config)
    load_state_dict_strict(network, translate_state_dict(state, config, learned_sigma), str(path))
    return network.eval(), args, which


def convert_sit_official(checkpoint: str | Path, out: str | Path, num_heads: int | None = None,
                         sampler: FlowSamplerConfig | None = None, vae=None) -> Path:
    """`vae`: the SD-VAE as a KLVAE (`convert.sd_vae.load_kl_vae`) stored as the folder's decoder; None = latents."""
    from ..pipeline import Pipeline

    network, args, which = load_official_sit(checkpoint, num_heads)
    objective = objective_from_args(args)
    check_vae(network, vae)
    info = {"source": "willisma/SiT", "checkpoint": str(checkpoint), "weights": which, "official_args": json_args(args),
            "conventions": "time and velocity translated (t = 1 - t_SiT, v = -v_SiT); SDE diffusion_norm = 2 x SiT's"}
    return Pipeline("dit-flow", network, objective, sampler or official_sampler(), info, tokenizer=vae).save_pretrained(out)

