"""DiCo: Revitalizing ConvNets for Scalable and Efficient Diffusion Modeling (Ai et al., arXiv 2505.11196).

A convolutional diffusion backbone with no patchify: a 3x3 conv stem, then a three-level U-Net of DiCo blocks
(level widths h, 2h, 4h at resolutions H, H/2, H/4; the decoder's first level runs at 2h). Each block is

    a = LN2d(x) * (1 + scale1) + shift1
    a = GELU(dwconv3x3(conv1x1(a)));  a = a * sigmoid(conv1x1(avgpool(a)))   (compact channel attention)
    x = x + gate1 * conv1x1(a)
    x = x + gate2 * conv5(GELU(conv4(LN2d(x) * (1 + scale2) + shift2)))       (1x1 FFN, ratio mlp_ratio)

with shift/scale/gate regressed from the level's conditioning c = t_emb + y_emb (adaLN, as DiT). Each level has
its own timestep embedder and label table at its width; as in the official code, the second level's
conditioning c2 also drives the decoder and the final layer. Downsampling: 3x3 conv n -> n/2 then
PixelUnshuffle(2); upsampling: 3x3 conv n -> 2n then PixelShuffle(2); skips are concatenated and reduced by a
1x1 conv. GELU is the exact (erf) one, as the official code.

The interface is DiT's: `forward(x, t, labels) -> prediction` with t in [0, 1] (the embedding sees
`time_scale * t`, 1000 by default, so official checkpoints' integer timesteps match), null class =
`num_classes`, `learn_sigma` doubling the output channels. Parameter names follow the official
`dico_models.py`, so its state dicts load with no renaming.

Not pinned by the paper and chosen here: initialisation (zero adaLN projections and output conv, so the net
starts at a zero prediction, as DiT), and the small presets for CPU work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.embeddings import TimestepEmbedder
from ..nn.taps import Features, Taps, record_taps


@dataclass
class DiCoConfig:
    input_size: int = 32
    in_channels: int = 3
    hidden_size: int = 64  # h: level widths h, 2h, 4h
    depth: list[int] = field(default_factory=lambda: [2, 2, 2, 2, 2])  # enc1, enc2, latent, dec2, dec1
    mlp_ratio: float = 2.0
    num_classes: int = 10
    learn_sigma: bool = False
    time_scale: float = 1000.0

    def __post_init__(self):
        self.depth = list(self.depth)
        if len(self.depth) != 5:
            raise ValueError(f"DiCo depth lists 5 block counts (enc1, enc2, latent, dec2, dec1), got {self.depth}")
        if self.input_size % 4:
            allowed = ", ".join(str(4 * k) for k in range(max(1, self.input_size // 4 - 1), self.input_size // 4 + 3))
            raise ValueError(f"DiCo's U-Net downsamples twice by 2, so input_size must be a multiple of 4; "
                             f"got {self.input_size} (nearby allowed sizes: {allowed})")
        if self.hidden_size % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must be even (downsampling halves it before unshuffle)")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels


# Official sizes (dico_models.py factories) plus small ones for CPU work.
DICO_PRESETS: dict[str, dict] = {
    "DiCo-S": dict(hidden_size=128, depth=[5, 4, 4, 4, 4], mlp_ratio=2),
    "DiCo-B": dict(hidden_size=256, depth=[5, 4, 4, 4, 4], mlp_ratio=2),
    "DiCo-L": dict(hidden_size=352, depth=[9, 8, 9, 8, 9], mlp_ratio=2),
    "DiCo-XL": dict(hidden_size=416, depth=[9, 9, 10, 9, 9], mlp_ratio=2),
    "DiCo-H": dict(hidden_size=416, depth=[14, 12, 10, 12, 14], mlp_ratio=4),
    "DiCo-Ti": dict(hidden_size=64, depth=[2, 2, 2, 2, 2], mlp_ratio=2),  # small size for CPU work (not official)
    "DiCo-Test": dict(hidden_size=16, depth=[1, 1, 1, 1, 1], mlp_ratio=2),
}


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


def _norm2d(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over channels of (B, C, H, W), no affine, eps 1e-6."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=1e-6).permute(0, 3, 1, 2)


class DiCoBlock(nn.Module):
    def __init__(self, n: int, mlp_ratio: float):
        super().__init__()
        hidden = int(n * mlp_ratio)
        self.conv1 = nn.Conv2d(n, n, 1)
        self.conv2 = nn.Conv2d(n, n, 3, padding=1, groups=n)
        self.conv3 = nn.Conv2d(n, n, 1)
        self.ca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(n, n, 1))
        self.conv4 = nn.Conv2d(n, hidden, 1)
        self.conv5 = nn.Conv2d(hidden, n, 1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(n, 6 * n))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        a = F.gelu(self.conv2(self.conv1(_modulate(_norm2d(x), shift1, scale1))))
        a = a * torch.sigmoid(self.ca(a))
        x = x + gate1[:, :, None, None] * self.conv3(a)
        a = self.conv5(F.gelu(self.conv4(_modulate(_norm2d(x), shift2, scale2))))
        return x + gate2[:, :, None, None] * a


class _Resample(nn.Module):
    def __init__(self, n: int, down: bool):
        super().__init__()
        out = n // 2 if down else n * 2
        self.body = nn.Sequential(nn.Conv2d(n, out, 3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2) if down else nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _LevelLabels(nn.Module):
    """The three label tables (widths h, 2h, 4h), each with a null row at index num_classes."""

    def __init__(self, num_classes: int, h: int):
        super().__init__()
        self.embedding_table_0 = nn.Embedding(num_classes + 1, h)
        self.embedding_table_1 = nn.Embedding(num_classes + 1, 2 * h)
        self.embedding_table_2 = nn.Embedding(num_classes + 1, 4 * h)


class _FinalLayer(nn.Module):
    def __init__(self, n: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(n, 2 * n))
        self.out_proj = nn.Conv2d(n, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.out_proj(_modulate(_norm2d(x), shift, scale))


class DiCo(nn.Module):
    config_class = DiCoConfig

    def __init__(self, config: DiCoConfig):
        super().__init__()
        self.config = config
        h, r, d = config.hidden_size, config.mlp_ratio, config.depth
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(config.in_channels, h, 3, padding=1)
        self.t_embedder_1 = TimestepEmbedder(h)
        self.t_embedder_2 = TimestepEmbedder(2 * h)
        self.t_embedder_3 = TimestepEmbedder(4 * h)
        self.y_embedder = _LevelLabels(config.num_classes, h)
        self.encoder_level_1 = nn.ModuleList([DiCoBlock(h, r) for _ in range(d[0])])
        self.down1_2 = _Resample(h, down=True)
        self.encoder_level_2 = nn.ModuleList([DiCoBlock(2 * h, r) for _ in range(d[1])])
        self.down2_3 = _Resample(2 * h, down=True)
        self.latent = nn.ModuleList([DiCoBlock(4 * h, r) for _ in range(d[2])])
        self.up3_2 = _Resample(4 * h, down=False)
        self.reduce_chan_level2 = nn.Conv2d(4 * h, 2 * h, 1)
        self.decoder_level_2 = nn.ModuleList([DiCoBlock(2 * h, r) for _ in range(d[3])])
        self.up2_1 = _Resample(2 * h, down=False)
        self.reduce_chan_level1 = nn.Conv2d(2 * h, 2 * h, 1)
        self.decoder_level_1 = nn.ModuleList([DiCoBlock(2 * h, r) for _ in range(d[4])])
        self.final_layer = _FinalLayer(2 * h, config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for table in (self.y_embedder.embedding_table_0, self.y_embedder.embedding_table_1,
                      self.y_embedder.embedding_table_2):
            nn.init.normal_(table.weight, std=0.02)
        for emb in (self.t_embedder_1, self.t_embedder_2, self.t_embedder_3):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks():
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.out_proj.weight)
        nn.init.zeros_(self.final_layer.out_proj.bias)

    def blocks(self) -> list[DiCoBlock]:
        """All blocks in forward order (the indices `taps` refers to)."""
        return [*self.encoder_level_1, *self.encoder_level_2, *self.latent, *self.decoder_level_2,
                *self.decoder_level_1]

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: torch.Tensor | None = None,
                taps: Taps | None = None) -> torch.Tensor | tuple[torch.Tensor, Features]:
        """x: (B, C, H, W); t: (B,) in [0, 1]; labels: (B,) ints, `num_classes` = null class. With `taps`, returns
        (output, features): block outputs flattened to (B, L, C_level) tokens in raster order (blocks numbered in
        forward order, see `blocks()`); DiCo has no attention logits to record."""
        if guidance is not None:
            raise ValueError("DiCo has no guidance embedding: pass guidance=None (use classifier-free guidance)")
        # Fully convolutional: any height and width the two downsamplings divide (LowDiff's cascade uses several).
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % 4 or x.shape[3] % 4:
            n = self.config.input_size
            raise ValueError(f"DiCo expects inputs of shape (B, {self.config.in_channels}, H, W) with H and W multiples "
                             f"of 4 (the U-Net downsamples twice by 2; configured for {n}x{n}), got {tuple(x.shape)}")
        if taps is not None and getattr(taps, "attention", ()):
            raise ValueError("DiCo has no self-attention, so it has no attention logits to tap: request only "
                             "Taps(blocks=...) (block outputs)")
        recorder = record_taps(taps, sum(self.config.depth), "this DiCo")
        ts = self.config.time_scale * t
        y = self.y_embedder
        c1 = self.t_embedder_1(ts) + y.embedding_table_0(labels)
        c2 = self.t_embedder_2(ts) + y.embedding_table_1(labels)
        c3 = self.t_embedder_3(ts) + y.embedding_table_2(labels)
        i = 0

        def run(blocks, h, c):
            nonlocal i
            for block in blocks:
                h = block(h, c)
                recorder.block_output(i, h.flatten(2).transpose(1, 2))
                i += 1
            return h

        enc1 = run(self.encoder_level_1, self.x_embedder.proj(x), c1)
        enc2 = run(self.encoder_level_2, self.down1_2(enc1), c2)
        lat = run(self.latent, self.down2_3(enc2), c3)
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(lat), enc2], dim=1))
        dec2 = run(self.decoder_level_2, dec2, c2)
        dec1 = self.reduce_chan_level1(torch.cat([self.up2_1(dec2), enc1], dim=1))
        dec1 = run(self.decoder_level_1, dec1, c2)
        return recorder.result(self.final_layer(dec1, c2))
