"""Representation alignment of a generator's hidden tokens to a frozen vision encoder: REPA (Yu et al., arXiv
2410.06940) and HASTE (Wang et al., arXiv 2505.16792), for every transformer generator that has feature taps
(`nn/taps.py`: DiT, SiT and LightningDiT through `models/dit.py`), wrapped around its own objective.

REPA. The hidden tokens h of block `block` (1-indexed, REPA's `encoder_depth`) of the network's forward on the noisy
input go through a projector MLP h_phi (Linear-SiLU-Linear-SiLU-Linear, width `projector_dim`) and are aligned to the
teacher's patch tokens y* of the clean image by a negative cosine, averaged over tokens and images:

    L = L_denoise + proj_coeff * L_proj,     L_proj = -1/(B N) sum_{b, n} cos(h_phi(h_{b,n}), y*_{b,n})

(REPA's `loss.py`; proj_coeff 0.5, encoder_depth 8 for SiT-XL/2 and 4 for B/2, projector 2048.) The teacher sees the
clean images (for a latent generator: its tokenizer's decoding of the training latents, since effigen's latent cache
holds latents only; REPA's own loader keeps the raw image beside the latent), resized so that its token grid equals the
student's (`teachers/base.py`).

HASTE adds attention alignment: for paired layers (student blocks `student_layers` <-> teacher blocks
`teacher_layers`, 0-based; default the 4 student blocks up to `block` and the teacher's last 4, as HASTE's SiT-XL/2
blocks 4..7 <-> DINOv2-B blocks 8..11) and the first `heads` heads paired by index, the cross-entropy between the
teacher's attention distribution p = softmax(teacher logits over patch keys) and the student's q = softmax(student
logits), -sum_k p_k log q_k, averaged over images, heads and queries, then over the layer pairs:

    L = L_denoise + proj_coeff * L_proj + attn_coeff * L_attn       (HASTE: 0.5 and 0.5, temperature 1)

and both terms stop at `stop_step` (HASTE's `--early-stop-point`): from that optimizer step on the loss is the
denoising loss alone and the teacher is not run. The step comes from the trainer's step-keyed random stream, so a run
killed on either side of the switch resumes exactly. If the teacher's token grid differs from the student's, its
attention probabilities are resampled on both axes and renormalised (next_wave.md's CPU-scale note).

The projector is trained with the network (the trainer's auxiliary modules: optimizer, DDP, checkpoints in
`train_state/auxiliary.safetensors`) and is not part of the sampling pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.taps import Taps
from ..teachers import resample_attention_probs


@dataclass
class ProjectorConfig:
    in_dim: int = 1152  # the generator's hidden size
    hidden_dim: int = 2048  # REPA's projector_dim
    out_dims: tuple[int, ...] = (768,)  # one projector per teacher (REPA's z_dims), each to that teacher's width


class Projectors(nn.Module):
    """REPA's projectors: per teacher an MLP Linear(D, 2048) - SiLU - Linear(2048, 2048) - SiLU - Linear(2048, C)
    from the generator's hidden tokens to the teacher's feature width. Parameter names follow the official
    `models/sit.py` (`projectors.0.0.weight`, `projectors.0.2.weight`, `projectors.0.4.weight`), so the projectors
    of a released REPA checkpoint load as they are. A pipeline component (saved with training state, dropped from
    the sampling folder unless kept on purpose)."""

    config_class = ProjectorConfig

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        self.projectors = nn.ModuleList(
            nn.Sequential(nn.Linear(config.in_dim, config.hidden_dim), nn.SiLU(),
                          nn.Linear(config.hidden_dim, config.hidden_dim), nn.SiLU(),
                          nn.Linear(config.hidden_dim, out_dim))
            for out_dim in config.out_dims
        )

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(B, N, D) -> one (B, N, C_k) tensor per teacher."""
        return [projector(tokens) for projector in self.projectors]


@dataclass
class AlignConfig:
    """The experiment's `align` section (`effigen train --align repa|haste`)."""

    method: Literal["none", "repa", "haste"] = "none"
    teacher: str = ""  # a built-in teacher (mnist-vit, mnist-net) or dinov2-vitb14[-reg]=PATH; "" = the data's built-in
    block: int = 4  # 1-indexed block whose output tokens are projected (REPA's encoder_depth)
    projector_dim: int = 2048
    proj_coeff: float = 0.5
    attn_coeff: float = 0.5  # haste
    student_layers: tuple[int, ...] = ()  # haste, 0-based; () = the min(4, block) blocks ending at `block`
    teacher_layers: tuple[int, ...] = ()  # haste, 0-based; () = the teacher's last len(student_layers) blocks
    heads: int = 0  # haste: heads paired one to one by index; 0 = min(student heads, teacher heads)
    stop_step: int = 0  # haste's termination: from this optimizer step on, denoising loss only (0 = never)

    def __post_init__(self):
        if self.block < 1:
            raise ValueError(f"align.block={self.block} is REPA's 1-indexed encoder_depth; use 1 or more")
        if self.stop_step < 0 or self.projector_dim < 1 or self.heads < 0:
            raise ValueError("align.stop_step and align.heads must be >= 0 and align.projector_dim >= 1")
        if len(self.student_layers) != len(self.teacher_layers) and self.teacher_layers:
            raise ValueError(f"align.student_layers {list(self.student_layers)} and align.teacher_layers "
                             f"{list(self.teacher_layers)} must pair one to one")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def attention_pairs(self, student_depth: int, teacher_depth: int) -> list[tuple[int, int]]:
        students = list(self.student_layers) or list(range(max(0, self.block - 4), self.block))
        teachers = list(self.teacher_layers) or list(range(teacher_depth - len(students), teacher_depth))
        if len(students) != len(teachers) or min(teachers, default=0) < 0:
            raise ValueError(f"HASTE pairs student blocks {students} with teacher blocks {teachers}: the teacher has "
                             f"only {teacher_depth} blocks; set align.teacher_layers")
        bad = [i for i in students if not 0 <= i < student_depth] + [i for i in teachers if not 0 <= i < teacher_depth]
        if bad:
            raise ValueError(f"align layers {bad} do not exist (student blocks 0..{student_depth - 1}, teacher blocks "
                             f"0..{teacher_depth - 1})")
        return list(zip(students, teachers))


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA's projection loss: the negative cosine between projected student tokens (B, N, C) and teacher tokens
    (B, N, C), averaged over tokens and images (in [-1, 1]; -1 = aligned)."""
    if projected.shape != target.shape:
        raise ValueError(f"projected student tokens {tuple(projected.shape)} and teacher tokens {tuple(target.shape)} "
                         "must have the same shape")
    return -(F.normalize(projected.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1).mean()


def attention_alignment_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """HASTE's attention loss for one layer pair: -sum_k p_k log softmax(student)_k, the mean over images, heads and
    queries. student_logits (B, H, N, N) pre-softmax; teacher_probs (B, H, N, N) rows summing to 1."""
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student attention {tuple(student_logits.shape)} and teacher attention "
                         f"{tuple(teacher_probs.shape)} must have the same shape")
    return -(teacher_probs.float() * F.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()


class _TappedModel(nn.Module):
    """Calls the (possibly DDP-wrapped) network with `taps` and keeps the features of the last call, so the wrapped
    objective's own loss code runs unchanged."""

    def __init__(self, model: nn.Module, taps: Taps):
        super().__init__()
        self.model = model
        self.taps = taps
        self.features = None

    def forward(self, *args, **kwargs):
        out, self.features = self.model(*args, taps=self.taps, **kwargs)
        return out


def _depth(network: nn.Module) -> int:
    return len(network.blocks)


class AlignedObjective:
    """`objective` (a flow or DDPM objective) with REPA / HASTE terms added to its loss. Sampling, configs and every
    other member are the wrapped objective's; the projector is an auxiliary module of the trainer."""

    def __init__(self, objective, config: AlignConfig, teacher, network: nn.Module, tokenizer: nn.Module | None = None):
        if not config.enabled:
            raise ValueError("AlignedObjective needs align.method repa or haste")
        self.objective = objective
        self.config = config
        self.teacher = teacher.frozen()
        self.tokenizer = tokenizer
        net_config = network.config
        depth = _depth(network)
        if config.block > depth:
            raise ValueError(f"align.block={config.block} (1-indexed) but the network has {depth} blocks; use 1..{depth}")
        self.block = config.block - 1
        self.pairs: list[tuple[int, int]] = []
        self.heads = 0
        if config.method == "haste":
            if teacher.num_heads == 0:
                raise ValueError(f"HASTE aligns attention maps, and the {teacher.name} teacher has none; use a ViT "
                                 "teacher (mnist-vit, dinov2-*)")
            self.pairs = config.attention_pairs(depth, teacher.depth)
            self.heads = config.heads or min(net_config.num_heads, teacher.num_heads)
            if self.heads > min(net_config.num_heads, teacher.num_heads):
                raise ValueError(f"align.heads={self.heads} but the student has {net_config.num_heads} heads and the "
                                 f"teacher {teacher.num_heads}")
        self.taps = Taps(blocks=(self.block,), attention=tuple(s for s, _ in self.pairs))
        self.projectors = Projectors(ProjectorConfig(net_config.hidden_size, config.projector_dim, (teacher.embed_dim,)))
        self._projectors: nn.Module = self.projectors

    def __getattr__(self, name):  # everything else (sample, configs, evaluations_per_sample, ...) is the objective's
        if name == "objective":
            raise AttributeError(name)
        return getattr(self.objective, name)

    # the trainer optimises, wraps (DDP) and checkpoints the projector as an auxiliary module
    def trainable_modules(self) -> nn.Module:
        return self.projectors

    def bind_trainable(self, wrapped: nn.Module) -> None:
        self._projectors = wrapped

    def active(self, step: int) -> bool:
        return self.config.stop_step <= 0 or step < self.config.stop_step

    @torch.no_grad()
    def _teacher_inputs(self, batch_images: torch.Tensor) -> torch.Tensor:
        if self.tokenizer is None:
            return batch_images.float()
        return self.tokenizer.decode(batch_images.float()).float().clamp(-1, 1)  # a latent generator's images

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random) -> dict[str, torch.Tensor]:
        step = random.key[1]
        if not self.active(step):
            out = self.objective.loss(model, batch, random)
            zero = torch.zeros((), device=out["loss"].device)
            out["proj_loss"] = zero
            if self.pairs:
                out["attn_loss"] = zero
            return out
        tapped = _TappedModel(model, self.taps)
        out = self.objective.loss(tapped, batch, random)
        features = tapped.features
        tokens = features.blocks[self.block]  # (B, L, D)
        side = math.isqrt(tokens.shape[1])
        self.teacher.to(tokens.device)
        images = self._teacher_inputs(batch["images"])
        with torch.autocast(tokens.device.type, enabled=False):
            target = self.teacher.features(images, grid=side)  # (B, L, C), no grad
        projected = self._projectors(tokens)[0]
        proj = repa_loss(projected, target)
        loss = out["loss"] + self.config.proj_coeff * proj
        out["proj_loss"] = proj.detach()
        if self.pairs:
            with torch.autocast(tokens.device.type, enabled=False):
                grid = side if self.teacher.interpolates else None  # else resample its probabilities below
                teacher_logits = self.teacher.attention_logits(images, [t for _, t in self.pairs], grid=grid)
            attn = 0.0
            for student_layer, teacher_layer in self.pairs:
                probs = torch.softmax(teacher_logits[teacher_layer][:, : self.heads].float(), dim=-1)
                probs = resample_attention_probs(probs, side)
                attn = attn + attention_alignment_loss(features.attention[student_layer][:, : self.heads], probs)
            attn = attn / len(self.pairs)
            loss = loss + self.config.attn_coeff * attn
            out["attn_loss"] = attn.detach()
        out["loss"] = loss
        return out
