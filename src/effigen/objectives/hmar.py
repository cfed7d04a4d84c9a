"""HMAR's two training stages (Kumbong et al., arXiv 2506.04421; official train.py/nsp_trainer.py, finetune.py/
mp_trainer.py), as one objective with a `stage` setting, each stage a run of effigen's Trainer.

Stage 1, `stage: next_scale` (preset `mnist-hmar`): next-scale prediction (`NextScalePrediction`, reused) of the
trunk + next-scale branch with block-diagonal attention (the network's `forward`), the cross-entropy re-weighted
per scale (`scale_weighting: lognorm`, HMAR's setting; `uniform` is VAR's), label dropout 0.1. The mask branch is
frozen (it gets no gradient in this stage).

Stage 2, `stage: mask` (preset `mnist-hmar-mask`): masked-refinement fine-tune. The run starts from stage 1's
folder (experiment key `init_from`); when that folder is a stage-1 run, the mask blocks and mask head start as copies
of the ns blocks and ns head (the official initialisation). Everything but the mask branch (mask blocks, mask head,
mask embedding) is frozen. Per sample, a mask ratio p ~ U(0, 1) is drawn and at every scale after the first
ceil(p s_k^2) random positions are replaced by the mask embedding; the loss is the cross-entropy on the masked
positions only, averaged per sample then over the batch (official `mask_unweighted`). All draws come from the
trainer's BatchRandom (exact resume; DDP equals one process).

Deviation from the official fine-tune: it draws one ratio and one set of positions per step, shared by the whole
batch; here every sample has its own (the same distribution per sample, more varied batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..models.hmar import MASK_BRANCH
from ..nn.losses import token_cross_entropy
from ..rng import BatchRandom
from ..config import ConfigError
from ..samplers.hmar import HMARSamplerConfig, evaluations, sample_hmar, validate_mask_schedule
from .next_scale import NextScaleConfig, NextScalePrediction, unwrap


@dataclass
class HMARObjectiveConfig(NextScaleConfig):
    scale_weighting: Literal["uniform", "lognorm"] = "lognorm"  # stage 1 only (HMAR: lognorm)
    stage: Literal["next_scale", "mask"] = "next_scale"


def draw_masks(scales: tuple[int, ...], random: BatchRandom, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample a ratio p ~ U(0, 1) and, at every scale after the first, ceil(p s^2) uniformly random positions.
    Returns (masked (B, L) bool, p (B,))."""
    ratio = random.rand()
    scores = random.rand(sum(s * s for s in scales))
    masks = [torch.zeros(ratio.shape[0], scales[0] ** 2, dtype=torch.bool, device=scores.device)]
    start = scales[0] ** 2
    for side in scales[1:]:
        n = side * side
        count = torch.ceil(ratio * n).clamp(max=n)
        rank = scores[:, start : start + n].argsort(dim=1).argsort(dim=1)
        masks.append(rank < count.unsqueeze(1))
        start += n
    return torch.cat(masks, dim=1).to(device), ratio.to(device)


class HMARObjective(NextScalePrediction):
    config_class = HMARObjectiveConfig
    sampler_config_class = HMARSamplerConfig

    def __init__(self, config, num_classes: int, tokenizer: nn.Module | None = None):
        super().__init__(config, num_classes, tokenizer)
        self._checked = False

    # ------------------------------------------------------------------ set-up hooks (effigen.training.run)
    def prepare_network(self, network: nn.Module) -> None:
        """Freeze what this stage does not train (before the trainer builds its optimizer)."""
        unwrap(network).set_trainable(self.config.stage)

    def init_from_state(self, network: nn.Module, state: dict[str, torch.Tensor], source: dict[str, Any],
                        where: str) -> str:
        """Load a pipeline folder's generator weights (`init_from`); from a stage-1 folder into a stage-2 run, the
        mask branch starts as a copy of the next-scale branch. Returns what was done, for the log."""
        from ..io import load_state_dict_strict

        network = unwrap(network)
        load_state_dict_strict(network, state, where)
        source_stage = (source.get("objective") or {}).get("stage", "next_scale")
        if self.config.stage == "mask" and source_stage == "next_scale":
            network.copy_next_scale_to_mask_branch()
            return "stage-1 weights; mask blocks and head initialised from the next-scale blocks and head"
        return f"stage-{1 if source_stage == 'next_scale' else 2} weights, loaded as they are"

    def _check_frozen(self, network: nn.Module) -> None:
        if self._checked:
            return
        wrong = [name for name, p in unwrap(network).named_parameters()
                 if p.requires_grad != (name.startswith(MASK_BRANCH) == (self.config.stage == "mask"))]
        if wrong:
            raise RuntimeError(f"HMAR stage {self.config.stage!r} trains the wrong parameters (e.g. {wrong[0]}): call "
                               "objective.prepare_network(network) before building the Trainer (effigen train does)")
        self._checked = True

    # ------------------------------------------------------------------ losses
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], random: BatchRandom) -> dict[str, torch.Tensor]:
        self._check_frozen(model)
        if self.config.stage == "next_scale":
            return super().loss(model, batch, random)
        indices = self.tokenize(batch["images"])
        quant = self.tokenizer.quantize
        with torch.no_grad(), torch.autocast(batch["images"].device.type, enabled=False):
            teacher = quant.teacher_forcing_input(indices)
            current = quant.current_scale_inputs(indices)
        labels = self.drop_labels(batch["labels"], random)
        masked, ratio = draw_masks(tuple(self.tokenizer.scales), random, teacher.device)
        logits = model(labels, teacher, current, masked)
        target = torch.cat(indices, dim=1)
        per_token = token_cross_entropy(logits, target, self.config.label_smoothing, "none").view(target.shape)
        weights = masked.float()
        counts = weights.sum(1)
        loss = ((per_token * weights).sum(1) / counts.clamp(min=1)).mean()
        with torch.no_grad():
            correct = (logits.argmax(-1) == target).float()
            accuracy = (correct * weights).sum() / counts.sum().clamp(min=1)
        return {"loss": loss, "accuracy_masked": accuracy, "mask_ratio": ratio.mean()}

    # ------------------------------------------------------------------ sampling
    def sample(self, network: nn.Module, labels: torch.Tensor, shape, settings: HMARSamplerConfig,
               generator: torch.Generator | None = None, edit=None) -> torch.Tensor:
        tokenizer = self._tokenizer_on(labels.device)
        if self.config.stage == "next_scale":  # a stage-1 model: its mask branch was never trained
            schedule = validate_mask_schedule(settings.mask_schedule, tuple(tokenizer.scales))
            if any(len(steps) > 1 for steps in schedule):
                raise ConfigError("this HMAR has not been through stage 2 (objective stage next_scale): its mask branch "
                                  "is untrained, so refinement would use random weights; sample with --schedule off "
                                  "(mask_schedule: off) or train the mask stage first (e.g. --preset mnist-hmar-mask)")
        return sample_hmar(unwrap(network), tokenizer, labels, settings, generator, edit)

    def evaluations_per_sample(self, settings: HMARSamplerConfig) -> int:
        return evaluations(settings, tuple(self.tokenizer.scales))

