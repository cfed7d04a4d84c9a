"""The frozen-teacher interface: what REPA, HASTE, VA-VAE, BFM and RAE ask of a non-generative vision encoder.

A teacher takes images as the library holds them, float (B, 3, H, W) in [-1, 1], applies its own normalisation and
resize, and returns

    features(images, grid=None)              -> (B, N, C) patch tokens, N = grid * grid (CLS and registers dropped)
    attention_logits(images, layers, grid=None) -> {layer: (B, heads, N, N)} pre-softmax logits q k^T / sqrt(d) between
                                                patch tokens (CLS and register rows and columns dropped)

`grid` is the side of the token grid the caller (a student network) wants; None = the teacher's own grid at its
default input resolution. A teacher whose position table interpolates (DINOv2, the built-in ViT) resizes the images
to `grid * patch_size` pixels, so its tokens land on the student's grid exactly, as REPA and HASTE do (256 px ImageNet
-> 224 px for DINOv2-B/14 -> 16 x 16 tokens = SiT-XL/2's 16 x 16). A teacher with a fixed grid (a convolutional
feature net) resamples its token grid with `resample_tokens`; grids that are not square, or whose sides do not divide
one another, cannot be mapped and raise `TeacherError` naming both and the fix.

Teachers are frozen (`requires_grad_(False)`, eval mode) and run without gradient by the objectives that use them.
Loading: `effigen.teachers.load_teacher("dinov2-vitb14-reg=PATH")` or a built-in name (see `teachers/__init__.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TeacherError(ValueError):
    """A teacher is missing, unreadable, or cannot serve the student's token grid. The message says how to fix it."""


class Teacher(nn.Module):
    """Base of the frozen vision encoders. Subclasses set `name`, `patch_size`, `embed_dim`, `num_heads` (0: no
    attention maps), `depth`, `native_grid`, `interpolates` and implement `_features` / `_attention_logits` at a
    grid they support (`interpolates`: any grid, by resizing the input; else only `native_grid`)."""

    name: str = "teacher"
    patch_size: int = 1
    embed_dim: int = 0
    num_heads: int = 0
    depth: int = 0
    native_grid: int = 0
    interpolates: bool = False

    def frozen(self) -> "Teacher":
        return self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "Teacher":  # a teacher never leaves eval mode (dropout, norms)
        return super().train(False)

    # -------------------------------------------------------------- public interface
    def grid_for(self, grid: int | None) -> int:
        """The grid the teacher itself runs at to serve `grid` (its tokens are then resampled if they differ)."""
        if grid is not None and (isinstance(grid, bool) or int(grid) != grid or grid < 1):
            raise TeacherError(f"a token grid side is a positive int, got {grid!r}")
        grid = None if grid is None else int(grid)
        if grid is None or self.interpolates:
            return grid or self.native_grid
        check_grid_mapping(self.native_grid, grid, self.name)
        return self.native_grid

    @torch.no_grad()
    def features(self, images: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        _check_images(images, self.name)
        own = self.grid_for(grid)
        tokens = self._features(images.float(), own)  # (B, own^2, C)
        return tokens if grid is None or own == grid else resample_tokens(tokens, grid)

    @torch.no_grad()
    def attention_logits(self, images: torch.Tensor, layers, grid: int | None = None) -> dict[int, torch.Tensor]:
        if self.num_heads == 0:
            raise TeacherError(f"the {self.name} teacher has no attention maps (it is not a transformer); HASTE's "
                               "attention alignment needs a ViT teacher, e.g. the built-in mnist-vit or dinov2-*")
        _check_images(images, self.name)
        layers = [int(i) for i in ([layers] if isinstance(layers, int) else layers)]
        if not layers:
            raise TeacherError(f"attention_logits needs at least one layer of the {self.name} teacher "
                               f"(0..{self.depth - 1})")
        bad = [i for i in layers if not 0 <= i < self.depth]
        if bad:
            raise TeacherError(f"teacher layers {bad} do not exist: the {self.name} teacher has blocks 0..{self.depth - 1}")
        own = self.grid_for(grid)
        if grid is not None and own != grid:
            raise TeacherError(f"the {self.name} teacher's attention maps are {own}x{own} tokens and cannot be "
                               f"resampled to the student's {grid}x{grid} as logits; use probabilities "
                               f"(resample_attention_probs) or a student with a {own}x{own} token grid")
        return self._attention_logits(images.float(), layers, own)

    # -------------------------------------------------------------- for subclasses
    def _features(self, images: torch.Tensor, grid: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _attention_logits(self, images: torch.Tensor, layers: list[int], grid: int) -> dict[int, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover


def _check_images(images: torch.Tensor, name: str) -> None:
    """Float (B, 3, H, W) in [-1, 1]. Values a little outside (a sampler's overshoot) pass; beyond 2 they are surely
    0..255 pixels, and integer images are refused rather than guessed at."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise TeacherError(f"the {name} teacher takes images (B, 3, H, W) in [-1, 1], got {shape}")
    if not images.is_floating_point():
        raise TeacherError(f"the {name} teacher takes float images in [-1, 1], got {images.dtype}; convert 0..255 "
                           "pixels with images.float() / 127.5 - 1")
    peak = float(images.detach().abs().max()) if images.numel() else 0.0
    if not peak <= 2.0:  # also catches NaN
        raise TeacherError(f"the {name} teacher takes images in [-1, 1] but got values up to {peak:.4g}; convert 0..255 "
                           "pixels with images / 127.5 - 1 (and 0..1 pixels with 2 * images - 1)")


def check_grid_mapping(teacher_grid: int, student_grid: int, name: str = "teacher") -> None:
    """A fixed teacher grid maps onto a student grid when one side divides the other (pooling or repeating)."""
    if teacher_grid <= 0 or student_grid <= 0 or (teacher_grid % student_grid and student_grid % teacher_grid):
        raise TeacherError(
            f"the {name} teacher's {teacher_grid}x{teacher_grid} token grid cannot map onto the student's "
            f"{student_grid}x{student_grid} tokens (neither side divides the other); change the student's patch size "
            f"or resolution so that its token grid divides or is a multiple of {teacher_grid}, or use a teacher that "
            "interpolates its positions (a ViT)")


def square_side(num_tokens: int, what: str = "token grid") -> int:
    side = int(round(num_tokens ** 0.5))
    if side * side != num_tokens:
        raise TeacherError(f"the {what} has {num_tokens} tokens, not a square grid; alignment needs square grids")
    return side


def resample_tokens(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, N, C) tokens of a square grid -> (B, side^2, C): area-average when shrinking by an integer factor, nearest
    repetition when growing by one (so an aligned student block sees one teacher token per patch), bilinear otherwise."""
    B, N, C = tokens.shape
    own = square_side(N)
    if own == side:
        return tokens
    grid = tokens.transpose(1, 2).reshape(B, C, own, own)
    if own % side == 0:
        grid = F.avg_pool2d(grid, own // side)
    elif side % own == 0:
        grid = grid.repeat_interleave(side // own, 2).repeat_interleave(side // own, 3)
    else:
        grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


def resample_attention_probs(probs: torch.Tensor, side: int) -> torch.Tensor:
    """(B, H, N, N) attention probabilities over a square grid -> (B, H, side^2, side^2): both the query and the key
    axes resampled as `resample_tokens` does, then each row renormalised to sum to 1."""
    B, H, N, _ = probs.shape
    own = square_side(N)
    if own == side:
        return probs
    rows = resample_tokens(probs.reshape(B * H, N, N), side)  # queries: (B*H, side^2, N)
    cols = resample_tokens(rows.transpose(1, 2), side).transpose(1, 2)  # keys: (B*H, side^2, side^2)
    cols = cols.clamp(min=0)
    return (cols / cols.sum(-1, keepdim=True).clamp(min=1e-12)).reshape(B, H, side * side, side * side)
