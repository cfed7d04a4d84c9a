"""Official REPA checkpoints (sihyun-yu/REPA, Yu et al. arXiv 2410.06940) -> effigen `dit-flow` pipeline folders.

REPA trains SiT (its `models/sit.py`: DiT's blocks, no learned sigma) with projector MLPs on the output of block
`encoder_depth` (1-indexed) aligned to a frozen encoder. Accepted: the checkpoint `{'model', 'ema', 'opt', 'args',
'steps'}` that `train.py` writes (file `<steps:07d>.pt`; `'args'` is an `argparse.Namespace`, allow-listed for
`torch.load(weights_only=True)` and nothing else, see `sit_official.load_official_checkpoint`), and the released
`last.pt`, which may be the state dict itself. EMA weights are used when present, as `generate.py` does.

Read off the weights: width, depth, patch, channels, input size, classes, MLP ratio, qk-norm, that the output has no
learned-sigma half, and the projectors (count, hidden width `projector_dim`, output widths `z_dims`). From `args`:
`encoder_depth`, the model name (for the head count, which the weights do not store; else SiT's sizes by width, else
`num_heads`), qk_norm (checked against the weights), path type, cfg_prob. A bare state dict does not record
`encoder_depth`: give it, or REPA's `generate.py` default (8, the released SiT-XL/2's) is taken and the folder's info
says so.

Conventions: REPA's time already is effigen's (t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, the raw t is
embedded, velocity = eps - x), so the network is a validated copy (`time_scale=1`). Sampler (`official_sampler`):
- SDE (`generate.py --mode sde`, the paper's FID: 250 steps, cfg 1.8, guidance interval [0, 0.7]): REPA's grid
  linspace(1, 0.04, N) then 0 is effigen's `num_steps = N - 1, last_step = 0.04`; its diffusion 2 t is effigen's
  `diffusion_norm = 2` (g^2 = diffusion_norm * sigma_t, sigma_t = t); the drift v - t * score = v + eps and the
  noiseless last step are effigen's. REPA guides the drift, effigen the velocity: the drift is affine in the
  velocity, so the two agree.
- ODE (`--mode ode`, Euler or Heun on linspace(1, 0, N + 1)).
- guidance: all channels (no first-3-channels quirk), only while guidance_low <= t <= guidance_high (t = 1 noise),
  the null class is the table's last row. REPA's Heun corrector keeps the guidance decision of the step's start
  time; effigen's decides at each evaluation time, so Heun with an interval differs on a step that crosses an end
  of the interval (see tests/parity/test_repa_parity.py).
`keep_projectors=True` saves the projectors as the folder's `projector` component (`objectives.alignment.Projectors`,
same parameter names); by default they are dropped: sampling does not use them. The folder's info records the
projected block both ways (`encoder_depth`, 1-indexed as REPA; `projector_block`, the 0-based `Taps` index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..io import CheckpointError, load_state_dict_strict
from ..models.dit import DiT, DiTConfig
from ..objectives.alignment import ProjectorConfig, Projectors
from ..objectives.flow_matching import FlowSamplerConfig, RectifiedFlowConfig
from .dit_official import check_vae
from .sit_official import check_dit_shaped, json_args, load_official_checkpoint, resolve_heads

GENERATE_ENCODER_DEPTH = 8  # REPA generate.py's --encoder-depth default (the released SiT-XL/2 + REPA)


@dataclass
class RepaLayout:
    config: DiTConfig
    projector: ProjectorConfig | None  # None: the checkpoint has no projectors
    encoder_depth: int | None  # 1-indexed, as REPA's argument; None: not stored and REPA's default does not fit
    encoder_depth_source: str
    null_row_added: bool  # trained with cfg_prob 0: no null-class row; a zero row stands in and guidance is off


def projector_config(state: dict[str, torch.Tensor], hidden: int) -> ProjectorConfig | None:
    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("projectors.")})
    if not indices:
        return None
    if indices != list(range(len(indices))):
        raise CheckpointError(f"projector indices {indices} are not 0..{len(indices) - 1}")
    widths, out_dims = set(), []
    for j in indices:
        try:
            first, middle, last = (state[f"projectors.{j}.{i}.weight"] for i in (0, 2, 4))
        except KeyError as e:
            raise CheckpointError(f"projector {j} is not REPA's Linear-SiLU-Linear-SiLU-Linear: missing {e}") from e
        if first.shape[1] != hidden or middle.shape != (first.shape[0], first.shape[0]) or last.shape[1] != first.shape[0]:
            raise CheckpointError(f"projector {j} has shapes {tuple(first.shape)}, {tuple(middle.shape)}, "
                                  f"{tuple(last.shape)}; expected (P, {hidden}), (P, P), (z, P)")
        widths.add(first.shape[0])
        out_dims.append(last.shape[0])
    if len(widths) != 1:
        raise CheckpointError(f"the projectors have different hidden widths {sorted(widths)}")
    return ProjectorConfig(in_dim=hidden, hidden_dim=widths.pop(), out_dims=tuple(out_dims))


def repa_layout(state: dict[str, torch.Tensor], args: dict | None = None, num_heads: int | None = None,
                encoder_depth: int | None = None) -> RepaLayout:
    check_dit_shaped(state, "REPA")
    args = args or {}
    patch_weight = state["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[2]
    tokens = state["pos_embed"].shape[1]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise CheckpointError(f"pos_embed has {tokens} tokens, not a square grid")
    final = state["final_layer.linear.weight"]  # (p * p * C_out, decoder_hidden_size)
    if final.shape[0] != patch * patch * in_channels:
        learned = final.shape[0] == patch * patch * 2 * in_channels
        raise CheckpointError(f"the output layer makes {final.shape[0] // (patch * patch)} channels from {in_channels}: "
                              + ("a learned-sigma half, as SiT/DiT have and REPA's SiT does not; use `effigen convert "
                                 "sit-official`" if learned else "not REPA's layout"))
    if final.shape[1] != hidden:
        raise CheckpointError(f"decoder_hidden_size {final.shape[1]} differs from hidden_size {hidden}; REPA's SiT "
                              "models all have them equal")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    qk_norm = "blocks.0.attn.q_norm.weight" in state
    if "qk_norm" in args and bool(args["qk_norm"]) != qk_norm:
        raise CheckpointError(f"args.qk_norm is {args['qk_norm']} but the weights {'have' if qk_norm else 'have no'} "
                              "q_norm/k_norm; the checkpoint is inconsistent")
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    num_classes, null_row_added = rows - 1, False
    if "num_classes" in args:
        if args["num_classes"] == rows and not args.get("cfg_prob", 0.1):
            num_classes, null_row_added = rows, True  # trained without label dropout: no null-class row
        elif args["num_classes"] != rows - 1:
            raise CheckpointError(f"args.num_classes is {args['num_classes']} but the label table has {rows} rows "
                                  "(classes + the null class)")
    if encoder_depth is not None:
        source = "given"
    elif "encoder_depth" in args:
        encoder_depth, source = int(args["encoder_depth"]), "checkpoint args"
    elif GENERATE_ENCODER_DEPTH <= depth:
        encoder_depth, source = GENERATE_ENCODER_DEPTH, "REPA generate.py default (a bare state dict does not store it)"
    else:
        source = f"unknown (a bare state dict does not store it; REPA's default {GENERATE_ENCODER_DEPTH} exceeds the depth)"
    if encoder_depth is not None and not 1 <= encoder_depth <= depth:
        raise CheckpointError(f"encoder_depth {encoder_depth} ({source}) is not a block of this {depth}-block network "
                              f"(1-indexed: 1..{depth})")
    config = DiTConfig(
        input_size=side * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=resolve_heads(hidden, num_heads, args, state), mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=num_classes, learn_sigma=False, qk_norm=qk_norm, time_scale=1.0, time_offset=0.0,
    )
    return RepaLayout(config, projector_config(state, hidden), encoder_depth, source, null_row_added)


def objective_from_args(args: dict | None) -> RectifiedFlowConfig:
    """REPA's training arguments (path_type, prediction, weighting, cfg_prob) as effigen's flow objective."""
    args = args or {}
    path = {"linear": "linear", "cosine": "gvp"}.get(str(args.get("path_type", "linear")))  # cosine: alpha cos, sigma sin
    if path is None:
        raise CheckpointError(f"REPA path_type {args.get('path_type')!r} is not supported (linear or cosine)")
    if str(args.get("prediction", "v")) != "v":
        raise CheckpointError(f"REPA prediction {args.get('prediction')!r} is not supported (v only, as REPA's loss)")
    time_sampling = "uniform" if args.get("weighting", "uniform") == "uniform" else "logit_normal"
    return RectifiedFlowConfig(path=path, prediction="velocity", time_sampling=time_sampling,
                               label_dropout=float(args.get("cfg_prob", 0.1)))


def official_sampler(mode: str = "sde", num_steps: int = 250, cfg_scale: float = 1.8, guidance_low: float = 0.0,
                     guidance_high: float = 0.7, heun: bool = False) -> FlowSamplerConfig:
    """REPA's `generate.py` sampling (`euler_maruyama_sampler` for mode "sde", `euler_sampler` for "ode") in effigen's
    settings; defaults: the paper's SDE, 250 steps, cfg 1.8, guidance interval [0, 0.7]. `num_steps` is REPA's
    argument (the SDE then makes num_steps network evaluations, the Euler ODE num_steps)."""
    interval = None if (guidance_low, guidance_high) == (0.0, 1.0) else (guidance_low, guidance_high)
    common = dict(cfg_scale=cfg_scale, cfg_interval=interval, cfg_channels=None)
    if mode == "sde":
        if num_steps < 2:
            raise ValueError(f"REPA's SDE sampler needs num_steps >= 2 (linspace(1, 0.04, num_steps) then 0), got {num_steps}")
        return FlowSamplerConfig(solver="euler_maruyama", num_steps=num_steps - 1, diffusion_norm=2.0, last_step=0.04,
                                 **common)
    if mode == "ode":
        return FlowSamplerConfig(solver="heun" if heun else "euler", num_steps=num_steps,
                                 cfg_interval_at="step_start", **common)  # REPA decides guidance once per step
    raise ValueError(f"REPA sampling mode must be 'sde' or 'ode', got {mode!r}")


def load_official_repa(path: str | Path, num_heads: int | None = None, encoder_depth: int | None = None):
    """Returns (network, projectors or None, layout, args, which weights, the checkpoint's scalar entries)."""
    state, args, which, meta = load_official_checkpoint(path)
    layout = repa_layout(state, args, num_heads, encoder_depth)
    weights = {k: v.float() for k, v in state.items() if not k.startswith("projectors.")}
    if layout.null_row_added:
        table = weights["y_embedder.embedding_table.weight"]
        weights["y_embedder.embedding_table.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])
    network = DiT(layout.config)
    load_state_dict_strict(network, weights, str(path))
    projectors = None
    if layout.projector is not None:
        projectors = Projectors(layout.projector)
        load_state_dict_strict(projectors, {k: v.float() for k, v in state.items() if k.startswith("projectors.")},
                               f"{path} (projectors)")
        projectors.eval()
    return network.eval(), projectors, layout, args, which, meta


def convert_repa_official(checkpoint: str | Path, out: str | Path, num_heads: int | None = None,
                          sampler: FlowSamplerConfig | None = None, keep_projectors: bool = False,
                          encoder_depth: int | None = None, vae=None) -> Path:
    """`vae`: the SD-VAE as a KLVAE (`convert.sd_vae.load_kl_vae`) stored as the folder's decoder; None = latents.
    `keep_projectors`: save the projectors as the `projector` component (an error if the checkpoint has none)."""
    from ..pipeline import Pipeline

    network, projectors, layout, args, which, meta = load_official_repa(checkpoint, num_heads, encoder_depth)
    if keep_projectors and projectors is None:
        raise CheckpointError(f"{checkpoint} has no projectors (projectors.*) to keep")
    if keep_projectors and layout.encoder_depth is None:
        raise CheckpointError(f"{checkpoint} does not say which block the projectors read (REPA's encoder_depth, "
                              f"{layout.encoder_depth_source}); pass --encoder-depth (1-indexed)")
    check_vae(network, vae)
    sampler = sampler or official_sampler()
    block = None if layout.encoder_depth is None else layout.encoder_depth - 1
    info = {
        "source": "sihyun-yu/REPA", "checkpoint": str(checkpoint), "weights": which,
        "training_steps": meta.get("steps"), "encoder_depth": layout.encoder_depth,
        "encoder_depth_source": layout.encoder_depth_source, "projector_block": block,
        "projectors": None if projectors is None else {
            "z_dims": list(layout.projector.out_dims), "projector_dim": layout.projector.hidden_dim,
            "saved": "component 'projector'" if keep_projectors else "dropped (not needed to sample)"},
        "official_args": json_args(args),
        "sampler_note": "REPA's SDE with num_steps N is effigen's euler_maruyama with num_steps N - 1 plus the noiseless "
                        "last step from t = 0.04 to 0 (N evaluations); diffusion_norm 2 is REPA's diffusion 2t; guidance "
                        "on all channels while t (1 = noise) is in cfg_interval",
    }
    if layout.null_row_added:
        info["null_class"] = "absent (trained with cfg_prob 0): a zero row stands in, guidance is off"
        sampler = replace(sampler, cfg_scale=1.0)
    components = {"projector": projectors} if keep_projectors else None
    return Pipeline("dit-flow", network, objective_from_args(args), sampler, info, tokenizer=vae,
                    components=components).save_pretrained(out)
