"""Official HMAR checkpoints (NVlabs/HMAR) -> an effigen `hmar` pipeline folder.

    effigen convert hmar-official --vae vae_ch160v4096z32.pth --hmar hmar-d16.pth --out hmar-d16

The VQVAE is VAR's (read by `effigen.convert.var_official.vqvae_config_from_state_dict`); the HMAR file is the
released plain state dict of the official `HMAR` module (`torch.load(weights_only=True)`), whose parameter names
effigen keeps, so conversion is a validated copy. Read off the keys and shapes: depth (base + ns blocks) and
`n_layers_train` (ns blocks; the mask blocks must match), width, MLP ratio, classes, vocabulary, l2-normalised
attention and the head count (`scale_mul_1H11`), shared adaLN, and the scale schedule (`lvl_1L` or the official
schedule with `pos_1LC`'s token count). The constant buffers `lvl_1L`, `attn_bias_for_masking` (checked to be the
block-diagonal pattern) and `zero_k_bias` (checked to be zero) are dropped: effigen computes them.

The folder records the official sampling settings: per depth those of config/sample/hmar-dXX.yaml (d16: cfg 1.7,
top-k 1000, top-p 0.99; d20: 1.9, 950; d24: 2.1, 900; d30: 1.7, 1000), otherwise the argument defaults (cfg 1.5,
top-k 900, top-p 0.96); effigen's cfg_scale is 1 + cfg. The mask schedule is the official default pattern
(`default_mask_schedule`).

Licence: HMAR's code and weights are under the NVIDIA One-Way Noncommercial License (NSCLv1): non-commercial use
only. The converted folder says so in its info.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import CheckpointError, load_state_dict_strict, load_torch_file
from ..models.hmar import HMAR, HMARConfig
from ..objectives.hmar import HMARObjectiveConfig
from ..samplers.hmar import HMARSamplerConfig
from ..tokenizers.msvq import MultiScaleVQ
from .var_official import _clean, _indices, _state_dict, load_vqvae_for, scales_from_state_dict

LICENCE = "NVIDIA One-Way Noncommercial License (NSCLv1): non-commercial use only"
# config/sample/hmar-dXX.yaml: HMAR's cfg (effigen cfg_scale = 1 + cfg), top-k, top-p
OFFICIAL_SAMPLING = {16: (1.7, 1000, 0.99), 20: (1.9, 950, 0.99), 24: (2.1, 900, 0.99), 30: (1.7, 1000, 0.99)}
DEFAULT_SAMPLING = (1.5, 900, 0.96)  # utils/sampling_arg_util.py


def hmar_config_from_state_dict(state: dict[str, torch.Tensor], num_heads: int | None = None,
                                scales: tuple[int, ...] | None = None) -> HMARConfig:
    required = ("word_embed.weight", "word_embed_bias", "class_emb.weight", "ns_head.weight", "mask_head.weight",
                "mask_embed.weight", "pos_1LC", "lvl_embed.weight")
    missing = [k for k in required if k not in state]
    if missing:
        hint = " (this looks like a VAR checkpoint: use var-official)" if "head.weight" in state else ""
        raise CheckpointError(f"not an official HMAR state dict: missing {missing}{hint}")
    width, latent = state["word_embed.weight"].shape
    num_classes = state["class_emb.weight"].shape[0] - 1
    vocab = state["ns_head.weight"].shape[0]
    base, ns, mask = (len(_indices(state, f"{prefix}_blocks.")) for prefix in ("base", "ns", "mask"))
    if ns == 0 or ns != mask:
        raise CheckpointError(f"the HMAR state dict has {ns} ns_blocks and {mask} mask_blocks; both branches must have "
                              "the same number (n_layers_train) of at least one block")
    first = "base_blocks.0" if base else "ns_blocks.0"
    l2_norm = f"{first}.attn.scale_mul_1H11" in state
    if l2_norm:
        heads = state[f"{first}.attn.scale_mul_1H11"].shape[1]
        if num_heads is not None and num_heads != heads:
            raise CheckpointError(f"the checkpoint has {heads} heads (scale_mul_1H11), not {num_heads}")
    else:
        heads = num_heads or base + ns
    scales = scales_from_state_dict(state, scales)
    mlp_ratio = state[f"{first}.ffn.fc1.weight"].shape[0] / width
    return HMARConfig(depth=base + ns, n_layers_train=ns, embed_dim=width, num_heads=heads, mlp_ratio=mlp_ratio,
                      num_classes=num_classes, vocab_size=vocab, latent_channels=latent, scales=scales,
                      shared_aln="shared_ada_lin.1.weight" in state, attn_l2_norm=l2_norm)


def _check_block_diagonal(state: dict[str, torch.Tensor], scales: tuple[int, ...]) -> None:
    bias = state.get("attn_bias_for_masking")
    if bias is None:
        return
    levels = torch.cat([torch.full((s * s,), i) for i, s in enumerate(scales)])
    allowed = (levels[:, None] == levels[None, :]).expand_as(bias)
    if not (torch.equal(bias == 0, allowed) and torch.isinf(bias[~allowed]).all()):
        raise CheckpointError("attn_bias_for_masking is not HMAR's block-diagonal pattern (0 within a scale, -inf "
                              "elsewhere); this is not an official HMAR checkpoint")


def load_official_hmar(vae_path: str | Path, hmar_path: str | Path, num_heads: int | None = None,
                       scales: tuple[int, ...] | None = None, resolution: int | None = None,
                       quant_resi: float = 0.5) -> tuple[MultiScaleVQ, HMAR]:
    vae_state = _state_dict(load_torch_file(vae_path), "vae")
    hmar_state = load_torch_file(hmar_path)
    if not isinstance(hmar_state, dict) or not all(torch.is_tensor(v) for v in hmar_state.values()):
        raise CheckpointError(f"{hmar_path}: expected the official HMAR state dict (name -> tensor), as released "
                              "(hmar-d16.pth ...)")
    config = hmar_config_from_state_dict(hmar_state, num_heads, scales)
    _check_block_diagonal(hmar_state, config.scales)
    tokenizer = load_vqvae_for(vae_state, vae_path, config, hmar_path, resolution, quant_resi)
    network = HMAR(config)
    load_state_dict_strict(network, _clean(hmar_state, "HMAR"), str(hmar_path))
    return tokenizer, network.eval()


def official_sampler(depth: int) -> HMARSamplerConfig:
    cfg, top_k, top_p = OFFICIAL_SAMPLING.get(depth, DEFAULT_SAMPLING)
    return HMARSamplerConfig(cfg_scale=1 + cfg, top_k=top_k, top_p=top_p, mask_schedule=None)


def convert_hmar_official(vae_path: str | Path, hmar_path: str | Path, out: str | Path, num_heads: int | None = None,
                          scales: tuple[int, ...] | None = None, resolution: int | None = None,
                          sampler: HMARSamplerConfig | None = None, class_names: list[str] | None = None) -> Path:
    from ..pipeline import Pipeline

    tokenizer, network = load_official_hmar(vae_path, hmar_path, num_heads, scales, resolution)
    info = {"source": "NVlabs/HMAR", "vae": str(vae_path), "hmar": str(hmar_path), "licence": LICENCE,
            "resolution": tokenizer.config.resolution}
    if class_names:
        info["class_names"] = list(class_names)
    sampler = sampler or official_sampler(network.config.depth)
    objective = HMARObjectiveConfig(stage="mask")  # the released weights hold both trained branches
    return Pipeline("hmar", network, objective, sampler, info, tokenizer=tokenizer).save_pretrained(out)

