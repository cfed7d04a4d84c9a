"""Official RAE stage-2 checkpoints (bytetriper/RAE `src/stage2/models/DDT.py`, `DiTwDDTHead`) -> effigen `dit-dh`
pipeline folders, with the autoguidance model as the folder's `guidance_model` component.

Accepts the training checkpoint `{"step", "epoch", "model", "ema", "optimizer", "scheduler"}` that the official
`train.py` writes (the EMA weights, as the official loader takes them) or a plain state dict (the released
`stage2_model.pt`). Every hyperparameter is read off the tensors: encoder width / depth (`s_embedder`, `blocks.i`
of that width), head width / depth (`x_embedder`, the wider blocks), head counts from the RoPE tables (the official
`VisionRotaryEmbeddingFast` tables are (L, head_dim)), RMSNorm, SwiGLU (and its hidden width, hence mlp_ratio),
qk-norm, `wo_shift`, absolute positions.

Translations, all here in one place:
- names: s_embedder -> x_embedder (the encoder's patch embedding, as in DiT), x_embedder -> head_embedder,
  s_projector -> head_projector, blocks.{depth + i} -> head_blocks.i, enc_feat_rope -> feat_rope,
  dec_feat_rope -> head_rope (models/dit.py);
- time: RAE's network takes t in [0, 1] with t = 1 noise and predicts the velocity noise - x_data, which is effigen's
  convention (the reverse of LightningDiT's), so the network's time map is the identity (time_offset 0, time_scale 1)
  and no output is negated. The official SAMPLER runs its integration variable the other way, s = linspace(t0, t1)
  from 0 up to t1 = 1 - 1/1000, and evaluates at t = 1 - s (then shifted): in effigen's direction that is the
  decreasing grid from 1 to `t_end` = 1 - t1 = 1/1000 with `num_steps - 1` Euler steps, the sample being the state
  at the last grid point (no final step to 0). That translation is `official_sampler` below;
- guidance: CFG on all channels (DDT.py's `forward_with_cfg`), interval per sample on t in [t_min, t_max];
  autoguidance with the guidance model, same interval;
- shift: s = sqrt(time_dist_shift_dim / time_dist_shift_base), stored as the sampler's explicit `time_shift`, and as
  the objective's shift_dim / shift_base for further training.
The official stage-1 decoder (a transformers ViT-MAE decoder) and DINOv2 encoder are not converted here (see
docs/rae.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..io import CheckpointError, load_state_dict_strict, load_torch_file
from ..models.dit import DiT, DiTConfig
from ..nn.embeddings import sincos_2d_positions
from ..objectives.rae import SHIFT_BASE, RAEFlowConfig, RAESamplerConfig
from .dit_official import extract_state_dict

if TYPE_CHECKING:  # imported where used, as the function does
    from ..tokenizers.rae import RAEConfig

RENAMES = (("s_embedder.", "x_embedder."), ("x_embedder.", "head_embedder."), ("s_projector.", "head_projector."),
           ("enc_feat_rope.", "feat_rope."), ("dec_feat_rope.", "head_rope."))


def rae_config_from_state_dict(state: dict[str, torch.Tensor], head_depth: int | None = None) -> DiTConfig:
    """`head_depth`: the config's depth[1], needed only when encoder and head have the same width (then no
    s_projector exists and the split of `blocks` is not in the weights)."""
    try:
        s_proj = state["s_embedder.proj.weight"]  # (D, C * p * p, p', p'), official patch 1
        x_proj = state["x_embedder.proj.weight"]  # (D_head, C, 1, 1)
        table = state["y_embedder.embedding_table.weight"]  # (K + 1, D)
        modulation = state["blocks.0.adaLN_modulation.1.weight"]
        state["t_embedder.W"]  # RAE's Gaussian Fourier time embedding
    except KeyError as e:
        raise CheckpointError(f"not an official RAE DiT^DH (DDT.py DiTwDDTHead) state dict: missing {e}") from e
    hidden, head_hidden, in_channels, patch = s_proj.shape[0], x_proj.shape[0], s_proj.shape[1], s_proj.shape[2]
    if patch != 1 or x_proj.shape[2] != 1:
        raise CheckpointError(f"this DiT^DH has patch size {patch}; the official DDT.py runs patch size 1 only")
    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    if head_hidden == hidden:  # same widths: the head blocks cannot be told apart by shape
        if head_depth is None or not 0 < head_depth < len(indices):
            raise CheckpointError(f"encoder and DDT head have the same width {hidden}, so the split of the "
                                  f"{len(indices)} blocks is not in the weights: pass the config's head depth "
                                  "(depth[1]) with --head-depth")
        depth = len(indices) - head_depth
    else:
        depth = sum(1 for i in indices if state[f"blocks.{i}.attn.qkv.weight"].shape[1] == hidden)
        if head_depth is not None and head_depth != len(indices) - depth:
            raise CheckpointError(f"--head-depth {head_depth} disagrees with the weights ({len(indices) - depth} "
                                  f"blocks of the head's width {head_hidden})")
        head_depth = len(indices) - depth
    if "enc_feat_rope.freqs_cos" not in state:
        raise CheckpointError("the official DDT.py needs RoPE (use_rope=False crashes in its forward); this state dict "
                              "has no enc_feat_rope tables")
    num_heads = hidden // state["enc_feat_rope.freqs_cos"].shape[1]
    head_num_heads = head_hidden // state["dec_feat_rope.freqs_cos"].shape[1]
    L = state["enc_feat_rope.freqs_cos"].shape[0]
    grid = math.isqrt(L)
    swiglu = "blocks.0.mlp.w12.weight" in state
    if swiglu:  # official: SwiGLUFFN(D, int(2 / 3 * mlp_ratio * D)); both widths share mlp_ratio
        swiglu_hidden = state["blocks.0.mlp.w3.weight"].shape[1]
        mlp_ratio = 4.0 if int(2 / 3 * 4.0 * hidden) == swiglu_hidden else swiglu_hidden * 3 / (2 * hidden)
    else:
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    return DiTConfig(
        input_size=grid, patch_size=1, in_channels=in_channels, hidden_size=hidden, depth=depth, num_heads=num_heads,
        mlp_ratio=mlp_ratio, num_classes=table.shape[0] - 1, qk_norm="blocks.0.attn.q_norm.weight" in state,
        time_scale=1.0, time_offset=0.0, norm="rmsnorm" if "blocks.0.norm1.weight" in state else "layernorm",
        mlp="swiglu" if swiglu else "gelu", rope=True, adaln_shift=modulation.shape[0] == 6 * hidden,
        time_embedding="fourier", head_depth=head_depth, head_hidden_size=head_hidden, head_num_heads=head_num_heads,
        absolute_positions="pos_embed" in state,
    )


def translate_state_dict(state: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    out = {}
    if not config.absolute_positions:  # use_pos_embed=False: effigen keeps its (unused) table in the state dict
        grid = config.input_size // config.patch_size
        out["pos_embed"] = torch.from_numpy(sincos_2d_positions(config.hidden_size, grid)).float().unsqueeze(0)
    for key, value in state.items():
        new = key
        for old, renamed in RENAMES:
            if key.startswith(old):
                new = renamed + key[len(old):]
                break
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            if index >= config.depth:
                new = f"head_blocks.{index - config.depth}." + key.split(".", 2)[2]
        out[new] = value.float().clone()
    return out


def load_official_rae(path: str | Path, prefer: str = "ema", head_depth: int | None = None) -> DiT:
    state = extract_state_dict(load_torch_file(path), prefer)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict")
    config = rae_config_from_state_dict(state, head_depth)
    network = DiT(config)
    load_state_dict_strict(network, translate_state_dict(state, config), str(path))
    return network.eval()


def official_sampler(num_steps: int = 50, shift_dim: int | None = None, shift_base: float = SHIFT_BASE,
                     cfg_scale: float = 1.0, guidance: str = "cfg", t_min: float = 0.0, t_max: float = 1.0,
                     time_shift: float | None = None) -> RAESamplerConfig:
    """The official `sample_ode(sampling_method="euler", num_steps)` in effigen's direction (module docstring):
    `num_steps` grid points = num_steps - 1 Euler steps down to t_end = 1/1000; shift sqrt(shift_dim / shift_base)
    (the official code asserts it is >= 1) unless `time_shift` is given."""
    if time_shift is None:
        if shift_dim is None:
            raise ValueError("give shift_dim (C h w of the latent) or time_shift")
        time_shift = math.sqrt(shift_dim / shift_base)
    return RAESamplerConfig(solver="euler", num_steps=num_steps - 1, cfg_scale=cfg_scale, guidance=guidance,
                            cfg_interval=None if (t_min, t_max) == (0.0, 1.0) else (t_min, t_max),
                            time_shift=time_shift, t_end=1.0 / 1000)


def convert_rae_official(checkpoint: str | Path, out: str | Path, guidance_checkpoint: str | Path | None = None,
                         sampler: RAESamplerConfig | None = None, tokenizer=None, shift_dim: int | None = None,
                         shift_base: float = SHIFT_BASE, num_steps: int = 50, cfg_scale: float | None = None,
                         head_depth: int | None = None, guidance_head_depth: int | None = None) -> Path:
    """`guidance_checkpoint`: the autoguidance model (DiT^DH-S in the paper), stored as `guidance_model`; with it the
    default sampler is the paper's autoguidance (scale 1.42), without it unguided (`cfg_scale` overrides either).
    `shift_dim` / `shift_base`: the official config's time_dist_shift_dim / _base (not stored in checkpoints; default:
    C h w of the checkpoint's latent, which is the released models' 16 x 16 x 768 = 196608, and 4096). `sampler`
    replaces the whole default. `tokenizer`: an RAE tokenizer for the latent (None = latents only). `head_depth` /
    `guidance_head_depth`: the configs' depth[1], needed only for a model whose encoder and head widths agree."""
    from ..pipeline import Pipeline

    network = load_official_rae(checkpoint, head_depth=head_depth)
    config = network.config
    dim = shift_dim or config.in_channels * config.input_size ** 2
    components = {}
    if guidance_checkpoint is not None:
        guide = load_official_rae(guidance_checkpoint, head_depth=guidance_head_depth)
        if (guide.config.in_channels, guide.config.input_size, guide.config.num_classes) != (
                config.in_channels, config.input_size, config.num_classes):
            raise CheckpointError(f"the guidance model {guidance_checkpoint} works on {guide.config.in_channels} x "
                                  f"{guide.config.input_size}^2 latents with {guide.config.num_classes} classes, the "
                                  f"generator on {config.in_channels} x {config.input_size}^2 with {config.num_classes}")
        components["guidance_model"] = guide
    if sampler is None:
        guided = guidance_checkpoint is not None
        scale = cfg_scale if cfg_scale is not None else (1.42 if guided else 1.0)
        sampler = official_sampler(num_steps, dim, shift_base, scale, "autoguidance" if guided else "cfg")
    if sampler.guidance == "autoguidance" and not components:
        raise CheckpointError("autoguidance needs the guidance model: pass --guidance-ckpt")
    # the official code asserts s >= 1, so further training keeps its shift or fails loudly
    objective = RAEFlowConfig(time_sampling="logit_normal", shift_dim=dim, shift_base=shift_base,
                              shift_below_one="error")
    info = {"source": "bytetriper/RAE", "checkpoint": str(checkpoint)}
    if guidance_checkpoint is not None:
        info["guidance_checkpoint"] = str(guidance_checkpoint)
    return Pipeline("dit-dh", network, objective, sampler, info, tokenizer=tokenizer,
                    components=components).save_pretrained(out)


def add_guidance_model(pipeline, guide, source: str = "the guidance folder") -> None:
    """Make the generator network `guide` (a smaller or earlier model of the same latent, e.g. a DiT^DH-S) the
    `guidance_model` component of the loaded `pipeline` (in memory), for `sampler.guidance=autoguidance`."""
    from ..config import ConfigError

    if "guidance_model" not in getattr(pipeline.objective, "extra_components", ()):
        raise ConfigError(f"method {pipeline.method.name} does not sample with a guidance model (autoguidance is "
                          "dit-dh's); train the generator with method dit-dh")
    config = getattr(guide, "config", None)
    if pipeline.latent_shape is None or not hasattr(config, "input_size") or (
            config.in_channels, config.input_size, config.input_size) != pipeline.latent_shape:
        raise ConfigError(f"the generator of {source} does not denoise the generator's latents "
                          f"{pipeline.latent_shape}: train the guidance model on the same tokenizer and data")
    if config.num_classes != pipeline.num_classes:
        raise ConfigError(f"the guidance model of {source} has {config.num_classes} classes, the generator "
                          f"{pipeline.num_classes}")
    guide = guide.to(pipeline.device).eval()
    pipeline.components["guidance_model"] = guide
    pipeline.objective.guidance_model = guide


def attach_guidance_model(folder: str | Path, guidance_folder: str | Path, out: str | Path | None = None) -> Path:
    """Put the generator of `guidance_folder` into the `dit-dh` pipeline `folder` as its `guidance_model` component;
    writes `out` (default: `folder`, replaced atomically). Returns the path."""
    from ..pipeline import Pipeline

    pipeline = Pipeline.from_pretrained(folder)
    add_guidance_model(pipeline, Pipeline.from_pretrained(guidance_folder).generator, str(guidance_folder))
    return pipeline.save_pretrained(out or folder)


# ------------------------------------------------------------------------------------------------ stage 1 (decoder)
def _decoder_state(checkpoint) -> dict[str, torch.Tensor]:
    """The decoder's tensors from a released decoder file (a plain state dict), a training checkpoint ('ema' /
    'model'), or a whole-RAE state dict (keys under `decoder.`)."""
    state = extract_state_dict(checkpoint, "ema")
    if not isinstance(state, dict):
        raise CheckpointError("no state dict in the RAE decoder checkpoint")
    if not any(k.startswith("decoder_embed.") for k in state) and any(k.startswith("decoder.decoder_embed.") for k in state):
        state = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
    if "decoder_embed.weight" not in state or "decoder_pred.weight" not in state:
        raise CheckpointError("not an official RAE stage-1 decoder (GeneralDecoder) state dict: no decoder_embed / "
                              "decoder_pred weights")
    return state


def rae_decoder_config(state: dict[str, torch.Tensor], encoder: str, num_heads: int,
                       layer_norm_eps: float = 1e-12) -> "RAEConfig":
    """The RAE tokenizer config of an official decoder; heads and LayerNorm eps are not in the weights (ViT-MAE's
    default eps 1e-12)."""
    from ..tokenizers.rae import RAEConfig

    hidden, encoder_dim = state["decoder_embed.weight"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("decoder_layers.")})
    intermediate = state["decoder_layers.0.intermediate.dense.weight"].shape[0]
    patch = math.isqrt(state["decoder_pred.weight"].shape[0] // 3)
    grid = math.isqrt(state["decoder_pos_embed"].shape[1] - 1) if "decoder_pos_embed" in state else None
    if grid is None:
        raise CheckpointError("the decoder state dict has no decoder_pos_embed, which gives the token grid")
    return RAEConfig(encoder=encoder, encoder_dim=encoder_dim, grid=grid, resolution=grid * patch,
                     decoder_hidden_size=hidden, decoder_depth=depth, decoder_num_heads=num_heads,
                     decoder_mlp_ratio=intermediate / hidden, decoder_cls_token=True, decoder_gelu="exact",
                     decoder_layer_norm_eps=layer_norm_eps, normalize_latents=True)


def translate_decoder_state(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Official GeneralDecoder names -> effigen's ViTDecoder (under `decoder.`); q, k, v fused into qkv. The fixed
    decoder_pos_embed is recomputed (the same MAE sin-cos table with a zero CLS row), not loaded."""
    out = {"decoder.embed.weight": state["decoder_embed.weight"], "decoder.embed.bias": state["decoder_embed.bias"],
           "decoder.cls_token": state["trainable_cls_token"],
           "decoder.norm.weight": state["decoder_norm.weight"], "decoder.norm.bias": state["decoder_norm.bias"],
           "decoder.head.weight": state["decoder_pred.weight"], "decoder.head.bias": state["decoder_pred.bias"]}
    for i in range(depth):
        official, ours = f"decoder_layers.{i}.", f"decoder.blocks.{i}."
        attention = official + "attention.attention."
        for kind in ("weight", "bias"):
            out[ours + f"attn.qkv.{kind}"] = torch.cat([state[attention + f"{name}.{kind}"]
                                                         for name in ("query", "key", "value")])
            out[ours + f"attn.proj.{kind}"] = state[official + f"attention.output.dense.{kind}"]
            out[ours + f"norm1.{kind}"] = state[official + f"layernorm_before.{kind}"]
            out[ours + f"norm2.{kind}"] = state[official + f"layernorm_after.{kind}"]
            out[ours + f"mlp.fc1.{kind}"] = state[official + f"intermediate.dense.{kind}"]
            out[ours + f"mlp.fc2.{kind}"] = state[official + f"output.dense.{kind}"]
    return {k: v.float().clone() for k, v in out.items()}


def load_official_rae_decoder(path: str | Path, encoder: str, num_heads: int = 16, stats: str | Path | None = None,
                              layer_norm_eps: float = 1e-12):
    """An RAE tokenizer from the official stage-1 decoder file (`decoders/.../model.pt`) and, optionally, the latent
    statistics `stat.pt` ({'mean', 'var'}, each (C, h, w)); `encoder` is the teacher spec of the frozen encoder
    (`dinov2-vitb14-reg=PATH` for the released DINOv2-B decoders). Only checked against a state dict written in the
    layout the official code defines (see docs/rae.md): the released files were not available here."""
    from ..tokenizers.rae import RAE

    state = _decoder_state(load_torch_file(path))
    config = rae_decoder_config(state, encoder, num_heads, layer_norm_eps)
    tokenizer = RAE(config)
    weights = translate_decoder_state(state, config.decoder_depth)
    if stats is not None:
        data = load_torch_file(stats)
        if not (isinstance(data, dict) and "mean" in data and "var" in data):
            raise CheckpointError(f"{stats} is not an RAE statistics file (a dict with 'mean' and 'var')")
        shape = tuple(tokenizer.latent_mean.shape)
        mean, var = data["mean"].float().reshape(-1), data["var"].float().reshape(-1)
        if mean.numel() != math.prod(shape) or var.numel() != math.prod(shape):
            raise CheckpointError(f"{stats} holds statistics of {mean.numel()} values, the latent has {shape}")
        weights["latent_mean"], weights["latent_var"] = mean.view(shape), var.view(shape)
    else:
        config.normalize_latents = False  # no statistics: raw (LayerNorm-ed) tokens
        weights["latent_mean"], weights["latent_var"] = tokenizer.latent_mean, tokenizer.latent_var
    load_state_dict_strict(tokenizer, weights, str(path))
    table = state["decoder_pos_embed"].float()
    if table.shape != tokenizer.decoder.pos_embed.shape or (table - tokenizer.decoder.pos_embed).abs().max() > 1e-4:
        raise CheckpointError(f"{path}: decoder_pos_embed is not the fixed MAE sin-cos table (with a zero CLS row) "
                              "that the official GeneralDecoder builds; this decoder cannot be converted")
    return tokenizer.eval()


def convert_rae_decoder(path: str | Path, out: str | Path, encoder: str, num_heads: int = 16,
                        stats: str | Path | None = None) -> Path:
    """An official stage-1 decoder (+ statistics) -> an `rae` tokenizer folder."""
    from ..objectives.autoencoder import NoSamplerConfig
    from ..objectives.rae import RAEDecoderLossConfig
    from ..pipeline import Pipeline

    tokenizer = load_official_rae_decoder(path, encoder, num_heads, stats)
    info = {"source": "bytetriper/RAE stage 1", "checkpoint": str(path)}
    return Pipeline("rae", None, RAEDecoderLossConfig(), NoSamplerConfig(), info, tokenizer=tokenizer).save_pretrained(out)
