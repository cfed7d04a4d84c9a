"""Blocks shared by the networks: attention (one backend dispatch, block-sparse masks, KV cache), embeddings, adaLN
and MLPs, norms, 2-D RoPE, and feature taps.

Feature taps (`effigen.nn.taps`) are how a method reads a transformer generator's intermediate tokens and attention
logits (REPA, HASTE, BFM): every transformer network's `forward` takes `taps=Taps(blocks=..., attention=...)` (0-based
block indices) and then returns `(output, features)`, with `features.blocks[i]` the residual stream after block i
and `features.attention[i]` block i's pre-softmax attention logits (B, heads, L, L), unmasked:

    from effigen.nn.taps import Taps
    prediction, features = dit(x, t, labels, taps=Taps(blocks=(7,), attention=(3,)))

Without `taps` the forward is unchanged and returns its output alone.
"""
