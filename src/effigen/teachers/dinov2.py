"""DINOv2 teachers (Oquab et al., arXiv 2304.07193; with registers: Darcet et al., arXiv 2309.16588) from local
weights in either published layout; nothing is ever downloaded.

Sizes (facebookresearch/dinov2 `hub/backbones.py`, `models/vision_transformer.py`; patch 14, 518 px table = 37 x 37
positions, layer scale init 1.0, MLP ratio 4):

    dinov2-vits14   384 wide, 12 blocks,  6 heads        dinov2-vitl14  1024 wide, 24 blocks, 16 heads
    dinov2-vitb14   768 wide, 12 blocks, 12 heads        dinov2-vitg14  1536 wide, 40 blocks, 24 heads, SwiGLU (fused
                                                                        w12, hidden (int(2/3 * 4D) + 7) // 8 * 8 = 4096)

`-reg` adds 4 register tokens and the *_reg hub models' position interpolation (antialiased bicubic to an explicit
size); the models without registers use the older one (plain bicubic by scale factor (side + 0.1) / 37).

Layouts:
- official: a plain state dict as `dinov2_vit*14[_reg4]_pretrain.pth` (`torch.load(weights_only=True)`), the names
  of `teachers/vit.py`. A training checkpoint (`{"teacher": {"backbone.*": ...}}`, `module.` prefixes, chunked
  `blocks.<chunk>.<i>.`) is unwrapped too. The number of heads is not in the weights: it comes from the named size.
- transformers: a `save_pretrained` folder of `Dinov2Model` / `Dinov2WithRegistersModel` (config.json +
  model.safetensors, or shards with model.safetensors.index.json, or pytorch_model.bin). Hub names map as
  embeddings.{cls_token, mask_token, position_embeddings -> pos_embed, register_tokens, patch_embeddings.projection ->
  patch_embed.proj}, encoder.layer.<i>.{attention.attention.query/key/value -> attn.qkv (stacked q, k, v),
  attention.output.dense -> attn.proj, layer_scale1/2.lambda1 -> ls1/2.gamma, mlp.fc1/fc2, mlp.weights_in/weights_out
  (or gate_proj + up_proj / down_proj) -> mlp.w12 / w3}, layernorm -> norm. Every hyperparameter comes from
  config.json. Interpolation follows transformers: `Dinov2WithRegistersModel` as the official *_reg models, and
  `Dinov2Model` bicubic to an explicit size without antialiasing (transformers >= 4.45; the official non-register
  models and older transformers use the 0.1 offset, so at other resolutions the two layouts of the same non-register
  weights differ slightly, as they do outside effigen).

`dinov2_teacher("dinov2-vitb14-reg", path)` checks that the weights are that size and wraps them in a `ViTTeacher`
(ImageNet normalisation, bicubic resize to grid * 14 px: REPA's 256 px -> 224 px -> 16 x 16 tokens).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from ..io import CheckpointError, load_state_dict_strict, load_torch_file, load_weights
from .base import TeacherError
from .vit import ViTConfig, ViTTeacher, VisionTransformer, swiglu_hidden_dim

HUB_URL = "https://dl.fbaipublicfiles.com/dinov2"
# official entry point -> (width, blocks, heads, ffn, transformers size name)
DINOV2_SIZES: dict[str, tuple[int, int, int, str, str]] = {
    "vits14": (384, 12, 6, "mlp", "small"),
    "vitb14": (768, 12, 12, "mlp", "base"),
    "vitl14": (1024, 24, 16, "mlp", "large"),
    "vitg14": (1536, 40, 24, "swiglu", "giant"),
}
NUM_REGISTERS = 4  # the *_reg4 hub models


def dinov2_config(size: str, registers: bool) -> ViTConfig:
    """The hub model `dinov2_<size>[_reg]` (`_make_dinov2_model`: img_size 518, patch 14, init_values 1.0)."""
    width, depth, heads, ffn, _ = DINOV2_SIZES[size]
    return ViTConfig(
        image_size=518, patch_size=14, embed_dim=width, depth=depth, num_heads=heads, ffn=ffn,
        ffn_hidden_dim=swiglu_hidden_dim(width) if ffn == "swiglu" else 4 * width,
        layer_scale=True, layer_scale_init=1.0, num_register_tokens=NUM_REGISTERS if registers else 0,
        interpolate_antialias=registers, interpolate_offset=0.0 if registers else 0.1,
    )


DINOV2_PRESETS: dict[str, ViTConfig] = {
    f"dinov2-{size}{'-reg' if registers else ''}": dinov2_config(size, registers)
    for size in DINOV2_SIZES for registers in (False, True)
}


def _split_name(name: str) -> tuple[str, bool]:
    match = re.fullmatch(r"dinov2-(vit[sblg]14)(-reg)?", name)
    if not match:
        raise TeacherError(f"unknown DINOv2 teacher {name!r}; choose one of {', '.join(DINOV2_PRESETS)}")
    return match.group(1), bool(match.group(2))


def official_url(name: str) -> str:
    """The released official checkpoint of `name`, e.g. .../dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth."""
    size, registers = _split_name(name)
    return f"{HUB_URL}/dinov2_{size}/dinov2_{size}{f'_reg{NUM_REGISTERS}' if registers else ''}_pretrain.pth"


def hf_repository(name: str) -> str:
    """The transformers repository of `name` on the Hugging Face hub, e.g. facebook/dinov2-with-registers-base."""
    size, registers = _split_name(name)
    return f"facebook/dinov2-{'with-registers-' if registers else ''}{DINOV2_SIZES[size][4]}"


def missing_weights_message(name: str, path: str | Path | None) -> str:
    where = f"there is no file or folder at {path}" if path else "no weights path was given"
    return (f"the {name} teacher needs local weights and effigen never downloads them: {where}. Download the official "
            f"checkpoint {official_url(name)} (a .pth state dict) or the transformers folder of {hf_repository(name)} "
            f"(config.json + model.safetensors) from the Hugging Face hub, then pass it as "
            f"--align.teacher={name}=/path/to/{Path(official_url(name)).name} (or the folder); in Python "
            f"load_teacher(\"{name}=/path/to/it\")")


# --------------------------------------------------------------------------- the official layout

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def official_state_dict(state: dict) -> dict[str, torch.Tensor]:
    """An official-layout state dict, unwrapped: a training checkpoint's `teacher` / `model` / `state_dict` entry,
    `module.` and `backbone.` prefixes (other heads dropped), chunked blocks `blocks.<chunk>.<i>.` -> `blocks.<i>.`."""
    for key in ("teacher", "model", "state_dict"):
        if isinstance(state.get(key), dict) and not isinstance(state.get(key), torch.Tensor):
            state = state[key]
            break
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in state.items()}


def config_from_official(state: dict[str, torch.Tensor], num_heads: int, *, layer_norm_eps: float = 1e-6,
                         activation: str = "gelu", interpolate_antialias: bool | None = None,
                         interpolate_offset: float | None = None) -> ViTConfig:
    """Every shape from an official-layout state dict; `num_heads` (not in the weights) from the named size. The
    interpolation defaults to the hub's: with registers antialiased by size, without by the 0.1 offset."""
    try:
        width = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"]
        table = state["pos_embed"].shape[1] - 1
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
        swiglu = "blocks.0.mlp.w12.weight" in state
        hidden = state["blocks.0.mlp.w12.weight"].shape[0] // 2 if swiglu else state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as error:
        raise TeacherError(f"not a DINOv2 state dict in the official layout (missing {error}); expected cls_token, "
                           "pos_embed, patch_embed.proj.weight and blocks.<i>.*") from None
    side = int(round(table ** 0.5))
    if side * side != table:
        raise TeacherError(f"pos_embed holds {table} patch positions, not a square table")
    return ViTConfig(
        image_size=side * patch.shape[-1], patch_size=patch.shape[-1], in_channels=patch.shape[1], embed_dim=width,
        depth=depth, num_heads=num_heads, ffn="swiglu" if swiglu else "mlp", ffn_hidden_dim=hidden,
        activation=activation, qkv_bias="blocks.0.attn.qkv.bias" in state, layer_scale="blocks.0.ls1.gamma" in state,
        num_register_tokens=registers, layer_norm_eps=layer_norm_eps,
        interpolate_antialias=bool(registers) if interpolate_antialias is None else interpolate_antialias,
        interpolate_offset=(0.0 if registers else 0.1) if interpolate_offset is None else interpolate_offset,
    )


# --------------------------------------------------------------------------- the transformers layout

_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_BLOCK = {  # inside encoder.layer.<i>. -> inside blocks.<i>. (q/k/v and gate/up are stacked separately)
    "norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3", "mlp.down_proj": "mlp.w3",
}
_HF_SCALE = {"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
_HF_STACKED = {"attention.attention.query": ("attn.qkv", 0), "attention.attention.key": ("attn.qkv", 1),
               "attention.attention.value": ("attn.qkv", 2), "mlp.gate_proj": ("mlp.w12", 0),
               "mlp.up_proj": ("mlp.w12", 1)}
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def is_hf_layout(state: dict) -> bool:
    return any(k.startswith(("embeddings.", "encoder.layer.", "dinov2.", "dinov2_with_registers.")) for k in state)


def hf_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers hub names -> official names (module docstring); a classification model's `dinov2.` /
    `dinov2_with_registers.` prefix is stripped and its head dropped. Unknown names are an error."""
    for prefix in ("dinov2.", "dinov2_with_registers."):
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        match = _HF_LAYER.match(key)
        if not match:
            unknown.append(key)
            continue
        index, name, kind = match.groups()
        if kind == "lambda1" and f"{name}.lambda1" in _HF_SCALE:
            out[f"blocks.{index}.{_HF_SCALE[name + '.lambda1']}"] = value
        elif name in _HF_BLOCK:
            out[f"blocks.{index}.{_HF_BLOCK[name]}.{kind}"] = value
        elif name in _HF_STACKED:
            target, part = _HF_STACKED[name]
            stacked.setdefault(f"blocks.{index}.{target}.{kind}", {})[part] = value
        else:
            unknown.append(key)
    if unknown:
        raise TeacherError(f"not a transformers DINOv2 state dict: unknown keys {', '.join(sorted(unknown)[:6])}")
    for key, parts in stacked.items():
        expected = 3 if ".attn.qkv." in key else 2
        if sorted(parts) != list(range(expected)):
            raise TeacherError(f"the transformers weights for {key} are incomplete (have parts {sorted(parts)})")
        out[key] = torch.cat([parts[i] for i in range(expected)], dim=0)
    return out


def official_to_hf(state: dict[str, torch.Tensor], swiglu_names: str = "weights_in") -> dict[str, torch.Tensor]:
    """Official names -> transformers hub names (the inverse of `hf_to_official`); SwiGLU weights as the hub files
    write them (`weights_in` / `weights_out`) or as transformers 5 modules name them (`swiglu_names="gate_up"`)."""
    top = {v: k for k, v in _HF_TOP.items()}
    block = {v: k for k, v in _HF_BLOCK.items() if k != "mlp.down_proj"}
    if swiglu_names == "gate_up":
        block["mlp.w3"] = "mlp.down_proj"
    scale = {v: k for k, v in _HF_SCALE.items()}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)", key)
        if not match:
            raise TeacherError(f"not an official DINOv2 key: {key}")
        index, name, kind = match.groups()
        prefix = f"encoder.layer.{index}."
        if kind == "gamma":
            out[prefix + scale[f"{name}.gamma"]] = value
        elif name == "attn.qkv":
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{prefix}attention.attention.{part}.{kind}"] = chunk.clone()
        elif name == "mlp.w12" and swiglu_names == "gate_up":
            for part, chunk in zip(("gate_proj", "up_proj"), value.chunk(2, dim=0)):
                out[f"{prefix}mlp.{part}.{kind}"] = chunk.clone()
        else:
            out[f"{prefix}{block[name]}.{kind}"] = value
    return out


_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def config_from_hf(hf: dict) -> ViTConfig:
    """A transformers `Dinov2Config` / `Dinov2WithRegistersConfig` (config.json) as a `ViTConfig`."""
    kind = hf.get("model_type")
    if kind not in ("dinov2", "dinov2_with_registers"):
        raise TeacherError(f"config.json has model_type {kind!r}; a DINOv2 teacher folder has 'dinov2' or "
                           "'dinov2_with_registers'")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
               if k not in hf]
    if missing:
        raise TeacherError(f"config.json lacks {', '.join(missing)}")
    if hf.get("hidden_act", "gelu") not in _HF_ACTIVATIONS:
        raise TeacherError(f"config.json's hidden_act {hf['hidden_act']!r} is not supported; effigen's DINOv2 has "
                           f"{', '.join(_HF_ACTIVATIONS)}")
    sizes = {k: hf[k] if isinstance(hf[k], int) else tuple(hf[k]) for k in ("image_size", "patch_size")}
    if any(not isinstance(v, int) and len(set(v)) != 1 for v in sizes.values()):
        raise TeacherError(f"config.json has non-square image_size / patch_size {sizes}; effigen's DINOv2 is square")
    image, patch = (v if isinstance(v, int) else v[0] for v in sizes.values())
    width, ratio = hf["hidden_size"], hf.get("mlp_ratio", 4)
    swiglu = bool(hf.get("use_swiglu_ffn", False))
    registers = kind == "dinov2_with_registers"
    return ViTConfig(
        image_size=image // patch * patch, patch_size=patch, in_channels=hf.get("num_channels", 3), embed_dim=width,
        depth=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"], ffn="swiglu" if swiglu else "mlp",
        ffn_hidden_dim=swiglu_hidden_dim(width, ratio) if swiglu else int(width * ratio),
        activation=_HF_ACTIVATIONS[hf.get("hidden_act", "gelu")], qkv_bias=hf.get("qkv_bias", True),
        layer_scale=True, layer_scale_init=hf.get("layerscale_value", 1.0),
        num_register_tokens=hf.get("num_register_tokens", 4) if registers else 0,
        layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
        interpolate_antialias=registers, interpolate_offset=0.0,
    )


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        return load_weights(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_weights(folder / shard).items()}
    if (folder / "pytorch_model.bin").is_file():
        return load_torch_file(folder / "pytorch_model.bin")
    raise TeacherError(f"{folder} has a config.json but no model.safetensors (or shards, or pytorch_model.bin)")


# --------------------------------------------------------------------------- loading

def read_dinov2(path: str | Path) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(transformers config dict or None, official-layout state dict) from a transformers folder (or a file in one)
    or a state dict file (.pth / .pt / .bin / .safetensors, either naming)."""
    path = Path(path)
    if path.is_file() and (path.parent / "config.json").is_file() and path.suffix in (".json", ".safetensors", ".bin"):
        path = path.parent  # a file inside a transformers folder: read the folder
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise TeacherError(f"{path} is a folder without config.json; a DINOv2 teacher folder is a "
                                   "transformers save_pretrained folder (config.json + model.safetensors)")
            return json.loads((path / "config.json").read_text()), hf_to_official(_read_hf_weights(path))
        if not path.is_file():
            raise TeacherError(f"no DINOv2 weights at {path}")
        raw = load_weights(path) if path.suffix == ".safetensors" else load_torch_file(path)
    except (CheckpointError, ValueError, KeyError) as error:  # TeacherError is a ValueError: kept as it is
        raise error if isinstance(error, TeacherError) else TeacherError(f"{path}: {error}") from None
    if not isinstance(raw, dict):
        raise TeacherError(f"{path} holds a {type(raw).__name__}, not a state dict")
    return None, hf_to_official(raw) if is_hf_layout(raw) else official_state_dict(raw)


def _build(config: ViTConfig, state: dict[str, torch.Tensor], source: str) -> VisionTransformer:
    model = VisionTransformer(config)
    state = dict(state)
    state.setdefault("mask_token", torch.zeros(1, config.embed_dim))  # transformers 5 may omit the unused token
    try:
        load_state_dict_strict(model, {k: v.float() for k, v in state.items()}, source)
    except CheckpointError as error:
        raise TeacherError(str(error)) from None
    return model.eval().requires_grad_(False)


def load_dinov2(path: str | Path, num_heads: int | None = None, **interpolation) -> VisionTransformer:
    """A DINOv2 `VisionTransformer` from `path` (see `read_dinov2`): a transformers folder has every setting in its
    config.json; a bare state dict does not record the head count, `num_heads`, and takes the hub's interpolation
    for its register count unless `interpolation` (`interpolate_antialias`, `interpolate_offset`) says otherwise."""
    hf_config, state = read_dinov2(path)
    if hf_config is not None:
        return _build(config_from_hf(hf_config), state, str(path))
    if num_heads is None:
        raise TeacherError(f"{path} is a bare state dict, which does not record the number of attention heads; load "
                           "it under its size name (dinov2-vits14, -vitb14, -vitl14 or -vitg14, + -reg) or pass "
                           "num_heads")
    return _build(config_from_official(state, num_heads, **interpolation), state, str(path))


def _signature(config: ViTConfig, heads: bool = True) -> tuple:
    """What a state dict fixes about the architecture (and the head count, where a config.json says it)."""
    shape = (config.embed_dim, config.depth, config.patch_size, config.ffn, config.ffn_hidden_dim,
             config.num_register_tokens)
    return shape + ((config.num_heads,) if heads else ())


def describe(config: ViTConfig, heads: bool = True) -> str:
    """The DINOv2 name of an architecture, or its shape (`heads=False`: the head count is unknown)."""
    for name, preset in DINOV2_PRESETS.items():
        if _signature(preset, heads) == _signature(config, heads):
            return name
    return (f"a ViT of width {config.embed_dim}, {config.depth} blocks"
            + (f", {config.num_heads} heads" if heads else "")
            + f", patch {config.patch_size}, {config.ffn} FFN of {config.ffn_hidden_dim}, "
            f"{config.num_register_tokens} registers")


def dinov2_teacher(name: str, path: str | Path | None, resize_antialias: bool = True) -> ViTTeacher:
    """The teacher `name` (a `DINOV2_PRESETS` key) from the weights at `path`, checked to be that architecture; a
    bare state dict takes the named size's head count."""
    _split_name(name)
    if not path or not Path(path).exists():
        raise TeacherError(missing_weights_message(name, path))
    expected = DINOV2_PRESETS[name]
    hf_config, state = read_dinov2(path)
    heads_known = hf_config is not None
    config = config_from_hf(hf_config) if heads_known else config_from_official(state, num_heads=1)
    if _signature(config, heads_known) != _signature(expected, heads_known):
        own = describe(config, heads_known)
        fix = f"pass it as --align.teacher={own}={path}" if own in DINOV2_PRESETS else "it is no released DINOv2 size"
        raise TeacherError(f"{path} holds {own}, not {name}: {fix}")
    if not heads_known:
        config = replace(config, num_heads=expected.num_heads)
    return ViTTeacher(_build(config, state, str(path)), name, resize_antialias=resize_antialias)
