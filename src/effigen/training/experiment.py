"""An experiment = method + data + network + objective + sampler + trainer settings, with presets.

Sections are typed by the chosen method (`registry.METHODS`): `network` is validated against the
method's network config class, `objective` and `sampler` against its objective's. The network's input
size, channels and class count follow the data and the tokenizer's declared output (`tokenizers.base`) unless set
explicitly (and then they must agree).

    cfg = build_experiment_config(preset="mnist-dit", overrides=["--trainer.max_steps=50"])
    cfg.method_spec        # the registry entry, looked up once here and carried by the config
    cfg.tokenizer_output   # what the tokenizer folder produces (LatentSpace / TokenSpace), or None

An experiment belongs to the training layer: it holds the `TrainerConfig`, and `training.run` builds a run from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config_file
from ..data import DataConfig
from ..registry import METHODS, Method, component_class, get_method
from ..objectives.alignment import AlignConfig
from ..tokenizers.base import TokenizerOutputSpec
from .trainer import TrainerConfig


@dataclass
class ExperimentConfig:
    method: str
    data: DataConfig
    network: Any
    objective: Any
    sampler: Any
    trainer: TrainerConfig
    tokenizer: str | None = None  # folder of a trained tokenizer (token/latent generators)
    init_from: str | None = None  # a pipeline folder whose generator weights start the run (e.g. HMAR's stage 2)
    align: AlignConfig = field(default_factory=AlignConfig)  # REPA / HASTE alignment to a frozen teacher
    # resolved once by parse_experiment (not part of the saved config)
    method_spec: Method | None = field(default=None, init=False, repr=False, compare=False)
    tokenizer_output: TokenizerOutputSpec | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.method_spec = get_method(self.method)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


# Trainer settings the recipes of one family share (each preset adds its output_dir and budget).
_DIT_TRAINER = {"max_steps": 1200, "batch_size": 128, "learning_rate": 1e-3, "warmup_steps": 50,
                "schedule": "cosine", "min_learning_rate_ratio": 0.05, "ema_decay": 0.999, "precision": "bf16",
                "checkpoint_every": 400, "sample_every": 400, "log_every": 25}
_TOKENIZER_TRAINER = {"max_steps": 1500, "batch_size": 64, "learning_rate": 1e-3, "warmup_steps": 50,
                      "schedule": "cosine", "min_learning_rate_ratio": 0.1, "ema_decay": 0.0, "betas": [0.5, 0.9],
                      "precision": "bf16", "checkpoint_every": 500, "sample_every": 500, "log_every": 25}
_TOKEN_TRAINER = {"batch_size": 32, "learning_rate": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.95],
                  "warmup_steps": 100, "schedule": "cosine", "min_learning_rate_ratio": 0.05, "grad_clip": 2.0,
                  "ema_decay": 0.999, "precision": "bf16", "checkpoint_every": 500, "sample_every": 500,
                  "log_every": 25}

# Whole-run presets: plain dicts, overridable key by key. `network_preset` names a size from the
# method's network presets (e.g. DiT-S/2) that `network` keys then refine.
EXPERIMENT_PRESETS: dict[str, dict[str, Any]] = {
    # The quickstart: a small DiT on built-in MNIST at 16 px (patch 2: 64 tokens), ~10 minutes on 2 CPU cores. It
    # predicts the clean image (JiT's x-prediction) with a velocity loss and uniform t: at this budget (1,200 steps)
    # velocity prediction still draws blobs, and 32 px with patch 4 draws rougher digits (docs/training.md).
    "mnist-dit": {
        "method": "dit-flow",
        "data": {"name": "mnist", "resolution": 16},
        "network_preset": "DiT-Ti/4",
        "network": {"hidden_size": 192, "depth": 4, "num_heads": 3, "patch_size": 2},
        "objective": {"prediction": "data", "time_sampling": "uniform", "label_dropout": 0.1},
        "sampler": {"solver": "heun", "num_steps": 20, "cfg_scale": 2.0},
        "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-dit", "max_minutes": 12.0},
    },
    # The same network and budget under each paper's own objective (for side-by-side comparisons).
    # DiT's own objective (eps + learned variance). In pixels, eps-prediction barely trains the high-noise steps that
    # lay out the digit and draws blobs at this budget; `--objective.prediction=velocity` draws digits (results-30min.md).
    "mnist-dit-ddpm": {
        "method": "dit-ddpm",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "DiT-Ti/4",
        "network": {"hidden_size": 192, "depth": 4, "num_heads": 3, "patch_size": 4},
        "objective": {"beta_schedule": "linear", "learn_sigma": True},
        "sampler": {"solver": "ddim", "num_steps": 50, "cfg_scale": 2.0},
        "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-dit-ddpm"},
    },
    "mnist-sit": {  # SiT's defaults: linear path, velocity prediction, uniform t; SDE sampling (at half SiT's noise,
        # diffusion_norm 1; SiT's own SDE is --sampler.diffusion_norm=2)
        "method": "dit-flow",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "DiT-Ti/4",
        "network": {"hidden_size": 192, "depth": 4, "num_heads": 3, "patch_size": 4},
        "objective": {"path": "linear", "prediction": "velocity", "time_sampling": "uniform"},
        "sampler": {"solver": "euler_maruyama", "num_steps": 50, "cfg_scale": 2.0},
        "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-sit"},
    },
    "mnist-lightningdit": {  # LightningDiT blocks, logit-normal t, velocity-direction loss, shifted Euler grid
        "method": "dit-flow",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "LightningDiT-Ti/4",
        "network": {"hidden_size": 192, "depth": 4, "num_heads": 3, "patch_size": 4},
        "objective": {"prediction": "velocity", "time_sampling": "logit_normal", "cosine_loss_weight": 1.0},
        "sampler": {"solver": "euler", "num_steps": 50, "cfg_scale": 2.0, "time_shift": 1.0},
        "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-lightningdit", "betas": [0.9, 0.95]},
    },
    # Latent space: a KL-VAE trained on MNIST (32 px -> 8x8x4 latents, L1 + KL + perceptual on mnist-net's early
    # stages), then LightningDiT on its latents (patch 1: 64 tokens, as the pixel recipes' patch 4 at 32 px). The
    # generator run encodes the dataset once into <output_dir>/latents and trains from that cache.
    "mnist-klvae": {
        "method": "klvae",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "KL-S/4",
        "objective": {"l1_weight": 1.0, "l2_weight": 1.0, "kl_weight": 1e-6, "perceptual_weight": 0.1,
                      "perceptual_net": "mnist-net"},
        "trainer": {**_TOKENIZER_TRAINER, "output_dir": "runs/mnist-klvae", "max_minutes": 15.0},
    },
    # VA-VAE (2501.01423) on built-in MNIST: mnist-klvae's recipe at 4x the latent width (8x8x16: the paper's
    # "optimization dilemma" of high-dimensional latents) plus the VF alignment of the sampled latents to the
    # built-in mnist-vit teacher (its 8x8 tokens at 32 px match the latent grid): margins 0.5 / 0.25, weight 0.1 with
    # the adaptive weight on the encoder's last layer, as f16d32_vfdinov2.yaml. Latent statistics calibrated at the end.
    "mnist-vavae": {
        "method": "klvae",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "KL-S/4",
        "network": {"latent_channels": 16},
        "objective": {"l1_weight": 1.0, "l2_weight": 1.0, "kl_weight": 1e-6, "perceptual_weight": 0.1,
                      "perceptual_net": "mnist-net", "vf_weight": 0.1, "vf_teacher": "mnist-vit", "cos_margin": 0.5,
                      "distmat_margin": 0.25, "cos_weight": 1.0, "distmat_weight": 1.0, "adaptive_vf": True},
        # the VF term's adaptive weight costs a second backward through the decoder: ~0.75 s a step on one core
        # (mnist-klvae ~0.5 s), so 1,200 steps fit its 15 minutes
        "trainer": {**_TOKENIZER_TRAINER, "output_dir": "runs/mnist-vavae", "max_steps": 1200, "max_minutes": 15.0},
    },
    "mnist-lightningdit-latent": {
        "method": "dit-flow",
        "tokenizer": "runs/mnist-klvae/final",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "LightningDiT-Ti/4",
        "network": {"hidden_size": 192, "depth": 4, "num_heads": 3, "patch_size": 1},
        "objective": {"prediction": "velocity", "time_sampling": "logit_normal", "cosine_loss_weight": 1.0},
        "sampler": {"solver": "euler", "num_steps": 50, "cfg_scale": 2.0, "time_shift": 1.0},
        "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-lightningdit-latent", "betas": [0.9, 0.95]},
    },
    # RAE (2510.11690) on built-in MNIST, in two runs: the representation autoencoder (the frozen built-in mnist-vit
    # teacher's 8x8x128 patch tokens at 32 px, LayerNorm without affine, per-element statistics calibrated at the end;
    # a 4-block ViT decoder trained with L1 + perceptual (mnist-net's early stages) on latents noised with
    # sigma ~ 0.8 U(0, 1)), then DiT^DH in its latent: a LightningDiT encoder (patch 1: 64 tokens) with a wider DDT
    # head, logit-normal t shifted by the dimension-dependent s = sqrt(8192 / 256) = 5.66, Euler with the same shift.
    # The base is 256, the 8x8x4 KL-VAE latent whose unshifted schedule works on MNIST (mnist-lightningdit-latent), as
    # the paper's 4096 is the 32x32x4 SD-VAE latent of ImageNet 256: at 400 equal steps s = 5.66 scored FID 17.9
    # against 22.5 with the ImageNet base (s = 1.41), 200 samples each (docs/rae.md).
    "mnist-rae": {
        "method": "rae",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "RAE-MNIST",
        "objective": {"l1_weight": 1.0, "perceptual_weight": 0.1, "perceptual_net": "mnist-net"},
        "trainer": {**_TOKENIZER_TRAINER, "output_dir": "runs/mnist-rae", "max_minutes": 15.0},
    },
    "mnist-dit-dh": {
        "method": "dit-dh",
        "tokenizer": "runs/mnist-rae/final",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "DiTDH-Ti",
        "objective": {"prediction": "velocity", "time_sampling": "logit_normal", "shift_base": 256},
        "sampler": {"solver": "euler", "num_steps": 50, "cfg_scale": 2.0, "time_shift": 0.0},
        "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-dit-dh", "betas": [0.9, 0.95]},
    },
    "shapes-dit": {
        "method": "dit-flow",
        "data": {"name": "shapes", "resolution": 32, "num_images": 20000},
        "network_preset": "DiT-Ti/4",
        "sampler": {"solver": "heun", "num_steps": 20, "cfg_scale": 2.0},
        "trainer": {"output_dir": "runs/shapes-dit", "max_steps": 2000, "batch_size": 128, "learning_rate": 1e-3,
                    "warmup_steps": 100, "schedule": "cosine", "ema_decay": 0.999, "precision": "bf16"},
    },
    # VAR on built-in MNIST, in two runs: the multi-scale VQ tokenizer (32 px -> 8x8 latent, 7 scales, 155 tokens,
    # 512 codes), then the next-scale transformer on its tokens (`tokenizer` points at the first run's folder).
    "mnist-msvq": {
        "method": "msvq",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "MSVQ-S/4",
        "objective": {"l2_weight": 1.0, "l1_weight": 0.2, "perceptual_weight": 0.1, "perceptual_net": "mnist-net",
                      "restart_every": 25},
        "trainer": {**_TOKENIZER_TRAINER, "output_dir": "runs/mnist-msvq"},
    },
    "mnist-var": {
        "method": "var",
        "tokenizer": "runs/mnist-msvq/final",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "VAR-d4",
        "objective": {"label_dropout": 0.1},
        "sampler": {"cfg_scale": 1.5, "top_k": 0, "top_p": 0.0},  # best FID of 1.5/2/3/4 (benchmarks/compare.py)
        # ~20 minutes on one core of this machine (VAR-d4 trains at ~20-40 images/s there, load permitting)
        "trainer": {**_TOKEN_TRAINER, "output_dir": "runs/mnist-var", "max_steps": 1400, "max_minutes": 22.0},
    },
    # The raster-scan AR baseline (LlamaGen-style next-token prediction) on the same data and budgets as VAR: a
    # single-scale VQ tokenizer with MSVQ-S/4's encoder (32 px -> one 8x8 map, 64 tokens, 512 codes), then a GPT of
    # VAR-d4's parameter count on its tokens with LlamaGen's constant guidance uncond + s (cond - uncond), s = 2.
    "mnist-vq": {
        "method": "msvq",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "VQ-S/4",
        "objective": {"l2_weight": 1.0, "l1_weight": 0.2, "perceptual_weight": 0.1, "perceptual_net": "mnist-net",
                      "restart_every": 25},
        "trainer": {**_TOKENIZER_TRAINER, "output_dir": "runs/mnist-vq"},
    },
    "mnist-raster-ar": {
        "method": "raster-ar",
        "tokenizer": "runs/mnist-vq/final",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "GPT-S",
        "objective": {"label_dropout": 0.1},
        "sampler": {"cfg_scale": 1.5, "guidance_schedule": "constant", "top_k": 0, "top_p": 0.0},  # best of 1.5/2/3/4
        # the same wall budget as mnist-var on one core: the 64-token sequence trains ~2.4x more images/s than VAR's 155
        "trainer": {**_TOKEN_TRAINER, "output_dir": "runs/mnist-raster-ar", "max_steps": 2800, "max_minutes": 22.0},
    },
    # HMAR on mnist-var's tokenizer and budget, in two stages (docs/hmar.md): next-scale prediction with block-diagonal
    # attention and HMAR's lognorm scale weighting (HMAR-d4: VAR-d4's parameter count), then the masked-refinement
    # fine-tune of the mask branch, started from the first run's folder (`init_from`). Stage 1 samples without refinement
    # (its mask branch is untrained); stage 2 refines the 2x2 and 3x3 scales in 2 and 4 steps (the official default
    # pattern); change the schedule at sampling time (`effigen sample --schedule`).
    "mnist-hmar": {
        "method": "hmar",
        "tokenizer": "runs/mnist-msvq/final",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "HMAR-d4",
        "objective": {"label_dropout": 0.1, "stage": "next_scale", "scale_weighting": "lognorm"},
        "sampler": {"cfg_scale": 3.0, "top_k": 0, "top_p": 0.0, "mask_schedule": "off"},
        # mnist-var's budget (~20 minutes on one core; HMAR-d4 trains at about VAR-d4's speed)
        "trainer": {**_TOKEN_TRAINER, "output_dir": "runs/mnist-hmar", "max_steps": 1400, "max_minutes": 22.0},
    },
    # stage 2: a third of stage 1's steps (the official fine-tune runs 100 epochs after 200-350 of stage 1), same
    # optimiser settings
    "mnist-hmar-mask": {
        "method": "hmar",
        "tokenizer": "runs/mnist-msvq/final",
        "init_from": "runs/mnist-hmar/final",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "HMAR-d4",
        "objective": {"label_dropout": 0.1, "stage": "mask"},
        "sampler": {"cfg_scale": 3.0, "top_k": 0, "top_p": 0.0, "mask_schedule": "default"},
        "trainer": {**_TOKEN_TRAINER, "output_dir": "runs/mnist-hmar-mask", "max_steps": 450, "max_minutes": 8.0,
                    "warmup_steps": 50, "checkpoint_every": 150, "sample_every": 150},
    },
    # ResGen on built-in MNIST (docs/resgen.md), in two runs: a residual-VQ tokenizer (32 px -> 8x8 positions x depth
    # 4, 256 codes per depth; mnist-rvq8: depth 8), then the masked position x depth transformer with its
    # mixture-of-Gaussians head on its tokens, at mnist-var's budget and about VAR-d4's parameter count.
    "mnist-rvq": {
        "method": "rvq",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "RVQ-S/4-d4",
        "objective": {"l2_weight": 1.0, "l1_weight": 0.2, "perceptual_weight": 0.1, "perceptual_net": "mnist-net",
                      "restart_every": 25},
        "trainer": {**_TOKENIZER_TRAINER, "output_dir": "runs/mnist-rvq"},
    },
    "mnist-resgen": {
        "method": "resgen",
        "tokenizer": "runs/mnist-rvq/final",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "ResGen-d4",
        "objective": {"label_dropout": 0.1, "mog_loss": "nll"},
        # 8 steps at temperature 0.5: FID (mnist-net, 300 samples) 9.2 against 9.8 with 16 steps and worse at 1.0
        "sampler": {"num_steps": 8, "cfg_scale": 2.0, "temperature": 0.5, "gumbel_temperature": 1.0},
        "trainer": {**_TOKEN_TRAINER, "output_dir": "runs/mnist-resgen", "max_steps": 1400, "max_minutes": 22.0},
    },
    # DetailFlow (2505.21473) on built-in MNIST (docs/detailflow.md), in two runs: the 1D coarse-to-fine tokenizer
    # (32 px, 4 px patches, 32 tokens in groups of 4, 512 codes of dim 8; degraded prefixes with probability 0.2 and
    # power 1.5, self-correction on, as the official yaml), then the group-parallel GPT of VAR-d4's parameter count
    # with self-correction on 30% of the samples and the official constant guidance. The -64 pair: 64 tokens.
    "mnist-detailflow-tokenizer": {
        "method": "detailflow-tokenizer",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "DetailFlow-S",
        # continuous_steps / restarts: ours (docs/detailflow.md): from scratch the codebook otherwise collapses
        "objective": {"l2_weight": 1.0, "l1_weight": 0.2, "perceptual_weight": 0.1, "perceptual_net": "mnist-net",
                      "continuous_steps": 150, "restart_every": 25},
        "trainer": {**_TOKENIZER_TRAINER, "output_dir": "runs/mnist-detailflow-tokenizer", "learning_rate": 5e-4,
                    "betas": [0.9, 0.95]},
    },
    "mnist-detailflow": {
        "method": "detailflow",
        "tokenizer": "runs/mnist-detailflow-tokenizer/final",
        "data": {"name": "mnist", "resolution": 32},
        "network_preset": "DetailFlow-GPT-S",
        "objective": {"label_dropout": 0.1, "correction_prob": 0.3},
        "sampler": {"cfg_scale": 1.5, "top_k": 0, "top_p": 0.0},
        "trainer": {**_TOKEN_TRAINER, "output_dir": "runs/mnist-detailflow", "max_steps": 1400, "max_minutes": 22.0},
    },
    # Seconds on a CPU: for tests and for checking that a recipe runs end to end.
    "smoke": {
        "method": "dit-flow",
        "data": {"name": "mnist", "resolution": 16},
        "network_preset": "DiT-Test",
        "sampler": {"solver": "euler", "num_steps": 4, "cfg_scale": 1.5},
        "trainer": {"output_dir": "runs/smoke", "max_steps": 4, "batch_size": 8, "learning_rate": 1e-3,
                    "precision": "fp32", "checkpoint_every": 2, "log_every": 1, "progress": False},
    },
}


# SiT + representation alignment to the built-in mnist-vit teacher (docs/alignment.md): mnist-sit's network, objective,
# sampler and budget, plus REPA on block 2 of 4 (REPA's encoder_depth at a third of the depth), or HASTE (REPA +
# attention alignment of blocks 0-1 to the teacher's last two, both stopped at step 400 of 1,200: its early termination).
_REPA = {"method": "repa", "teacher": "mnist-vit", "block": 2, "projector_dim": 512, "proj_coeff": 0.5}
# the deeper RVQ (the paper: depth 16 over 8 improves FID at little extra time; same step count)
EXPERIMENT_PRESETS["mnist-rvq8"] = {**EXPERIMENT_PRESETS["mnist-rvq"], "network_preset": "RVQ-S/4-d8",
                                    "trainer": {**_TOKENIZER_TRAINER, "output_dir": "runs/mnist-rvq8"}}
EXPERIMENT_PRESETS["mnist-resgen-rvq8"] = {**EXPERIMENT_PRESETS["mnist-resgen"], "tokenizer": "runs/mnist-rvq8/final",
                                           "trainer": {**EXPERIMENT_PRESETS["mnist-resgen"]["trainer"],
                                                       "output_dir": "runs/mnist-resgen-rvq8"}}
EXPERIMENT_PRESETS["mnist-detailflow-tokenizer-64"] = {
    **EXPERIMENT_PRESETS["mnist-detailflow-tokenizer"], "network_preset": "DetailFlow-S-64",
    "trainer": {**EXPERIMENT_PRESETS["mnist-detailflow-tokenizer"]["trainer"], "output_dir": "runs/mnist-detailflow-tokenizer-64"}}
EXPERIMENT_PRESETS["mnist-detailflow-64"] = {
    **EXPERIMENT_PRESETS["mnist-detailflow"], "tokenizer": "runs/mnist-detailflow-tokenizer-64/final",
    "trainer": {**EXPERIMENT_PRESETS["mnist-detailflow"]["trainer"], "output_dir": "runs/mnist-detailflow-64"}}
EXPERIMENT_PRESETS["mnist-sit-repa"] = {**EXPERIMENT_PRESETS["mnist-sit"], "align": _REPA,
                                        "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-sit-repa"}}
EXPERIMENT_PRESETS["mnist-sit-haste"] = {**EXPERIMENT_PRESETS["mnist-sit"],
                                         "align": {**_REPA, "method": "haste", "attn_coeff": 0.5, "stop_step": 400},
                                         "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-sit-haste"}}

# DiCo (2505.11196, docs/dico.md): the conv U-Net in place of the DiT, same data, objectives, samplers and budget as
# mnist-dit-ddpm (DiCo's own recipe: DDPM, learned variance) and mnist-sit (rectified flow, velocity). DiCo-Ti (width 64,
# two blocks per level) has 5.0M parameters at 32 px, as the DiT recipes' width 256 x depth 4 (5.0M).
EXPERIMENT_PRESETS["mnist-dico"] = {**EXPERIMENT_PRESETS["mnist-dit-ddpm"], "method": "dico-ddpm",
                                    "network_preset": "DiCo-Ti", "network": {},
                                    "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-dico"}}
EXPERIMENT_PRESETS["mnist-dico-flow"] = {**EXPERIMENT_PRESETS["mnist-sit"], "method": "dico-flow",
                                         "network_preset": "DiCo-Ti", "network": {},
                                         "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-dico-flow"}}
# LowDiff (2509.15342) on built-in MNIST: one DiT-Ti/4 (mnist-sit's blocks, 2-D RoPE positions only) over 8 -> 16 ->
# 32 px; mnist-sit's objective, per-stage step budgets (most steps at 8 px where they are cheap), Euler. Mode "concat"
# (channel concatenation of the noise-augmented upsample): at 600 training steps (batch 64) it reached FID 9.9 at
# [8, 4, 2] against 21.2 for "init" (t* = 0.6); at 300 steps "init" led (28.3 vs 32.3 at [16, 8, 4]). docs/lowdiff.md.
EXPERIMENT_PRESETS["mnist-lowdiff"] = {
    "method": "lowdiff",
    "data": {"name": "mnist", "resolution": 32},
    "network_preset": "LowDiff-DiT-Ti/4",
    "network": {"resolutions": [8, 16, 32], "mode": "concat"},
    "objective": {"path": "linear", "prediction": "velocity", "time_sampling": "uniform", "cond_aug_max": 0.3},
    "sampler": {"solver": "euler", "num_steps": 50, "stage_steps": [8, 4, 2], "cond_aug": 0.1, "cfg_scale": 2.0},
    "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-lowdiff"},
}
# LaMamba-Diff (2408.02615, docs/lamamba.md): the SS2D + window-attention U-Net in place of the DiT, same data,
# objectives, samplers and budget as mnist-dico / mnist-dico-flow. LaMamba-Ti/4 (patch 4: DiT-Ti/4's 64 tokens) has
# 5.16M parameters at 32 px.
EXPERIMENT_PRESETS["mnist-lamamba"] = {**EXPERIMENT_PRESETS["mnist-dit-ddpm"], "method": "lamamba-ddpm",
                                       "network_preset": "LaMamba-Ti/4", "network": {},
                                       "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-lamamba"}}
EXPERIMENT_PRESETS["mnist-lamamba-flow"] = {**EXPERIMENT_PRESETS["mnist-sit"], "method": "lamamba-flow",
                                            "network_preset": "LaMamba-Ti/4", "network": {},
                                            "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-lamamba-flow"}}

# BFM (2510.21167, docs/bfm.md) on built-in MNIST: BFM-Ti/4 (4.93M parameters, as the DiT recipes' 5.0M): 3 time
# segments x 2 velocity blocks, a 3-block SemFeat trunk aligned to the built-in mnist-vit teacher (REPA presets' teacher)
# with the official weight 0.05, mnist-sit's budget; Euler 12 steps (4 per segment). Stage 2 (mnist-bfm-fra) trains the
# 1-block FRN on the frozen stage-1 model (`init_from`, as mnist-hmar-mask) and samples with it.
EXPERIMENT_PRESETS["mnist-bfm"] = {
    "method": "bfm",
    "data": {"name": "mnist", "resolution": 32},
    "network_preset": "BFM-Ti/4",
    "objective": {"stage": "velocity", "label_dropout": 0.1, "proj_loss_weight": 0.05, "teacher": "mnist-vit"},
    "sampler": {"solver": "euler", "num_steps": 12, "cfg_scale": 2.0},
    "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-bfm"},
}
EXPERIMENT_PRESETS["mnist-bfm-fra"] = {
    **EXPERIMENT_PRESETS["mnist-bfm"],
    "init_from": "runs/mnist-bfm/final",
    "objective": {"stage": "fra", "label_dropout": 0.1},
    "sampler": {"solver": "euler", "num_steps": 12, "cfg_scale": 2.0, "fra": True},
    "trainer": {**_DIT_TRAINER, "output_dir": "runs/mnist-bfm-fra", "max_steps": 400, "warmup_steps": 40,
                "checkpoint_every": 200, "sample_every": 200},
}


def preset_names() -> list[str]:
    return list(EXPERIMENT_PRESETS)


def tokenizer_folder(path: str) -> Path:
    """The folder holding a tokenizer's config.json: `path` itself, or `path/tokenizer` of a pipeline folder."""
    folder = Path(path)
    for candidate in (folder / "tokenizer", folder):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise ConfigError(f"tokenizer={path!r}: no tokenizer there (expected {folder}/tokenizer/config.json and "
                      "model.safetensors, as a tokenizer training run writes in its final/ folder); train one first, "
                      "e.g. `effigen train --preset mnist-msvq`")


def tokenizer_settings(path: str) -> dict[str, Any]:
    from ..io import read_json

    return read_json(tokenizer_folder(path) / "config.json")


def tokenizer_output(path: str) -> tuple[str, TokenizerOutputSpec]:
    """(class name, declared output) of the tokenizer folder at `path`, from its config.json alone (no weights)."""
    settings = dict(tokenizer_settings(path))
    name = settings.pop("_class_name", None)
    try:
        cls = component_class(str(name))
    except KeyError as e:
        raise ConfigError(f"tokenizer={path!r}: {e.args[0]}") from None
    if not hasattr(cls, "output_of"):
        raise ConfigError(f"tokenizer={path!r} holds a {name}, which is not a tokenizer (it declares no output)")
    config = config_from_dict(cls.config_class, settings, f"{tokenizer_folder(path)}/config.json")
    return str(name), cls.output_of(config)


def _resolve_network(method: Method, data: DataConfig, raw: dict[str, Any], preset: str | None,
                     num_classes: int | None, objective: Any = None,
                     output: TokenizerOutputSpec | None = None) -> Any:
    network_data: dict[str, Any] = {}
    if preset is not None:
        if preset not in method.network_presets:
            raise ConfigError(f"unknown network_preset {preset!r} for {method.name}; valid: {', '.join(method.network_presets)}")
        network_data.update(method.network_presets[preset])
    network_data.update(raw)
    derived: dict[str, Any] = {"input_size": data.resolution, "in_channels": 3, "resolution": data.resolution}
    # the objective decides what the output channels mean (DDPM's learned variance doubles them)
    derived["learn_sigma"] = bool(getattr(objective, "learn_sigma", False))
    if num_classes is not None:
        derived["num_classes"] = num_classes
    if output is not None:  # a latent or token generator: its input is what the tokenizer declares
        derived.pop("input_size"), derived.pop("resolution")
        derived.update(output.network_inputs())
    field_names = {f.name for f in dataclasses.fields(method.network_class.config_class)}
    for key, value in derived.items():
        if key not in field_names:
            continue
        if key in raw and (list(raw[key]) if isinstance(raw[key], (list, tuple)) else raw[key]) != value:
            raise ConfigError(
                f"network.{key}={raw[key]} disagrees with the data ({key} = {value} for {data.name} at "
                f"{data.resolution} px, the tokenizer, or the objective); remove the override or change the "
                "data/tokenizer/objective settings"
            )
        network_data[key] = value
    try:
        return config_from_dict(method.network_class.config_class, network_data, "network")
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"network: {e}") from e


def _check_tokenizer(method: Method, tokenizer: str | None, data: DataConfig) -> TokenizerOutputSpec | None:
    """The declared output of the experiment's tokenizer, checked against what the method accepts and the data."""
    if tokenizer is not None and not method.uses_tokenizer:
        raise ConfigError(f"method {method.name} does not use a tokenizer; remove `tokenizer` from the config")
    if tokenizer is None:
        if method.uses_tokenizer and method.tokenizer_required:
            raise ConfigError(f"method {method.name} generates through a tokenizer: set `tokenizer` to the folder of a "
                              "trained one (e.g. --tokenizer=runs/mnist-msvq/final after `effigen train --preset mnist-msvq`)")
        return None
    name, output = tokenizer_output(tokenizer)
    if not method.accepts_tokenizer(output):
        raise ConfigError(f"the tokenizer in {tokenizer} (a {name}) produces {output.describe()}; method {method.name} "
                          f"works on {' or '.join(method.accepts)} outputs: use a tokenizer of that kind")
    if output.resolution != data.resolution:
        raise ConfigError(f"the tokenizer in {tokenizer} works at {output.resolution} px but data.resolution "
                          f"is {data.resolution}; use the same resolution")
    return output


# the built-in teacher of each built-in dataset (what `--align repa` uses unless align.teacher names one)
BUILTIN_TEACHERS = {"mnist": "mnist-vit"}


def _check_align(method: Method, data: DataConfig, align: AlignConfig) -> AlignConfig:
    if not align.enabled:
        return align
    import inspect

    if method.kind != "generator" or "taps" not in inspect.signature(method.network_class.forward).parameters:
        raise ConfigError(f"align.method={align.method} aligns a transformer generator's hidden tokens; method "
                          f"{method.name}'s {method.network_class.__name__} has no feature taps (nn/taps.py)")
    if not align.teacher:
        if data.name not in BUILTIN_TEACHERS:
            raise ConfigError(f"align.method={align.method} needs a teacher: set --align.teacher to a built-in one "
                              f"({', '.join(sorted(set(BUILTIN_TEACHERS.values())))}) or dinov2-vitb14-reg=PATH "
                              "(a local DINOv2 checkpoint)")
        align = dataclasses.replace(align, teacher=BUILTIN_TEACHERS[data.name])
    return align


def parse_experiment(data: dict[str, Any], num_classes: int | None = None) -> ExperimentConfig:
    """Validate a whole experiment dict and resolve it once: the method's registry entry and the tokenizer's declared
    output travel with the returned config. `num_classes` (from the dataset) fills network.num_classes."""
    known = {"method", "data", "network_preset", "network", "objective", "sampler", "trainer", "tokenizer", "init_from",
             "align"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; valid sections: {', '.join(sorted(known))}")
    method_name = data.get("method", "dit-flow")
    if method_name not in METHODS:
        raise ConfigError(f"unknown method {method_name!r}; available: {', '.join(METHODS)}")
    method = get_method(method_name)
    data_config = config_from_dict(DataConfig, data.get("data", {}), "data")
    objective = config_from_dict(method.objective_class.config_class, data.get("objective", {}), "objective")
    tokenizer = data.get("tokenizer")
    output = _check_tokenizer(method, tokenizer, data_config)
    network = _resolve_network(method, data_config, data.get("network", {}), data.get("network_preset"), num_classes,
                               objective, output)
    sampler = config_from_dict(method.objective_class.sampler_config_class, data.get("sampler", {}), "sampler")
    trainer = config_from_dict(TrainerConfig, data.get("trainer", {}), "trainer")
    init_from = data.get("init_from")
    if init_from is not None:
        check_init_from(str(init_from), method)
    align = _check_align(method, data_config, config_from_dict(AlignConfig, data.get("align", {}), "align"))
    if data_config.token_cache:
        if output is None or output.kind != "tokens":
            held = "no tokenizer" if output is None else f"a tokenizer with {output.describe()}, whose latents effigen " \
                                                         "train caches by itself"
            raise ConfigError(f"data.token_cache=true stores a VQ tokenizer's token ids for a token generator; method "
                              f"{method.name} here has {held}: remove data.token_cache")
        if align.enabled:
            raise ConfigError("alignment to a teacher (align.enabled) feeds it the training images, which a token "
                              "cache does not hold; train from images (data.token_cache=false)")
    config = ExperimentConfig(method_name, data_config, network, objective, sampler, trainer, tokenizer,
                              None if init_from is None else str(init_from), align)
    config.tokenizer_output = output
    return config


def check_init_from(path: str, method: str | Method) -> dict[str, Any]:
    """`init_from` must be a pipeline folder (e.g. a run's final/ or checkpoints/step_N/) holding a generator of the
    same network class as `method`'s, or (post-training methods such as EfficientDM) a generator folder of one of
    the method's `base_methods`; returns its model_index.json."""
    from ..io import read_json

    method = get_method(method)
    if method.kind != "generator":
        raise ConfigError(f"init_from loads generator weights; method {method.name} trains a {method.kind}")
    folder = Path(path)
    if not (folder / "model_index.json").is_file() or not (folder / "generator" / "config.json").is_file():
        raise ConfigError(f"init_from={path!r}: no pipeline folder with a generator there (expected {folder}/"
                          "model_index.json and generator/, as a training run writes in its final/ folder); run the "
                          "previous stage first (e.g. `effigen train --preset mnist-hmar` before mnist-hmar-mask)")
    index = read_json(folder / "model_index.json")
    source_class = (index.get("components") or {}).get("generator")
    if source_class == method.network_class.__name__ or index.get("method") in method.base_methods:
        return index
    also = f" or a folder of {', '.join(method.base_methods)}" if method.base_methods else ""
    raise ConfigError(f"init_from={path!r} holds a {source_class} generator (method {index.get('method')}); "
                      f"method {method.name} starts from a {method.network_class.__name__}{also}")


def build_experiment_dict(preset: str | None = None, config_file: str | None = None,
                          overrides: list[str] | None = None) -> dict[str, Any]:
    """Preset, then config file, then command-line overrides (later wins), as one nested dict."""
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in EXPERIMENT_PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(EXPERIMENT_PRESETS)} (see `effigen presets`)")
        data = apply_overrides(EXPERIMENT_PRESETS[preset], [])
    if config_file is not None:
        data = _deep_update(data, load_config_file(config_file))
    if overrides:
        data = apply_overrides(data, overrides)
    return data


def _deep_update(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def build_experiment_config(preset: str | None = None, config_file: str | None = None,
                            overrides: list[str] | None = None, num_classes: int | None = None) -> ExperimentConfig:
    return parse_experiment(build_experiment_dict(preset, config_file, overrides), num_classes)
