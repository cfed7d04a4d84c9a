"""Local copies of KL autoencoders -> effigen `KLVAE` (tokenizer folders, or the decoder of a converted DiT /
LightningDiT pipeline). Nothing is downloaded: give the path of files you have.

Accepted:
- a diffusers `AutoencoderKL` folder (`config.json` + `diffusion_pytorch_model.safetensors` or `.bin`), or a
  diffusers pipeline folder with such a `vae/` subfolder (e.g. `stabilityai/sd-vae-ft-mse`, `sd-vae-ft-ema`);
- a single LDM-layout file (`vae-ft-mse-840000-ema-pruned.safetensors`/`.ckpt`, a whole Stable Diffusion
  checkpoint whose `first_stage_model.*` keys are taken, or LightningDiT's VA-VAE `.pt` with its training `loss.*`
  keys dropped);
- a single diffusers-layout weights file (the keys say which layout it is).

effigen's KLVAE uses the LDM parameter names; the diffusers names are translated here (`diffusers_to_ldm`, and
`ldm_to_diffusers` for the way back), including the attention projections, which diffusers stores as linear
layers (C, C) and LDM as 1x1 convolutions (C, C, 1, 1). The architecture (width, multipliers, blocks, latent
channels, attention levels) is read off the tensors; the image resolution is not in the weights (default 256, it
only fixes which levels count as "attention resolutions"). The latent scaling comes from the diffusers config,
`--scaling-factor`, or per-channel statistics (`--latent-stats`, LightningDiT's `latents_stats.pt`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..io import CheckpointError, load_state_dict_strict, load_torch_file, read_json
from ..tokenizers.kl_vae import KLVAE, KLVAEConfig

_RESNET = {"conv_shortcut": "nin_shortcut"}
_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
              "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # new and old diffusers names


def _num_levels(keys, prefix: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def is_diffusers_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in state)


def diffusers_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> LDM names (effigen's KLVAE)."""
    levels = _num_levels(state, "decoder.up_blocks")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key)
        if m:
            new = f"{m.group(1)}.mid.attn_1.{_ATTENTION[m.group(2)]}.{m.group(3)}"
            if m.group(3) == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
            out[new] = value
            continue
        m = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m:
            side, kind, i, j, name, what = m.groups()
            level = int(i) if kind == "down_blocks" else levels - 1 - int(i)
            new = f"{side}.{'down' if kind == 'down_blocks' else 'up'}.{level}.attn.{j}.{_ATTENTION[name]}.{what}"
            out[new] = value[:, :, None, None] if what == "weight" and value.ndim == 2 else value
            continue
        new = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.",
                     lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.", new)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        new = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", new)
        out[new] = value
    return out


def ldm_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM names -> diffusers AutoencoderKL names (the inverse of `diffusers_to_ldm`, new attention names)."""
    levels = _num_levels(state, "decoder.up")
    inverse_attention = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)$", key)
        if m:
            out[f"{m.group(1)}.mid_block.attentions.0.{inverse_attention[m.group(2)]}.{m.group(3)}"] = (
                value[:, :, 0, 0] if value.ndim == 4 else value)
            continue
        m = re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.attn\.(\d+)\.(\w+)\.(weight|bias)$", key)
        if m:
            side, kind, i, j, name, what = m.groups()
            index = int(i) if kind == "down" else levels - 1 - int(i)
            out[f"{side}.{kind}_blocks.{index}.attentions.{j}.{inverse_attention[name]}.{what}"] = (
                value[:, :, 0, 0] if value.ndim == 4 else value)
            continue
        new = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.", key)
        new = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", new)
        new = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", new)
        new = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.resnets.", new)
        new = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.", new)
        new = new.replace(".nin_shortcut.", ".conv_shortcut.")
        new = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", new)
        out[new] = value
    return out


def kl_config_from_state_dict(state: dict[str, torch.Tensor], resolution: int = 256, **extra) -> KLVAEConfig:
    """The KLVAE architecture of an LDM-layout state dict."""
    try:
        base = state["encoder.conv_in.weight"].shape[0]
        z = state["quant_conv.weight"].shape[0] // 2
    except KeyError as e:
        raise CheckpointError(f"not a KL autoencoder state dict: missing {e}") from None
    levels = _num_levels(state, "encoder.down")
    multipliers = [state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // base for i in range(levels)]
    blocks = _num_levels(state, "encoder.down.0.block")
    attention = sorted({resolution >> i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state}, reverse=True)
    return KLVAEConfig(in_channels=state["encoder.conv_in.weight"].shape[1], out_channels=state["decoder.conv_out.weight"].shape[0],
                       base_channels=base, channel_multipliers=tuple(multipliers), num_res_blocks=blocks,
                       latent_channels=z, attention_resolutions=tuple(attention), resolution=resolution, **extra)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from ..io import load_weights

        return load_weights(path)
    state = load_torch_file(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_kl_vae(path: str | Path, resolution: int | None = None, scaling_factor: float | None = None,
                latent_stats: str | Path | None = None) -> KLVAE:
    """A KLVAE from a diffusers folder or a single weights file (see the module docstring)."""
    path = Path(path)
    config_extra: dict = {}
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{path} is not a diffusers AutoencoderKL folder (no config.json there or in vae/)")
        files = [folder / name for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
        weights = next((f for f in files if f.is_file()), None)
        if weights is None:
            raise CheckpointError(f"{folder} has no diffusion_pytorch_model.safetensors or .bin")
        diffusers_config = read_json(folder / "config.json")
        resolution = resolution or diffusers_config.get("sample_size") or 256
        config_extra["scaling_factor"] = diffusers_config.get("scaling_factor", 0.18215)
        config_extra["shift_factor"] = diffusers_config.get("shift_factor") or 0.0
        state = _read_weights(weights)
    elif path.is_file():
        state = _read_weights(path)
    else:
        raise CheckpointError(f"{path} does not exist; give a diffusers AutoencoderKL folder or a weights file")
    if any(k.startswith("first_stage_model.") for k in state):  # a whole Stable Diffusion checkpoint
        state = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    state = {k: v for k, v in state.items() if not k.startswith(("loss.", "model_ema.", "foundation_model"))}
    if is_diffusers_layout(state):
        state = diffusers_to_ldm(state)
    if scaling_factor is not None:
        config_extra["scaling_factor"] = scaling_factor
    if latent_stats is not None:
        stats = load_torch_file(latent_stats)
        try:
            config_extra["channel_mean"] = tuple(float(x) for x in stats["mean"].flatten())
            config_extra["channel_std"] = tuple(float(x) for x in stats["std"].flatten())
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{latent_stats}: expected a dict with 'mean' and 'std' tensors (LightningDiT's "
                                  "latents_stats.pt)") from None
        config_extra.setdefault("scaling_factor", 1.0)
    config = kl_config_from_state_dict(state, resolution or 256, **config_extra)
    vae = KLVAE(config)
    load_state_dict_strict(vae, {k: v.float() for k, v in state.items()}, str(path))
    return vae.eval()


def convert_kl_vae(path: str | Path, out: str | Path, resolution: int | None = None, scaling_factor: float | None = None,
                   latent_stats: str | Path | None = None) -> Path:
    """Write a `klvae` tokenizer folder (usable as an experiment's `tokenizer` and by `effigen cache-latents`)."""
    from ..objectives.autoencoder import NoSamplerConfig
    from ..objectives.kl_vae import KLVAELossConfig
    from ..pipeline import Pipeline

    vae = load_kl_vae(path, resolution, scaling_factor, latent_stats)
    info = {"source": str(path), "resolution": vae.config.resolution}
    return Pipeline("klvae", None, KLVAELossConfig(), NoSamplerConfig(), info, tokenizer=vae).save_pretrained(out)
