"""The map from a method name to its network and objective classes, on one screen.

A method is a generator family that trains with the shared Trainer and samples through the Pipeline.
Folders store the method name, never a class path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .models.dit import DIT_PRESETS, DiT
from .models.gpt import GPT, GPT_PRESETS
from .models.hmar import HMAR, HMAR_PRESETS
from .models.var import VAR, VAR_PRESETS
from .objectives.ddpm import GaussianDiffusion
from .objectives.flow_matching import RectifiedFlow
from .objectives.hmar import HMARObjective
from .objectives.kl_vae import KLVAE_PRESETS, KLVAELoss
from .objectives.next_scale import NextScalePrediction
from .objectives.next_token import NextTokenPrediction
from .objectives.vq_tokenizer import MSVQ_PRESETS, VQTokenizerLoss
from .post.distill import DistilledGenerator
from .tokenizers.kl_vae import KLVAE
from .tokenizers.msvq import MultiScaleVQ


@dataclass(frozen=True)
class Method:
    name: str
    network_class: type  # what `effigen train` trains (a generator, or a tokenizer for kind="tokenizer")
    objective_class: type
    network_presets: dict
    paper: str
    kind: str = "generator"  # "generator" or "tokenizer"
    tokenizer_class: type | None = None  # generators that sample through a frozen tokenizer
    tokenizer_required: bool = True  # False: pixel space without one, latent space with one (DiT + KL-VAE)


METHODS: dict[str, Method] = {
    "dit-flow": Method("dit-flow", DiT, RectifiedFlow, DIT_PRESETS, "DiT (2212.09748) + rectified flow (2209.03003)",
                       tokenizer_class=KLVAE, tokenizer_required=False),
    "dit-ddpm": Method("dit-ddpm", DiT, GaussianDiffusion, DIT_PRESETS, "DiT (2212.09748) + DDPM with learned variance",
                       tokenizer_class=KLVAE, tokenizer_required=False),
    # a guided-distillation student of a dit-flow / dit-ddpm teacher (pixels or KL-VAE latents), made by `effigen distill`
    "dit-distilled": Method("dit-distilled", DiT, DistilledGenerator, DIT_PRESETS,
                            "guided distillation (2210.03142) of a dit-flow / dit-ddpm teacher",
                            tokenizer_class=KLVAE, tokenizer_required=False),
    "klvae": Method("klvae", KLVAE, KLVAELoss, KLVAE_PRESETS, "KL autoencoder of latent diffusion (2112.10752)",
                    kind="tokenizer"),
    "msvq": Method("msvq", MultiScaleVQ, VQTokenizerLoss, MSVQ_PRESETS, "VAR's multi-scale residual VQ-VAE (2404.02905)",
                   kind="tokenizer"),
    "var": Method("var", VAR, NextScalePrediction, VAR_PRESETS, "VAR next-scale prediction (2404.02905)",
                  tokenizer_class=MultiScaleVQ),
    "raster-ar": Method("raster-ar", GPT, NextTokenPrediction, GPT_PRESETS, "LlamaGen-style raster AR (2406.06525)",
                        tokenizer_class=MultiScaleVQ),
    "hmar": Method("hmar", HMAR, HMARObjective, HMAR_PRESETS, "HMAR Markovian next-scale + masked refinement (2506.04421)",
                   tokenizer_class=MultiScaleVQ),
}

TOKENIZERS: dict[str, type] = {"MultiScaleVQ": MultiScaleVQ, "KLVAE": KLVAE}


def build_objective(method: Method, config: Any, num_classes: int, tokenizer=None):
    """The method's objective; token and latent generators get their (frozen) tokenizer."""
    if getattr(method.objective_class, "needs_tokenizer", False):
        return method.objective_class(config, num_classes=num_classes, tokenizer=tokenizer)
    return method.objective_class(config, num_classes=num_classes)

NETWORKS: dict[str, type] = {m.network_class.__name__: m.network_class for m in METHODS.values()}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
