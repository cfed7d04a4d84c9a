"""The map from a method name to its network and objective classes, and from a component's class name to its
class, on one screen.

A method is a generator (or tokenizer) family that trains with the shared Trainer and samples through the
Pipeline. Folders store the method name and each component's class name, never a class path, so a folder is
rebuilt from these two tables and JSON configs only (no pickled code).

Adding a method: one `Method(...)` entry below (or `register_method(...)` from the method's own module for code that
lives outside the package), the network class joins `COMPONENTS` by itself. Layers: this module imports models,
tokenizers and objectives only (never training/, post/ or the CLI), see docs/adding-a-method.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .models.detailflow import DETAILFLOW_GPT_PRESETS, DetailFlowGPT
from .models.dit import DIT_PRESETS, DiT
from .models.bfm import BFM, BFM_PRESETS
from .models.dico import DICO_PRESETS, DiCo
from .models.gpt import GPT, GPT_PRESETS
from .models.hmar import HMAR, HMAR_PRESETS
from .models.lamamba import LAMAMBA_PRESETS, LaMamba
from .models.lowdiff import LOWDIFF_PRESETS, LowDiffNet
from .models.quantized import QuantizedNetwork
from .models.resgen import RESGEN_PRESETS, ResGen
from .models.var import VAR, VAR_PRESETS
from .objectives.alignment import Projectors
from .objectives.ddpm import GaussianDiffusion
from .objectives.detailflow import DetailFlowARObjective, DetailFlowTokenizerLoss
from .objectives.distilled import DistilledGenerator
from .objectives.flow_matching import RectifiedFlow
from .objectives.hmar import HMARObjective
from .objectives.lowdiff import LowDiffCascade
from .objectives.bfm import BlockwiseFlowMatching
from .objectives.kl_vae import KLVAE_PRESETS, KLVAELoss
from .objectives.next_scale import NextScalePrediction
from .objectives.next_token import NextTokenPrediction
from .objectives.rae import RAEDecoderLoss, RAEFlow
from .objectives.resgen import ResGenObjective
from .objectives.vq_tokenizer import MSVQ_PRESETS, VQTokenizerLoss
from .tokenizers.base import accepts as _accepts
from .tokenizers.detailflow import DETAILFLOW_PRESETS, DetailFlowTokenizer
from .tokenizers.kl_vae import KLVAE
from .tokenizers.msvq import MultiScaleVQ
from .tokenizers.rae import RAE, RAE_PRESETS
from .tokenizers.rvq import RVQ_PRESETS, ResidualVQ


@dataclass(frozen=True)
class Method:
    name: str
    network_class: type  # what `effigen train` trains (a generator, or a tokenizer for kind="tokenizer")
    objective_class: type
    network_presets: dict
    paper: str
    kind: str = "generator"  # "generator" or "tokenizer"
    # tokenizer outputs the generator works on (tokenizers.base): "continuous", "tokens", or token layouts
    # "multiscale" / "grid" (one scale) / "residual" / "sequence"; empty: pixels only
    accepts: tuple[str, ...] = ()
    tokenizer_required: bool = True  # False: pixel space without one, latent space with one (DiT + KL-VAE)
    # post-training methods that start from another method's folder (EfficientDM, ...): `init_from` accepts a
    # generator folder of any of these methods
    base_methods: tuple[str, ...] = ()

    @property
    def uses_tokenizer(self) -> bool:
        return bool(self.accepts)

    def accepts_tokenizer(self, output) -> bool:
        """Whether this generator works on a tokenizer producing `output` (a tokenizers.base spec)."""
        return _accepts(self.accepts, output)


METHODS: dict[str, Method] = {
    "dit-flow": Method("dit-flow", DiT, RectifiedFlow, DIT_PRESETS, "DiT (2212.09748) + rectified flow (2209.03003)",
                       accepts=("continuous",), tokenizer_required=False),
    "dit-ddpm": Method("dit-ddpm", DiT, GaussianDiffusion, DIT_PRESETS, "DiT (2212.09748) + DDPM with learned variance",
                       accepts=("continuous",), tokenizer_required=False),
    "dico-ddpm": Method("dico-ddpm", DiCo, GaussianDiffusion, DICO_PRESETS,
                        "DiCo (2505.11196) + DDPM with learned variance", accepts=("continuous",), tokenizer_required=False),
    "dico-flow": Method("dico-flow", DiCo, RectifiedFlow, DICO_PRESETS, "DiCo (2505.11196) + rectified flow (2209.03003)",
                        accepts=("continuous",), tokenizer_required=False),
    # a guided-distillation student of a dit-flow / dit-ddpm teacher (pixels or KL-VAE latents), made by `effigen distill`
    "dit-distilled": Method("dit-distilled", DiT, DistilledGenerator, DIT_PRESETS,
                            "guided distillation (2210.03142) of a dit-flow / dit-ddpm teacher",
                            accepts=("continuous",), tokenizer_required=False, base_methods=("dit-flow", "dit-ddpm")),
    # RAE stage 2: DiT^DH (DiT presets "DiTDH-*", the DDT head an option of DiT) in an RAE latent, with the
    # dimension-dependent shift and autoguidance (a `guidance_model` component)
    "dit-dh": Method("dit-dh", DiT, RAEFlow, DIT_PRESETS,
                     "RAE's DiT^DH (2510.11690): flow matching with a wide DDT head, dimension-dependent shift, autoguidance",
                     accepts=("continuous",), tokenizer_required=False),
    "klvae": Method("klvae", KLVAE, KLVAELoss, KLVAE_PRESETS, "KL autoencoder of latent diffusion (2112.10752)",
                    kind="tokenizer"),
    "msvq": Method("msvq", MultiScaleVQ, VQTokenizerLoss, MSVQ_PRESETS, "VAR's multi-scale residual VQ-VAE (2404.02905)",
                   kind="tokenizer"),
    "rae": Method("rae", RAE, RAEDecoderLoss, RAE_PRESETS,
                  "RAE representation autoencoder (2510.11690): frozen teacher encoder + trained ViT decoder",
                  kind="tokenizer"),
    "rvq": Method("rvq", ResidualVQ, VQTokenizerLoss, RVQ_PRESETS, "residual-VQ tokenizer (RQ-VAE 2203.01941) of ResGen",
                  kind="tokenizer"),
    "detailflow-tokenizer": Method("detailflow-tokenizer", DetailFlowTokenizer, DetailFlowTokenizerLoss,
                                   DETAILFLOW_PRESETS, "DetailFlow's 1D coarse-to-fine tokenizer (2505.21473)",
                                   kind="tokenizer"),
    "var": Method("var", VAR, NextScalePrediction, VAR_PRESETS, "VAR next-scale prediction (2404.02905)",
                  accepts=("multiscale",)),
    "raster-ar": Method("raster-ar", GPT, NextTokenPrediction, GPT_PRESETS, "LlamaGen-style raster AR (2406.06525)",
                        accepts=("grid",)),
    "hmar": Method("hmar", HMAR, HMARObjective, HMAR_PRESETS, "HMAR Markovian next-scale + masked refinement (2506.04421)",
                   accepts=("multiscale",)),
    "resgen": Method("resgen", ResGen, ResGenObjective, RESGEN_PRESETS,
                     "ResGen masked position x depth prediction of summed RVQ embeddings (2412.10208)",
                     accepts=("residual",)),
    "detailflow": Method("detailflow", DetailFlowGPT, DetailFlowARObjective, DETAILFLOW_GPT_PRESETS,
                         "DetailFlow next-detail prediction with group-parallel decoding and self-correction (2505.21473)",
                         accepts=("sequence",)),
    "lowdiff": Method("lowdiff", LowDiffNet, LowDiffCascade, LOWDIFF_PRESETS,
                      "LowDiff one-network low-to-high resolution cascade (2509.15342), flow matching",
                      accepts=("continuous",), tokenizer_required=False),
    # stage 1 (objective.stage velocity) and the FRA fine-tune (objective.stage fra, init_from the stage-1 folder)
    "bfm": Method("bfm", BFM, BlockwiseFlowMatching, BFM_PRESETS,
                  "BFM blockwise flow matching (2510.21167): per-segment velocity blocks, SemFeat trunk, FRA stage",
                  accepts=("continuous",), tokenizer_required=False),
    "lamamba-ddpm": Method("lamamba-ddpm", LaMamba, GaussianDiffusion, LAMAMBA_PRESETS,
                           "LaMamba-Diff (2408.02615) + DDPM with learned variance", accepts=("continuous",),
                           tokenizer_required=False),
    "lamamba-flow": Method("lamamba-flow", LaMamba, RectifiedFlow, LAMAMBA_PRESETS,
                           "LaMamba-Diff (2408.02615) + rectified flow (2209.03003)", accepts=("continuous",),
                           tokenizer_required=False),
}

# Every class a pipeline folder may hold as a component (generator, tokenizer, guidance model, teacher, a
# low-resolution stage, quantization parameters, ...), by the class name that model_index.json records. A component
# class has `config_class` (a dataclass) and is built as `cls(config)`.
COMPONENTS: dict[str, type] = {cls.__name__: cls for cls in (KLVAE, MultiScaleVQ, ResidualVQ, DetailFlowTokenizer,
                                                              Projectors, QuantizedNetwork)}
COMPONENTS.update({m.network_class.__name__: m.network_class for m in METHODS.values()})
TOKENIZERS: dict[str, type] = {"MultiScaleVQ": MultiScaleVQ, "KLVAE": KLVAE, "RAE": RAE,
                               "ResidualVQ": ResidualVQ}  # the tokenizer classes, for cache-latents


def generates_as(module: nn.Module) -> type:
    """The network class a component stands in for: its own class, or for a wrapper (a QuantizedNetwork) the class
    it wraps. A method's generator must generate as the method's `network_class`."""
    return getattr(module, "base_network_class", type(module))


def register_component(cls: type) -> type:
    """Make `cls` loadable as a pipeline component (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "config_class")):
        raise TypeError(f"{cls!r} is not a component class: it needs to be an nn.Module with a `config_class`")
    other = COMPONENTS.get(cls.__name__)
    if other is not None and other is not cls:
        raise ValueError(f"another component class is already registered as {cls.__name__!r} ({other.__module__})")
    COMPONENTS[cls.__name__] = cls
    return cls


def register_method(method: Method) -> Method:
    """Add a method (and its network class as a component); an existing name is an error."""
    if method.name in METHODS and METHODS[method.name] != method:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    register_component(method.network_class)
    return method


def component_class(name: str) -> type:
    if name not in COMPONENTS:
        raise KeyError(f"unknown component class {name!r}; known: {', '.join(sorted(COMPONENTS))}")
    return COMPONENTS[name]


QuantizedNetwork.resolve_class = component_class  # a quantized folder names its base network class


def build_objective(method: Method, config: Any, num_classes: int, tokenizer=None, components: dict | None = None):
    """The method's objective; token and latent generators get their (frozen) tokenizer, and objectives that name
    further components (`extra_components = ("guidance_model", ...)`) get those as keyword arguments."""
    kwargs = {}
    if getattr(method.objective_class, "needs_tokenizer", False):
        kwargs["tokenizer"] = tokenizer
    for name in getattr(method.objective_class, "extra_components", ()):
        kwargs[name] = (components or {}).get(name)
    return method.objective_class(config, num_classes=num_classes, **kwargs)


def get_method(name: str | Method) -> Method:
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
