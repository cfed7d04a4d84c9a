"""What a tokenizer produces, declared by the tokenizer itself: the protocol generators and the trainer ask
instead of testing a tokenizer's class.

Every tokenizer class (`KLVAE`, `MultiScaleVQ`, and the ones to come: residual VQ, RAE, the 1D detail tokenizer)
implements

    @classmethod
    def output_of(cls, config) -> LatentSpace | TokenSpace     # from the config alone (no weights needed)

and inherits `TokenizerOutput.output` (the same for a built tokenizer). Two kinds exist:

- `LatentSpace`: continuous latents of shape (channels, *size) (a (C, h, w) grid, or a (N, C)-token set with
  `size=(N,)`), normalised as the tokenizer's `encode` returns them (`normalized=True`: unit variance per channel
  or the scalar scaling of SD-VAE). Diffusion and flow generators denoise these; the trainer caches them once.
- `TokenSpace`: discrete token ids from a `vocab_size` codebook, laid out as `layout`:
  "multiscale" (VAR: one square map per side in `scales`, coarse to fine; one scale = a plain raster grid),
  "residual" (ResGen: `depth` codes per position of a `scales[-1]`^2 grid), "sequence" (DetailFlow: a 1D sequence
  of `length` tokens). `embed_dim` is the width of a code's embedding (VAR's Cvae, which the generator embeds).

A generator method names the kinds and layouts it accepts (`registry.Method.accepts`); a tokenizer whose output
is not accepted is refused with a message naming both. `network_inputs()` is what a generator network derives
from the tokenizer (its config keys; a network takes those it has fields for).
"""

from __future__ import annotations

import torch

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class LatentSpace:
    """Continuous latents (what `encode` returns and `decode` takes)."""

    channels: int
    size: tuple[int, ...]  # (h, w) of a grid, or (N,) for a set of N tokens
    resolution: int  # the image side this latent decodes to
    image_channels: int = 3
    downsample_factor: int = 1
    normalized: bool = True  # encode() already applies the tokenizer's latent statistics
    kind: Literal["continuous"] = field(default="continuous", init=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, *self.size)

    def network_inputs(self) -> dict[str, Any]:
        derived: dict[str, Any] = {"in_channels": self.channels}
        if len(self.size) == 2 and self.size[0] == self.size[1]:
            derived["input_size"] = self.size[0]
        return derived

    def describe(self) -> str:
        return f"continuous latents {'x'.join(map(str, self.shape))}"


@dataclass(frozen=True)
class TokenSpace:
    """Discrete token ids of one codebook."""

    vocab_size: int
    layout: Literal["multiscale", "residual", "sequence"]
    resolution: int
    scales: tuple[int, ...] = ()  # multiscale / residual: square map sides (coarse to fine)
    length: int = 0  # sequence: number of tokens
    depth: int = 1  # residual: codes per position
    embed_dim: int = 0  # width of a code's embedding
    image_channels: int = 3
    group_size: int = 0  # sequence: tokens a generator predicts together after the causal prefix (DetailFlow; 0: none)
    causal_num: int = 0  # sequence: the strictly causal prefix before the groups
    kind: Literal["tokens"] = field(default="tokens", init=False)

    @property
    def num_tokens(self) -> int:
        if self.layout == "sequence":
            return self.length
        if self.layout == "residual":
            return self.scales[-1] ** 2 * self.depth
        return sum(s * s for s in self.scales)

    @property
    def id_dtype(self) -> torch.dtype:
        """The smallest integer dtype a token cache stores the ids in: int16 up to 32768 codes (VAR's 4096, an ImageNet
        cache of 680 ids per image then takes 1.7 GB), else int32."""
        return torch.int16 if self.vocab_size <= 2**15 else torch.int32

    def flatten_indices(self, indices) -> torch.Tensor:
        """`indices_from_images`' output -> (B, num_tokens) ids in `id_dtype`, the row a token cache stores
        (multiscale: the scales' maps concatenated coarse to fine; residual: (B, side^2, depth) row-major; sequence:
        as is)."""
        flat = torch.cat([i.flatten(1) for i in indices], 1) if isinstance(indices, (list, tuple)) else indices.flatten(1)
        if flat.shape[1] != self.num_tokens:
            raise ValueError(f"{flat.shape[1]} token ids per image, the {self.describe()} hold {self.num_tokens}")
        return flat.to(self.id_dtype)

    def unflatten_indices(self, flat: torch.Tensor):
        """(B, num_tokens) integer ids (a token cache's rows) -> `indices_from_images`' structure, int64."""
        if flat.dim() != 2 or flat.shape[1] != self.num_tokens or flat.is_floating_point():
            raise ValueError(f"expected (batch, {self.num_tokens}) integer token ids of the {self.describe()}, got "
                             f"{tuple(flat.shape)} {flat.dtype}: a cache of another tokenizer, or latents, not tokens")
        flat = flat.long()
        if self.layout == "multiscale":
            return list(flat.split([s * s for s in self.scales], dim=1))
        if self.layout == "residual":
            return flat.view(flat.shape[0], self.scales[-1] ** 2, self.depth)
        return flat

    def network_inputs(self) -> dict[str, Any]:
        derived: dict[str, Any] = {"vocab_size": self.vocab_size, "latent_channels": self.embed_dim}
        if self.scales:
            derived["scales"] = list(self.scales)
        if self.layout == "sequence":
            derived["num_tokens"] = self.length
            if self.group_size:
                derived.update(group_size=self.group_size, causal_num=self.causal_num)
        if self.layout == "residual":  # not "depth": generators use that name for their own size dial
            derived["rvq_depth"] = self.depth
        return derived

    def describe(self) -> str:
        where = {"multiscale": f"scales {list(self.scales)}", "residual": f"{self.depth} codes per position of a "
                 f"{self.scales[-1] if self.scales else '?'}^2 grid", "sequence": f"{self.length} tokens"}[self.layout]
        return f"{self.layout} tokens ({where}, vocabulary {self.vocab_size})"


TokenizerOutputSpec = LatentSpace | TokenSpace


def accepts(accepted: tuple[str, ...], output: TokenizerOutputSpec) -> bool:
    """Whether an output matches one of the accepted kinds ("continuous", "tokens") or token layouts ("multiscale",
    "residual", "sequence", or "grid": a multiscale space with a single scale)."""
    if output.kind in accepted:
        return True
    if output.kind != "tokens":
        return False
    if output.layout in accepted:
        return True
    return "grid" in accepted and output.layout == "multiscale" and len(output.scales) == 1


class TokenizerOutput:
    """Mixin of tokenizer networks: `output` describes what `encode` returns."""

    config: Any

    @classmethod
    def output_of(cls, config: Any) -> TokenizerOutputSpec:  # pragma: no cover - every tokenizer overrides it
        raise NotImplementedError(f"{cls.__name__} must declare its output (classmethod output_of(config))")

    @property
    def output(self) -> TokenizerOutputSpec:
        return type(self).output_of(self.config)
