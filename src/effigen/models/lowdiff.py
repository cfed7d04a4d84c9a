"""LowDiff's one network for every stage of a low-to-high resolution cascade (Xu et al., arXiv 2509.15342).

LowDiff has no public code, and only its abstract could be read here (/work/shared/reference/next_wave.md §1). The
abstract establishes one unified model that refines from low resolution to the target; everything below about how
the network sees the stage and the low-resolution result is effigen's choice, not the paper's:

- The backbone is a config choice (`backbone`, a COMPONENTS-style class name looked up in BACKBONES; default DiT with
  `any_resolution=True`, i.e. 2-D RoPE positions only), called as `backbone(x, t, labels)`. Any network with that
  signature that accepts several grid sizes plugs in; DiCo (a conv U-Net, any multiple of 4 px) is the second.
- The stage is given as `stage_channels` learned constant input planes per stage (not an addition to the timestep
  embedding), so that the backbone needs no extra argument. [choice, not in the abstract]
- mode "concat": the input is [x_t, up(x_low) noised to level s, stage planes, a plane of value s] along channels.
  Stage 0 has a zero condition. mode "init": the input is [x_t, stage planes]; the condition enters through the
  sampler's start point (objectives/lowdiff.py). [both choices: the paper does not say which it uses]
- The backbone is built with the extra input channels; its output has as many channels as its input, of which the
  first `in_channels` are the prediction (the other output channels are never trained and stay at their zero init).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .dico import DiCo
from .dit import DiT

BACKBONES: dict[str, type] = {"DiT": DiT, "DiCo": DiCo}  # name -> class with config_class and forward(x, t, labels)


@dataclass
class LowDiffConfig:
    input_size: int = 32  # the final (largest) resolution, pixels or latent cells
    in_channels: int = 3
    num_classes: int = 10
    resolutions: tuple[int, ...] = (8, 16, 32)  # the cascade, increasing, last = input_size
    mode: Literal["concat", "init"] = "concat"
    stage_channels: int = 1  # learned constant input planes that name the stage
    backbone: str = "DiT"
    backbone_config: dict = field(default_factory=lambda: {"rope": True, "any_resolution": True})

    def __post_init__(self):
        self.resolutions = tuple(int(r) for r in self.resolutions)
        check_resolutions(self.resolutions, self.input_size)
        if self.mode not in ("concat", "init"):
            raise ValueError(f"mode must be 'concat' or 'init', got {self.mode!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {', '.join(BACKBONES)}")
        if self.stage_channels < 1:
            raise ValueError(f"stage_channels must be >= 1, got {self.stage_channels}")

    @property
    def num_stages(self) -> int:
        return len(self.resolutions)

    @property
    def backbone_in_channels(self) -> int:
        if self.mode == "concat":  # x_t, condition, stage planes, augmentation-level plane
            return 2 * self.in_channels + self.stage_channels + 1
        return self.in_channels + self.stage_channels


def check_resolutions(resolutions: tuple[int, ...], final: int) -> None:
    """A clear error for a schedule that cannot reach `final` by average pooling."""
    if not resolutions:
        raise ValueError("resolutions is empty: give the cascade, e.g. [8, 16, 32]")
    if resolutions[-1] != final:
        raise ValueError(f"the resolution schedule {list(resolutions)} ends at {resolutions[-1]}, but the data (or latent "
                         f"grid) is {final}: make the last resolution {final}")
    if any(b <= a for a, b in zip(resolutions, resolutions[1:])):
        raise ValueError(f"resolutions {list(resolutions)} must increase strictly (low to high)")
    for r in resolutions:
        if r < 1 or final % r:
            raise ValueError(f"resolution {r} in {list(resolutions)} cannot be reached from {final} by average pooling "
                             f"({final} is not a multiple of {r}); use divisors of {final}")


class LowDiffNet(nn.Module):
    config_class = LowDiffConfig

    def __init__(self, config: LowDiffConfig):
        super().__init__()
        self.config = config
        cls = BACKBONES[config.backbone]
        backbone_data = {**config.backbone_config, "input_size": config.input_size,
                         "in_channels": config.backbone_in_channels, "num_classes": config.num_classes}
        patch = backbone_data.get("patch_size", getattr(cls.config_class, "patch_size", 1))
        for r in config.resolutions:
            if r % patch:
                raise ValueError(f"resolution {r} of the cascade {list(config.resolutions)} is not a multiple of the "
                                 f"backbone's patch_size {patch}; use a smaller patch or other resolutions")
        self.backbone = cls(cls.config_class(**backbone_data))
        self.stage_embed = nn.Parameter(torch.randn(config.num_stages, config.stage_channels) * 0.02)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, stage: int,
                cond: torch.Tensor | None = None, aug_level: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, H) at resolutions[stage]; t: (B,); cond: (B, C, H, H) the upsampled (and noised) low-resolution
        result, concat mode only (None: zeros, stage 0); aug_level: (B,) its noise level s. Returns (B, C, H, H)."""
        c = self.config
        if not 0 <= stage < c.num_stages:
            raise ValueError(f"stage {stage} out of range for {c.num_stages} stages")
        B, C, H, W = x.shape
        if H != c.resolutions[stage] or W != H or C != c.in_channels:
            raise ValueError(f"stage {stage} takes (B, {c.in_channels}, {c.resolutions[stage]}, {c.resolutions[stage]}), "
                             f"got {tuple(x.shape)}")
        planes = [x]
        if c.mode == "concat":
            cond = torch.zeros_like(x) if cond is None else cond
            if cond.shape != x.shape:
                raise ValueError(f"the condition must have x's shape {tuple(x.shape)}, got {tuple(cond.shape)}")
            s = torch.zeros(B, device=x.device) if aug_level is None else aug_level
            planes.append(cond.to(x.dtype))
        elif cond is not None:
            raise ValueError("mode 'init' takes no condition input: the low-resolution result is the start point")
        planes.append(self.stage_embed[stage].to(x.dtype).view(1, -1, 1, 1).expand(B, -1, H, W))
        if c.mode == "concat":
            planes.append(s.to(x.dtype).view(B, 1, 1, 1).expand(B, 1, H, W))
        return self.backbone(torch.cat(planes, dim=1), t, labels)[:, :C]


LOWDIFF_PRESETS: dict[str, dict] = {
    # DiT-Ti/4 blocks (as mnist-sit's backbone) with 2-D RoPE only; 8 -> 16 -> 32 px: 4, 16, 64 tokens
    "LowDiff-DiT-Ti/4": dict(backbone="DiT", backbone_config=dict(depth=4, hidden_size=192, num_heads=3, patch_size=4,
                                                                  rope=True, any_resolution=True)),
    # DiCo-Ti's conv U-Net (5.0M) as the backbone: resolutions must be multiples of 4 (8 -> 16 -> 32)
    "LowDiff-DiCo-Ti": dict(backbone="DiCo", backbone_config=dict(hidden_size=64, depth=[2, 2, 2, 2, 2], mlp_ratio=2)),
}
