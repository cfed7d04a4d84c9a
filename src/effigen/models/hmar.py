"""HMAR: Hierarchical Masked AutoRegressive image generation (Kumbong et al., CVPR 2025, arXiv 2506.04421).

HMAR keeps VAR's tokenizer and token pyramid r_1..r_K but makes next-scale prediction Markovian: scale k is
predicted from the class and the tokenizer's accumulated latent f_hat after scales 1..k-1 (area-downsampled to side
s_k, exactly VAR's teacher-forcing input) alone, p(r_k | f_hat_<k, class). So attention is block-diagonal (a token
sees its own scale only; `effigen.nn.attention.BlockMask`), and sampling runs each scale on its own s_k^2 tokens with
no KV cache. Inside a scale, a masked-prediction branch re-predicts the least confident tokens over a schedule of
steps (`effigen.samplers.hmar`).

The network is VAR's blocks (`effigen.models.var.AdaLNSelfAttn`, `AdaLNBeforeHead`, `SharedAdaLin`, imported, not
copied) arranged as in the official `HMAR` module, with its parameter names, so the converter
(`effigen.convert.hmar_official`) is a validated copy:

    trunk          base_blocks   depth - n_layers_train blocks, shared by both branches
    next-scale     ns_blocks     n_layers_train blocks, then ns_head_nm (adaLN) and ns_head (linear to the codebook)
    mask branch    mask_blocks   n_layers_train blocks, then mask_head_nm and mask_head; `mask_embed` (one vector)
    inputs         word_embed (Linear Cvae -> C, no bias) + word_embed_bias, class_emb (start token and adaLN
                   condition, the null class last), pos_start, pos_1LC (per position), lvl_embed (per scale)

Inputs. Next-scale branch at scale k >= 2: word_embed(f_hat_<k downsampled) + word_embed_bias + level/position;
scale 1: class embedding + pos_start + level/position (as VAR). Mask branch at scale k >= 2:
word_embed(f_hat_<k downsampled) + word_embed(scale k's own code map through phi_k, downsampled), the second term
replaced by `mask_embed` at masked positions, + word_embed_bias + level/position.

Training happens in two stages (`effigen.objectives.hmar`): next-scale prediction of trunk + ns branch (the mask
branch frozen), then a fine-tune of the mask branch alone (initialised from the ns branch) with random masks.

The depth dial is VAR's (width 64 x depth, heads = depth); the released models are HMAR-d16/d20/d24/d30 with
n_layers_train = 8. Licence of the official code and weights: NVIDIA One-Way Noncommercial License (NSCLv1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.attention import BlockMask
from ..nn.layers import Linear
from ..nn.taps import NO_TAPS, Features, TapRecorder, Taps, record_taps
from .var import (AdaLNBeforeHead, AdaLNSelfAttn, ScalePyramidInputs, VAR_PRESETS, VARConfig, init_next_scale_weights,
                  scale_blocks)


@dataclass
class HMARConfig(VARConfig):
    # blocks of each branch (ns, mask); the shared trunk has depth - n_layers_train. 0: min(8, depth // 2) (the
    # released models: 8 at depth 16-30), so that `depth` alone stays the size dial
    n_layers_train: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.n_layers_train == 0:
            self.n_layers_train = max(1, min(8, self.depth // 2))
        if not 1 <= self.n_layers_train <= self.depth:
            raise ValueError(f"n_layers_train={self.n_layers_train} must be in [1, depth={self.depth}]: each branch has "
                             "n_layers_train blocks on a trunk of depth - n_layers_train")


_VAR_SIZE_KEYS = ("depth", "drop_path_rate", "init_adaln_gamma", "shared_aln", "scales")
HMAR_PRESETS: dict[str, dict] = {
    # the released sizes (256 px, n_layers_train 8; optimisation settings as VAR's of the same depth)
    **{f"HMAR-d{d}": {**{k: v for k, v in VAR_PRESETS[f"VAR-d{d}"].items() if k in _VAR_SIZE_KEYS}, "n_layers_train": 8}
       for d in (16, 20, 24, 30)},
    # small ones for built-in data on a CPU. HMAR-d4 matches VAR-d4's parameter count (5.12M vs 5.05M, +1.4%, on mnist-var's
    # tokenizer): the next-scale path has VAR-d4's 4 blocks, the mask branch 2 more, at width 208 (4 heads of 52).
    "HMAR-d4": {"depth": 4, "n_layers_train": 2, "embed_dim": 208, "num_heads": 4},
    "HMAR-Test": {"depth": 2, "embed_dim": 32, "num_heads": 2, "n_layers_train": 1},
}

# parameter-name prefixes of the mask branch (trained in stage 2, frozen in stage 1)
MASK_BRANCH = ("mask_blocks.", "mask_head_nm.", "mask_head.", "mask_embed.")


def is_mask_branch(name: str) -> bool:
    return name.startswith(MASK_BRANCH)


class HMAR(ScalePyramidInputs, nn.Module):
    config_class = HMARConfig

    def __init__(self, config: HMARConfig):
        super().__init__()
        self.config = config
        C, depth, n = config.embed_dim, config.depth, config.n_layers_train
        self.add_pyramid_inputs(config)
        # drop path rates as the two official training stages see them: block i of the depth-block transformer
        # gets rate i; the ns and mask blocks are its last n_layers_train blocks
        rates = torch.linspace(0, config.drop_path_rate, depth).tolist()
        self.base_blocks = nn.ModuleList([AdaLNSelfAttn(config, rates[i]) for i in range(depth - n)])
        self.ns_blocks = nn.ModuleList([AdaLNSelfAttn(config, rates[depth - n + i]) for i in range(n)])
        self.mask_blocks = nn.ModuleList([AdaLNSelfAttn(config, rates[depth - n + i]) for i in range(n)])
        self.ns_head_nm = AdaLNBeforeHead(C, config.norm_eps)
        self.ns_head = Linear(C, config.vocab_size)
        self.mask_head_nm = AdaLNBeforeHead(C, config.norm_eps)
        self.mask_head = Linear(C, config.vocab_size)
        self.word_embed = nn.Linear(config.latent_channels, C, bias=False)
        self.word_embed_bias = nn.Parameter(torch.zeros(C))
        self.mask_embed = nn.Embedding(1, C)
        # block-diagonal attention, computed scale by scale (no L x L mask)
        self.attention_blocks: BlockMask = scale_blocks(config.scales, "block_diagonal")
        init_next_scale_weights(self, config, self.blocks, [(self.ns_head_nm, self.ns_head),
                                                            (self.mask_head_nm, self.mask_head)], math.sqrt(1 / C / 3))

    @property
    def blocks(self) -> list[AdaLNSelfAttn]:
        """Every block (trunk, ns, mask): for per-block sharding (FSDP) and initialisation."""
        return [*self.base_blocks, *self.ns_blocks, *self.mask_blocks]

    # ------------------------------------------------------------------ training stages
    def set_trainable(self, stage: str) -> None:
        """`"next_scale"`: everything but the mask branch trains (stage 1); `"mask"`: only the mask branch (mask
        blocks, mask head, mask embedding) trains, as the official fine-tune (stage 2)."""
        if stage not in ("next_scale", "mask"):
            raise ValueError(f"unknown HMAR training stage {stage!r}; use 'next_scale' or 'mask'")
        for name, param in self.named_parameters():
            param.requires_grad_(is_mask_branch(name) == (stage == "mask"))

    @torch.no_grad()
    def copy_next_scale_to_mask_branch(self) -> None:
        """The official stage-2 initialisation (`MaskedPrediction.load_state_dict_with_word_embed` from the stage-1
        transformer, mapped by `HMAR.load_mask_dict`): mask blocks and head start as the ns blocks and head; the mask
        embedding keeps its own (trunc-normal) initialisation."""
        for target, source in ((self.mask_blocks, self.ns_blocks), (self.mask_head_nm, self.ns_head_nm),
                               (self.mask_head, self.ns_head)):
            target.load_state_dict(source.state_dict())

    # ------------------------------------------------------------------ pieces the sampler uses
    def scale_tokens(self, si: int, features: torch.Tensor) -> torch.Tensor:
        """Next-scale input of scale si >= 1 from the tokenizer's downsampled f_hat (B, s_si^2, Cvae)."""
        return self.word_embed(features.float()) + self.word_embed_bias + self.level_position(si)

    def mask_tokens(self, si: int, previous: torch.Tensor, current: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Mask-branch input of scale si >= 1: previous = downsampled f_hat of the coarser scales, current = the
        scale's own code map features (`quantize.scale_features`), both (B, s^2, Cvae); masked (B, s^2) bool."""
        own = torch.where(masked.unsqueeze(-1), self.mask_embed.weight.to(previous.dtype), self.word_embed(current.float()))
        return self.word_embed(previous.float()) + own + self.word_embed_bias + self.level_position(si)

    def _branch(self, x: torch.Tensor, cond: torch.Tensor, blocks: nn.ModuleList, head_nm: nn.Module, head: nn.Module,
                mask=None, recorder: TapRecorder = NO_TAPS) -> torch.Tensor:
        ada = self.shared_ada_lin(cond)
        for i, block in enumerate((*self.base_blocks, *blocks)):
            x = block(x, ada, mask, None, recorder.logits_tap(i))
            recorder.block_output(i, x)
        return head(head_nm(x.float(), cond)).float()

    def next_scale_logits(self, x: torch.Tensor, cond: torch.Tensor, mask=None,
                          recorder: TapRecorder = NO_TAPS) -> torch.Tensor:
        """Trunk + ns blocks + ns head on tokens x (B, l, C) (one scale at sampling time: no mask needed)."""
        return self._branch(x, cond, self.ns_blocks, self.ns_head_nm, self.ns_head, mask, recorder)

    def mask_logits(self, x: torch.Tensor, cond: torch.Tensor, mask=None, recorder: TapRecorder = NO_TAPS) -> torch.Tensor:
        """Trunk + mask blocks + mask head."""
        return self._branch(x, cond, self.mask_blocks, self.mask_head_nm, self.mask_head, mask, recorder)

    # ------------------------------------------------------------------ teacher-forced passes
    def forward(self, labels: torch.Tensor, teacher_input: torch.Tensor, mask_input: torch.Tensor | None = None,
                masked: torch.Tensor | None = None, taps: Taps | None = None) -> torch.Tensor | tuple[torch.Tensor, Features]:
        """Teacher-forced logits (B, L, V) of every scale at once, block-diagonal attention.

        Next-scale branch: labels (B,) (null class = num_classes), teacher_input (B, L - s_1^2, Cvae)
        (`quantize.teacher_forcing_input`). Mask branch, when `mask_input` (B, L - s_1^2, Cvae)
        (`quantize.current_scale_inputs`) and `masked` (B or 1, L) bool (True = replaced by mask_embed; never the
        first scale) are given. With `taps` (`effigen.nn.taps`), returns (logits, features) of the branch that runs:
        block index i counts along its path, the trunk's `base_blocks` (0..depth - n_layers_train - 1) then the
        branch's own blocks; tokens (B, L, D), attention logits (B, heads, L, L) (block-diagonal mask not applied)."""
        recorder = record_taps(taps, self.config.depth, "this HMAR branch (trunk + branch blocks)")
        self.check_teacher_input("teacher input", teacher_input)
        cond = self.class_condition(labels)
        B = labels.shape[0]
        sos = cond.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start
        previous = self.word_embed(teacher_input.float())
        if mask_input is None:
            x = torch.cat((sos, previous + self.word_embed_bias), dim=1)
        else:
            self.check_teacher_input("mask input", mask_input)
            L = self.pos_1LC.shape[1]
            if masked is None or masked.dim() != 2 or masked.shape[-1] != L:
                raise ValueError(f"the mask branch needs `masked`, a (B or 1, {L}) boolean tensor")
            if masked[:, : self.first_l].any():
                raise ValueError("the first scale cannot be masked (its input is the class token)")
            own = torch.where(masked[:, self.first_l :].unsqueeze(-1), self.mask_embed.weight.to(previous.dtype),
                              self.word_embed(mask_input.float()))
            x = torch.cat((sos, previous + own + self.word_embed_bias), dim=1)
        x = x + self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        if mask_input is None:
            return recorder.result(self.next_scale_logits(x, cond, self.attention_blocks, recorder))
        return recorder.result(self.mask_logits(x, cond, self.attention_blocks, recorder))
