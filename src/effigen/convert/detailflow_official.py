"""Official DetailFlow checkpoints (ByteFlow-AI/DetailFlow) -> an effigen `detailflow` pipeline folder.

    effigen convert detailflow-official --tokenizer-ckpt DetailFlow-16/checkpoints/128.pt \
        --gpt-ckpt DetailFlow-16-GPT-L/checkpoints/128.pt --out detailflow-128

The released layout is `<run>/checkpoints/<tokens>.pt` with the run's `config.json` and `config.yaml` two levels up;
like the official loaders (`inference/load_vq.py`, `autoregressive/sample/load_ar_model.py`), this reads them there.
Files load with `torch.load(weights_only=True)`; the tokenizer's weights are `checkpoint['model']` (the eval scripts'
VQ_EMA=False), the GPT's `checkpoint['ema']` (GPT_EMA=True).

- Tokenizer: image size, tokens, group size, causal prefix, codebook and patch sizes from config.json; the resolution
  map's power and the degradation probability from config.yaml; widths, depths, MLP sizes and position tables from
  the weights; the head counts are SigLIP2's: the pretrained config (`--siglip-config`, default
  `$CACHE_DATA_PATH/siglip2-so400m-patch16-naflex/config.json` as the official code reads it, else so400m's 16
  heads) for a pretrained-built encoder/decoder, 12 for the `siglip2_base` decoder built from scratch. q/k/v are
  fused into one projection; `repa_model.*` and `global_token_proj.*` (training-only) and the `codebook_used` buffer
  are dropped.
- GPT: width / depth / heads of the LlamaGen preset named by config.yaml's `gpt_model` (the official loader pops
  them from config.json), else config.json's; the rest from config.json. Parameter names are the official ones.
- The folder samples with the official FID settings: top-k and top-p off, temperature 1, constant CFG 1.45 / 1.5 /
  1.32 for 128 / 256 / 512 tokens (1.45 otherwise). Licence of the code and weights: Apache-2.0.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..io import CheckpointError, load_state_dict_strict, load_torch_file
from ..models.detailflow import DetailFlowGPT, DetailFlowGPTConfig
from ..objectives.detailflow import DetailFlowARConfig
from ..samplers.detailflow import NextDetailSamplerConfig
from ..tokenizers.detailflow import DetailFlowConfig, DetailFlowTokenizer

# LlamaGen / DetailFlow GPT_models: name -> (n_layer, n_head, dim)
OFFICIAL_GPT_SIZES = {"GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280),
                      "GPT-XLPlus": (42, 22, 1408), "GPT-XXL": (48, 24, 1536), "GPT-XXLPlus": (48, 30, 1920),
                      "GPT-XXXL": (48, 40, 2560), "GPT-1B": (22, 32, 2048), "GPT-3B": (24, 32, 3200),
                      "GPT-7B": (32, 32, 4096)}
OFFICIAL_CFG = {128: 1.45, 256: 1.5, 512: 1.32}  # scripts/eval_c2i.sh
SO400M_HEADS = 16
DROPPED = re.compile(r"^(repa_model\.|global_token_proj\.|quantize\.codebook_used$)")


def read_run_configs(checkpoint: str | Path) -> tuple[dict, dict]:
    """config.json and config.yaml two levels above `<run>/checkpoints/<n>.pt`."""
    import yaml

    run = Path(checkpoint).parent.parent
    paths = run / "config.json", run / "config.yaml"
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the official loaders read config.json and config.yaml two "
                                  f"levels above the checkpoint ({checkpoint})")
    return json.loads(paths[0].read_text()), yaml.safe_load(paths[1].read_text()) or {}


def _weights(checkpoint: str | Path, key: str) -> dict[str, torch.Tensor]:
    data = load_torch_file(checkpoint)
    if not isinstance(data, dict) or key not in data:
        raise CheckpointError(f"{checkpoint}: expected an official checkpoint dict with '{key}', got "
                              f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    return {k: v.float() if v.is_floating_point() else v for k, v in data[key].items()}


def _layers(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def _heads(model: str, pretrained: bool, width: int, siglip: dict | None) -> int:
    if model == "siglip2_base" and not pretrained:
        return 12  # model_builder: embed_dim 768, num_heads 12
    if siglip is not None:
        if siglip.get("hidden_size", width) != width:
            raise CheckpointError(f"the SigLIP2 config has hidden_size {siglip['hidden_size']}, the checkpoint {width}")
        return int(siglip["num_attention_heads"])
    return SO400M_HEADS


def tokenizer_config(state: dict, config: dict, yaml_config: dict, siglip: dict | None) -> DetailFlowConfig:
    if config.get("enc_type", "siglip2") != "siglip2" or config.get("dec_type", "siglip2") != "siglip2":
        raise CheckpointError("only the SigLIP2 encoder/decoder tokenizers of DetailFlow are supported")
    if config.get("causal_decoder"):
        raise CheckpointError("causal_decoder=True is not supported (the released tokenizers use a full decoder)")
    if not config.get("causal_encoder", True):
        raise CheckpointError("causal_encoder=False is not supported (DetailFlow's tokens are causal)")
    side = {}
    for part, model_key, pretrained_key in (("encoder", "encoder_model", "enc_pretrained"),
                                            ("decoder", "decoder_model", "dec_pretrained")):
        prefix = f"{part}.visual_model."
        width = state[f"{part}.latent_pos_embed"].shape[-1]
        positions = state[prefix + "embeddings.position_embedding.weight"].shape[0]
        side.update({f"{part}_width": width, f"{part}_depth": _layers(state, prefix + "encoder.layers."),
                     f"{part}_mlp": state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0],
                     f"{part}_positions": int(round(positions**0.5)),
                     f"{part}_heads": _heads(config.get(model_key, "siglip2"), bool(config.get(pretrained_key, True)),
                                             width, siglip)})
    vocab, code_dim = state["quantize.embedding.weight"].shape
    return DetailFlowConfig(
        in_channels=state["decoder.to_pixel.model.weight"].shape[0] // config["dec_patch_size"] ** 2,
        resolution=int(config.get("max_image_size", config["image_size"])), num_tokens=int(config["num_latent_tokens"]),
        group_size=int(config["group_size"]), causal_num=config.get("causal_num"), vocab_size=vocab, code_dim=code_dim,
        codebook_l2_norm=bool(config.get("codebook_l2_norm", True)), beta=float(config.get("commit_loss_beta", 0.25)),
        encoder_patch=int(config["enc_patch_size"]), decoder_patch=int(config["dec_patch_size"]),
        degradation_power=float(yaml_config.get("degradation_power", 1.5)),
        degradation_prob=float(yaml_config.get("degradation_prob", 0.2)),
        correction_training=bool(config.get("correction_training", True)), **side)


def tokenizer_state(state: dict[str, torch.Tensor], model: DetailFlowTokenizer) -> dict[str, torch.Tensor]:
    """Official names -> effigen's (q/k/v fused; training-only parts dropped)."""
    out = {}
    for key, value in state.items():
        if DROPPED.match(key):
            continue
        new = (key.replace("visual_model.embeddings.patch_embedding", "patch_embed")
               .replace("visual_model.embeddings.position_embedding.weight", "pos_embed")
               .replace("visual_model.encoder.layers.", "blocks.").replace("visual_model.post_layernorm", "norm")
               .replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
               .replace(".self_attn.out_proj.", ".attn.proj.").replace("to_pixel.model.", "to_pixel."))
        out[new] = value
    for key in [k for k in out if ".self_attn.q_proj." in k]:
        stem, kind = key.split(".self_attn.q_proj.")
        parts = [out.pop(f"{stem}.self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")]
        out[f"{stem}.attn.qkv.{kind}"] = torch.cat(parts)
    if "refine_conv.weight" not in out:  # trained without self-correction: the re-encoder stays at its init
        out.update({k: v for k, v in model.state_dict().items() if k.startswith("refine_conv.")})
    return out


def load_official_tokenizer(checkpoint: str | Path, siglip_config: str | Path | None = None) -> DetailFlowTokenizer:
    config, yaml_config = read_run_configs(checkpoint)
    if siglip_config is None and os.environ.get("CACHE_DATA_PATH"):
        default = Path(os.environ["CACHE_DATA_PATH"]) / "siglip2-so400m-patch16-naflex" / "config.json"
        siglip_config = default if default.is_file() else None
    siglip = json.loads(Path(siglip_config).read_text()) if siglip_config else None
    state = _weights(checkpoint, "model")
    try:
        tokenizer = DetailFlowTokenizer(tokenizer_config(state, config, yaml_config, siglip))
    except KeyError as e:
        raise CheckpointError(f"{checkpoint} is not an official DetailFlow tokenizer: missing {e}") from e
    load_state_dict_strict(tokenizer, tokenizer_state(state, tokenizer), str(checkpoint))
    return tokenizer.eval()


def gpt_config(state: dict, config: dict, yaml_config: dict) -> DetailFlowGPTConfig:
    name = yaml_config.get("gpt_model")
    depth, heads, dim = OFFICIAL_GPT_SIZES.get(name, (config["n_layer"], config["n_head"], config["dim"]))
    found = (_layers(state, "layers."), state["tok_embeddings.weight"].shape[1])
    if found != (depth, dim):
        raise CheckpointError(f"gpt_model {name!r} has {depth} layers of width {dim}; the checkpoint has {found[0]} of "
                              f"{found[1]}")
    if config.get("n_kv_head") not in (None, heads):
        raise CheckpointError("grouped-query attention (n_kv_head != n_head) is not supported")
    if config.get("model_type", "c2i") != "c2i" or config.get("cls_token_num", 1) != 1:
        raise CheckpointError("only class-conditional models with one class token are supported")
    rows = state["cls_embedding.embedding_table.weight"].shape[0]
    if rows != config["num_classes"] + 1:
        raise CheckpointError(f"the class table has {rows} rows; a null class row (class_dropout_prob > 0) is needed")
    return DetailFlowGPTConfig(
        depth=depth, dim=dim, num_heads=heads, multiple_of=int(config.get("multiple_of", 256)),
        ffn_dim_multiplier=config.get("ffn_dim_multiplier"), norm_eps=float(config.get("norm_eps", 1e-5)),
        rope_base=float(config.get("rope_base", 10000)), token_dropout=float(config.get("token_dropout_p", 0.1)),
        resid_dropout=float(config.get("resid_dropout_p", 0.1)), ffn_dropout=float(config.get("ffn_dropout_p", 0.1)),
        drop_path_rate=float(config.get("drop_path_rate", 0.0)), num_classes=int(config["num_classes"]),
        vocab_size=int(config["vocab_size"]), num_tokens=int(config["block_size"]),
        group_size=int(config["group_size"]), causal_num=config.get("causal_num"))


def load_official_gpt(checkpoint: str | Path) -> DetailFlowGPT:
    config, yaml_config = read_run_configs(checkpoint)
    state = _weights(checkpoint, "ema")
    try:
        network = DetailFlowGPT(gpt_config(state, config, yaml_config))
    except KeyError as e:
        raise CheckpointError(f"{checkpoint} is not an official DetailFlow GPT: missing {e}") from e
    load_state_dict_strict(network, state, str(checkpoint))
    return network.eval()


def convert_detailflow_official(tokenizer_ckpt: str | Path, gpt_ckpt: str | Path, out: str | Path,
                                siglip_config: str | Path | None = None, cfg_scale: float | None = None) -> Path:
    from ..pipeline import Pipeline

    tokenizer = load_official_tokenizer(tokenizer_ckpt, siglip_config)
    network = load_official_gpt(gpt_ckpt)
    t, g = tokenizer.config, network.config
    layout = ("num_tokens", "group_size", "causal_num", "vocab_size")
    if any(getattr(t, key) != getattr(g, key) for key in layout):
        raise CheckpointError(f"{gpt_ckpt} models {g.num_tokens} tokens (groups of {g.group_size}, vocabulary "
                              f"{g.vocab_size}); {tokenizer_ckpt} makes {t.num_tokens} (groups of {t.group_size}, "
                              f"vocabulary {t.vocab_size})")
    config, yaml_config = read_run_configs(gpt_ckpt)
    objective = DetailFlowARConfig(label_dropout=float(config.get("class_dropout_prob", 0.1)),
                                   correction_prob=float(yaml_config.get("correction_prob", 0.3)))
    sampler = NextDetailSamplerConfig(cfg_scale=cfg_scale or OFFICIAL_CFG.get(t.num_tokens, 1.45), top_k=0, top_p=0.0)
    info = {"source": "ByteFlow-AI/DetailFlow", "tokenizer": str(tokenizer_ckpt), "gpt": str(gpt_ckpt),
            "licence": "Apache-2.0", "resolution": t.resolution}
    return Pipeline("detailflow", network, objective, sampler, info, tokenizer=tokenizer).save_pretrained(out)
