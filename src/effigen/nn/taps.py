"""Feature taps: the hidden tokens of chosen blocks, and their attention logits, from a network's normal forward.

REPA and HASTE align a generator's intermediate tokens (and attention maps) with a frozen encoder's, BFM reads its
trunk features; they all ask the same question of a transformer generator (DiT and LightningDiT, VAR, HMAR, the
raster GPT) through one argument of its `forward`:

    out, features = model(x, t, labels, taps=Taps(blocks=(3,), attention=(2,)))
    features.blocks[3]      # (B, L, D): the residual stream after block 3, i.e. block 3's output
    features.attention[2]   # (B, heads, L, L): block 2's attention logits before the softmax

- Indices are 0-based block indices along the network's path (`model.blocks`; HMAR: the shared trunk's blocks, then
  those of the branch that runs; GPT: `model.layers`). An index outside 0..depth-1 is a ValueError naming the range.
- `features.blocks[i]` is the residual stream after block i (its output, before any final norm), not detached:
  gradients flow through it (REPA trains through its projector into the network).
- `features.attention[i]` is q k^T times the softmax scale of that layer (1/sqrt(head_dim); VAR/HMAR's l2-normalised
  attention: scale 1 with the learned per-head multiplier already in q), after every q/k transform the layer applies
  (qk-norm, RoPE), in fp32, with no mask: a masked layer's (block-causal VAR, block-diagonal HMAR, causal GPT) masked
  entries hold their raw scores, and the caller masks them as it needs (softmax over the allowed keys gives the
  layer's attention weights). The logits are computed by a separate q k^T for the requested layers only; the layer's
  output still comes from the fused attention kernel, so a tapped forward returns the same output, bit for bit.
- With `taps=None` (the default) nothing is recorded or computed: the forward returns just its output.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def _indices(value) -> tuple[int, ...]:
    values = (value,) if isinstance(value, int) else tuple(value)
    return tuple(sorted({operator.index(v) for v in values}))


@dataclass(frozen=True)
class Taps:
    """Which features a forward pass returns besides its output: `blocks`, the 0-based indices of the blocks whose
    output tokens are returned; `attention`, those whose pre-softmax attention logits are returned (an int or any
    iterable of ints)."""

    blocks: tuple[int, ...] = ()
    attention: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "blocks", _indices(self.blocks))
        object.__setattr__(self, "attention", _indices(self.attention))

    def check(self, depth: int, network: str) -> None:
        for kind, indices in (("blocks", self.blocks), ("attention", self.attention)):
            bad = [i for i in indices if not 0 <= i < depth]
            if bad:
                raise ValueError(f"Taps({kind}={bad}): {network} has {depth} blocks, so tap indices must lie in "
                                 f"0..{depth - 1} (0-based block index)")


@dataclass
class Features:
    """What a tapped forward returns beside its output: block index -> tokens (B, L, D) and block index -> attention
    logits (B, heads, L_q, L_k) (see the module docstring)."""

    blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)


class TapRecorder:
    """Collects a `Taps` request during one forward. Networks call, per block i, `logits_tap(i)` (a callback to hand
    the attention layer, or None) and `block_output(i, h)`."""

    def __init__(self, taps: Taps | None):
        self.taps = taps
        self.features = Features()

    def logits_tap(self, index: int) -> Callable[[torch.Tensor], None] | None:
        if self.taps is None or index not in self.taps.attention:
            return None
        return lambda logits: self.features.attention.__setitem__(index, logits)

    def block_output(self, index: int, h: torch.Tensor) -> None:
        if self.taps is not None and index in self.taps.blocks:
            self.features.blocks[index] = h

    def result(self, out):
        """`out` alone when nothing was requested (taps=None), else `(out, features)`."""
        return out if self.taps is None else (out, self.features)


NO_TAPS = TapRecorder(None)  # shared by every untapped forward: it never records, so it allocates nothing


def record_taps(taps: Taps | None, depth: int, network: str) -> TapRecorder:
    """A recorder for one forward pass of a network with `depth` blocks; `taps=None` records nothing."""
    if taps is None:
        return NO_TAPS
    if not isinstance(taps, Taps):
        raise TypeError(f"taps must be an effigen.nn.taps.Taps, got {type(taps).__name__}")
    taps.check(depth, network)
    return TapRecorder(taps)
