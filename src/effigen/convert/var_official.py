"""Official VAR checkpoints (FoundationVision/VAR) -> an effigen `var` pipeline folder.

    effigen convert var-official --vae vae_ch160v4096z32.pth --var var_d16.pth --out var-d16

Both files are plain state dicts (`torch.load(weights_only=True)`); training checkpoints
(`{'trainer': {'var_wo_ddp', 'vae_local', ...}}`) are accepted too. effigen keeps the official parameter names,
so conversion is a validated copy. Every hyperparameter that the keys and shapes determine is read off them:

- tokenizer: `ch` (encoder.conv_in), channel multipliers and `num_res_blocks` (encoder.down.*), attention
  (encoder.down.<last>.attn, encoder.mid.attn_1), `Cvae` and the quant-conv kernel, vocabulary, the phi layout
  (`share_quant_resi`: qresi_ls.k -> partially shared, qresi -> one shared, quant_resi.k -> one per scale) and
  the number of scales (rows of `ema_vocab_hit_SV`);
- transformer: depth, width, MLP ratio, classes, vocabulary, l2-normalised attention and the head count
  (`scale_mul_1H11`), shared adaLN, and the scale schedule (from the `lvl_1L` buffer when present; else the
  official schedule whose token count equals `pos_1LC`'s length).

The rest are options with the official defaults: `quant_resi` (0.5), `beta` (0.25), the head count when the
attention is not l2-normalised (heads = depth), the image resolution (last scale x downsampling). The folder
records VAR's README FID settings (cfg 1.5 on the linear ramp = effigen cfg_scale 2.5, top-k 900, top-p 0.96). Licence: MIT.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..io import CheckpointError, load_state_dict_strict, load_torch_file
from ..models.var import VAR, VARConfig
from ..objectives.next_scale import NextScaleConfig
from ..samplers.next_scale import NextScaleSamplerConfig
from ..tokenizers.msvq import VAR_SCALES, MultiScaleVQ, MultiScaleVQConfig

# constant buffers of the official modules that effigen computes instead of storing
DROPPED_BUFFERS = re.compile(r"(^|\.)(zero_k_bias|lvl_1L|attn_bias_for_masking)$")


def _state_dict(checkpoint, kind: str) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict) and "trainer" in checkpoint and isinstance(checkpoint["trainer"], dict):
        key = "var_wo_ddp" if kind == "var" else "vae_local"
        if key not in checkpoint["trainer"]:
            raise CheckpointError(f"training checkpoint has no trainer.{key}")
        checkpoint = checkpoint["trainer"][key]
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise CheckpointError(f"expected an official {kind} state dict (name -> tensor)")
    return checkpoint


def _indices(state: dict, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def vqvae_config_from_state_dict(state: dict[str, torch.Tensor], resolution: int | None = None,
                                 scales: tuple[int, ...] | None = None, quant_resi: float = 0.5,
                                 beta: float = 0.25) -> MultiScaleVQConfig:
    try:
        ch = state["encoder.conv_in.weight"].shape[0]
        in_channels = state["encoder.conv_in.weight"].shape[1]
        latent = state["quant_conv.weight"].shape[0]
        kernel = state["quant_conv.weight"].shape[-1]
        vocab = state["quantize.embedding.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not an official VAR VQVAE state dict: missing {e}") from e
    levels = _indices(state, "encoder.down.")
    multipliers = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
    num_res_blocks = len(_indices(state, "encoder.down.0.block."))
    attention = any(k.startswith(f"encoder.down.{levels[-1]}.attn.") for k in state)
    mid_attention = "encoder.mid.attn_1.qkv.weight" in state
    if _indices(state, "quantize.quant_resi.qresi_ls."):
        share, count = len(_indices(state, "quantize.quant_resi.qresi_ls.")), 0
    elif "quantize.quant_resi.qresi.weight" in state:
        share, count = 1, 0
    elif _indices(state, "quantize.quant_resi."):
        share, count = 0, len(_indices(state, "quantize.quant_resi."))
    else:
        share, count, quant_resi = 1, 0, 0.0  # identity phi: no weights
    num_scales = state["quantize.ema_vocab_hit_SV"].shape[0] if "quantize.ema_vocab_hit_SV" in state else None
    if scales is None:
        if num_scales is None:
            raise CheckpointError("the VQVAE state dict has no ema_vocab_hit_SV to count scales; pass the scales")
        scales = next((s for s in VAR_SCALES.values() if len(s) == num_scales), None)
        if scales is None:
            raise CheckpointError(f"no official schedule has {num_scales} scales; pass the scales")
    factor = 2 ** (len(multipliers) - 1)
    return MultiScaleVQConfig(
        in_channels=in_channels, base_channels=ch, channel_multipliers=tuple(multipliers), num_res_blocks=num_res_blocks,
        latent_channels=latent, vocab_size=vocab, scales=tuple(scales), resolution=resolution or scales[-1] * factor,
        attention=attention, mid_attention=mid_attention, quant_conv_kernel=kernel, quant_resi=quant_resi,
        share_quant_resi=share, phi_count=count if share == 0 else 0, beta=beta,
    )


def scales_from_state_dict(state: dict[str, torch.Tensor], scales: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The scale schedule of a VAR-family transformer: from the `lvl_1L` buffer when present, else the official
    schedule whose token count equals `pos_1LC`'s length; a given schedule is checked against both."""
    L = state["pos_1LC"].shape[1]
    num_levels = state["lvl_embed.weight"].shape[0]
    if scales is None and "lvl_1L" in state:
        levels = state["lvl_1L"].flatten().tolist()
        counts = [levels.count(i) for i in range(num_levels)]
        scales = tuple(round(c**0.5) for c in counts)
    if scales is None:
        scales = next((s for s in VAR_SCALES.values() if len(s) == num_levels and sum(x * x for x in s) == L), None)
        if scales is None:
            raise CheckpointError(f"cannot infer the scale schedule ({num_levels} scales, {L} tokens); pass the scales")
    scales = tuple(scales)
    if sum(s * s for s in scales) != L or len(scales) != num_levels:
        raise CheckpointError(f"scales {scales} give {sum(s * s for s in scales)} tokens in {len(scales)} scales, the "
                              f"checkpoint has {L} tokens in {num_levels}")
    return scales


def var_config_from_state_dict(state: dict[str, torch.Tensor], num_heads: int | None = None,
                               scales: tuple[int, ...] | None = None) -> VARConfig:
    missing = [k for k in ("word_embed.weight", "class_emb.weight", "head.weight", "pos_1LC", "lvl_embed.weight")
               if k not in state]
    if missing:
        raise CheckpointError(f"not an official VAR state dict: missing {missing}")
    width, latent = state["word_embed.weight"].shape
    num_classes = state["class_emb.weight"].shape[0] - 1
    vocab = state["head.weight"].shape[0]
    depth = len(_indices(state, "blocks."))
    l2_norm = "blocks.0.attn.scale_mul_1H11" in state
    if l2_norm:
        heads = state["blocks.0.attn.scale_mul_1H11"].shape[1]
        if num_heads is not None and num_heads != heads:
            raise CheckpointError(f"the checkpoint has {heads} heads (scale_mul_1H11), not {num_heads}")
    else:
        heads = num_heads or depth
    scales = scales_from_state_dict(state, scales)
    mlp_ratio = state["blocks.0.ffn.fc1.weight"].shape[0] / width
    return VARConfig(depth=depth, embed_dim=width, num_heads=heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
                     vocab_size=vocab, latent_channels=latent, scales=scales, shared_aln="shared_ada_lin.1.weight" in state,
                     attn_l2_norm=l2_norm)


def _clean(state: dict[str, torch.Tensor], name: str = "VAR") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if DROPPED_BUFFERS.search(key):
            if key.endswith("zero_k_bias") and value.abs().max() != 0:
                raise CheckpointError(f"{key} is not zero; this is not an official {name} checkpoint")
            continue
        out[key] = value.float() if value.is_floating_point() else value
    return out


def load_vqvae_for(vae_state: dict[str, torch.Tensor], vae_path: str | Path, network_config: VARConfig,
                   network_path: str | Path, resolution: int | None = None, quant_resi: float = 0.5) -> MultiScaleVQ:
    """VAR's VQVAE as the tokenizer of a next-scale transformer (VAR, HMAR) whose config was read off its weights:
    on the transformer's scale schedule, checked against its vocabulary and code width, weights loaded."""
    vae_config = vqvae_config_from_state_dict(vae_state, resolution, network_config.scales, quant_resi)
    if vae_config.vocab_size != network_config.vocab_size or vae_config.latent_channels != network_config.latent_channels:
        raise CheckpointError(f"{vae_path} (vocabulary {vae_config.vocab_size}, {vae_config.latent_channels} channels) does "
                              f"not match {network_path} (vocabulary {network_config.vocab_size}, "
                              f"{network_config.latent_channels})")
    tokenizer = MultiScaleVQ(vae_config)
    vae_state = dict(vae_state)
    hits = vae_state.get("quantize.ema_vocab_hit_SV")
    if hits is not None and hits.shape != tokenizer.quantize.ema_vocab_hit_SV.shape:
        vae_state["quantize.ema_vocab_hit_SV"] = tokenizer.quantize.ema_vocab_hit_SV  # as the official loader does
    load_state_dict_strict(tokenizer, _clean(vae_state), str(vae_path))
    return tokenizer.eval()


def load_official_var(vae_path: str | Path, var_path: str | Path, num_heads: int | None = None,
                      scales: tuple[int, ...] | None = None, resolution: int | None = None,
                      quant_resi: float = 0.5) -> tuple[MultiScaleVQ, VAR]:
    vae_state = _state_dict(load_torch_file(vae_path), "vae")
    var_state = _state_dict(load_torch_file(var_path), "var")
    var_config = var_config_from_state_dict(var_state, num_heads, scales)
    tokenizer = load_vqvae_for(vae_state, vae_path, var_config, var_path, resolution, quant_resi)
    network = VAR(var_config)
    load_state_dict_strict(network, _clean(var_state), str(var_path))
    return tokenizer, network.eval()


def convert_var_official(vae_path: str | Path, var_path: str | Path, out: str | Path, num_heads: int | None = None,
                         scales: tuple[int, ...] | None = None, resolution: int | None = None,
                         sampler: NextScaleSamplerConfig | None = None, class_names: list[str] | None = None) -> Path:
    from ..pipeline import Pipeline

    tokenizer, network = load_official_var(vae_path, var_path, num_heads, scales, resolution)
    info = {"source": "FoundationVision/VAR", "vae": str(vae_path), "var": str(var_path), "licence": "MIT",
            "resolution": tokenizer.config.resolution}
    if class_names:
        info["class_names"] = list(class_names)
    sampler = sampler or NextScaleSamplerConfig(cfg_scale=2.5, top_k=900, top_p=0.96)  # VAR's cfg=1.5 (w = s - 1)
    return Pipeline("var", network, NextScaleConfig(), sampler, info, tokenizer=tokenizer).save_pretrained(out)
