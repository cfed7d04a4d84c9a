"""TF-compatible Inception-v3 feature extractor for FID / sFID / IS / KID / precision-recall.

This is the network of TensorFlow's ``inception-2015-12-05`` graph (``classify_image_graph_def.pb``)
re-expressed in plain PyTorch, i.e. the same network that

* the original FID code (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge
  to a Local Nash Equilibrium", TTUR repository) and the ADM evaluation suite (Dhariwal & Nichol 2021,
  "Diffusion Models Beat GANs on Image Synthesis", ``guided-diffusion/evaluations/evaluator.py``) run
  in TensorFlow, and
* torch-fidelity 0.4.0 (``FeatureExtractorInceptionV3``, feature extractor "inception-v3-compat") and
  pytorch-fid port to PyTorch.

Features computed here agree with torch-fidelity's to float32 round-off, and torch-fidelity's FID
agrees with the ADM suite's. Differences from torchvision's Inception-v3 that are kept on purpose
(they are what the TF graph computes):

* input resize with TensorFlow 1.x ``ResizeBilinear`` (``align_corners=False``) semantics, which has
  no half-pixel offset: output pixel ``i`` samples input coordinate ``i * in_size / out_size``;
* input normalisation ``(x - 128) / 128`` on 0..255 values;
* average pools in the Mixed blocks exclude the zero padding from the mean;
* the last Mixed block (``Mixed_7c``, TF ``mixed_10``) pools its ``branch_pool`` with a 3x3 *max* pool;
* a 1008-way classifier (1001 ImageNet classes plus unused slots).

Taps returned by :meth:`InceptionV3Features.forward` (all ``float32``):

==================  =========  ==============================================================
tap                 dims       what
==================  =========  ==============================================================
``"64"``            64         mean over space after the first max pool
``"192"``           192        mean over space after the second max pool
``"768"``           768        mean over space of ``Mixed_6e`` (input of the aux classifier)
``"2048"``          2048       ``pool_3``: final average pool, the FID / KID / PR features
``"logits_unbiased"`` 1008     ``pool_3 @ W^T`` without bias (TF ``softmax/logits/MatMul``), used
                               for the Inception Score by torch-fidelity and the ADM suite
``"logits"``        1008       ``pool_3 @ W^T + b``
``"spatial"``       2023       ADM's sFID feature: TF ``mixed_6/conv:0`` (the 1x1 branch of the
                               third 17x17 block, ``Mixed_6d.branch1x1``, after its ReLU), first 7
                               channels, flattened in TF's NHWC order -> 17*17*7 = 2023
==================  =========  ==============================================================

Weights are never downloaded. Put one of the released files

* ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity), or
* ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid)

somewhere on disk and pass its path as ``weights=`` to :func:`load_inception`, or point the
environment variable ``EFFIGEN_INCEPTION_WEIGHTS`` at the file (or at a folder holding it), or drop
it into ``$XDG_CACHE_HOME/effigen/`` (default ``~/.cache/effigen/``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "INCEPTION_WEIGHT_FILENAMES",
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_TAPS",
    "InceptionV3Features",
    "convert_inception_state_dict",
    "default_inception_weights_dir",
    "load_inception",
    "resize_bilinear_tf1",
    "resolve_inception_weights",
]

#: File names of the released weight files (torch-fidelity's, pytorch-fid's). Both hold the
#: TF ``inception-2015-12-05`` weights converted to PyTorch layout.
INCEPTION_WEIGHT_FILENAMES = (
    "weights-inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth",
)
#: Environment variable naming the weight file (or a folder containing one of the files above).
INCEPTION_WEIGHTS_ENV = "EFFIGEN_INCEPTION_WEIGHTS"
#: Every tap the extractor can return, in network order.
INCEPTION_TAPS = ("64", "192", "768", "spatial", "2048", "logits_unbiased", "logits")
_LOGIT_TAPS = ("logits_unbiased", "logits")
INPUT_SIZE = 299
#: Number of ``mixed_6/conv`` channels that ADM's evaluator keeps for sFID.
SPATIAL_CHANNELS = 7


# --------------------------------------------------------------------------------------------------
# resize


def resize_bilinear_tf1(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of a float (B, C, H, W) tensor as TensorFlow 1.x ``ResizeBilinear`` with
    ``align_corners=False`` (and no half-pixel centres) computes it.

    Output row ``i`` reads input row ``y = i * (H_in / H_out)``: ``y0 = floor(y)``,
    ``y1 = min(y0 + 1, H_in - 1)``, weight ``y - y0``; same for columns. This is *not*
    ``F.interpolate(..., align_corners=False)`` (which uses half-pixel centres) and not
    ``align_corners=True`` either. The arithmetic order below (scale held in float32, horizontal
    lerp first, then vertical) is the one torch-fidelity's "slow" path uses, which is bit-exact to
    TF on CPU.
    """
    if x.dim() != 4:
        raise ValueError(f"resize_bilinear_tf1 expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"resize_bilinear_tf1 expects a floating point tensor, got {x.dtype}")
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = x.shape[-2], x.shape[-1]

    def grid(n_in: int, n_out: int):
        # TF1 keeps the scale as a float32 number; multiplying in float32 reproduces its sample
        # positions exactly (they differ from float64 ones in the last bits for most sizes).
        scale = torch.tensor(n_in / n_out, dtype=torch.float32, device=x.device).to(x.dtype)
        pos = torch.arange(n_out, dtype=x.dtype, device=x.device) * scale
        lo = pos.long()  # positions are >= 0, so truncation == floor
        hi = (lo + 1).clamp_max(n_in - 1)
        frac = pos - lo.to(x.dtype)
        return lo, hi, frac

    y_lo, y_hi, dy = grid(in_h, out_h)
    x_lo, x_hi, dx = grid(in_w, out_w)
    top = x.index_select(2, y_lo)
    bottom = x.index_select(2, y_hi)
    dx = dx.view(1, 1, 1, out_w)
    top_l, top_r = top.index_select(3, x_lo), top.index_select(3, x_hi)
    top = top_l + (top_r - top_l) * dx
    del top_l, top_r
    bot_l, bot_r = bottom.index_select(3, x_lo), bottom.index_select(3, x_hi)
    bottom = bot_l + (bot_r - bot_l) * dx
    del bot_l, bot_r
    return top + (bottom - top) * dy.view(1, 1, out_h, 1)


# --------------------------------------------------------------------------------------------------
# network
#
# Module names follow the TF-scope-derived names that both released weight files use
# (Conv2d_1a_3x3 ... Mixed_7c, fc), so the common layout loads without renaming.


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, as TF's ``BatchNormWithGlobalNormalization``) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_3x3_tf(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME-padded average pool divides by the number of *valid* pixels in the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (TF ``mixed``, ``mixed_1``, ``mixed_2``)."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (TF ``mixed_3``)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (TF ``mixed_4`` ... ``mixed_7``)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor, branch1x1: torch.Tensor | None = None) -> torch.Tensor:
        # `branch1x1` may be passed in when the caller already computed it (the sFID tap).
        b1 = self.branch1x1(x) if branch1x1 is None else branch1x1
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        bp = self.branch_pool(_avg_pool_3x3_tf(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (TF ``mixed_8``)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs (TF ``mixed_9``, ``mixed_10``).

    ``pool="max"`` reproduces the TF graph's ``mixed_10``, whose pooling branch uses a 3x3 *max*
    pool where the paper (and torchvision) use an average pool; FID numbers depend on it.
    """

    def __init__(self, in_channels: int, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            bp = _avg_pool_3x3_tf(x)
        bp = self.branch_pool(bp)
        return torch.cat([b1, b3, bd, bp], 1)


@contextlib.contextmanager
def _ieee_fp32():
    """Temporarily run CUDA convolutions and matmuls in full fp32 (no TF32).

    PyTorch lets cuDNN convolutions use TF32 by default on Ampere and later GPUs, which moves
    Inception features by ~1e-3 relative; the reference (TF / torch-fidelity on CPU) is plain fp32.
    The previous settings are restored on exit.
    """
    saved = []
    try:
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9 API
            for obj in (conv, torch.backends.cuda.matmul):
                saved.append((obj, "fp32_precision", obj.fp32_precision))
                obj.fp32_precision = "ieee"
        else:  # legacy flags
            for obj in (torch.backends.cudnn, torch.backends.cuda.matmul):
                saved.append((obj, "allow_tf32", obj.allow_tf32))
                obj.allow_tf32 = False
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


class InceptionV3Features(nn.Module):
    """The FID Inception-v3 (TF ``2015-12-05`` graph) returning a dict of feature taps.

    Build it with :func:`load_inception` (which loads weights); constructing the class directly
    gives an *untrained* network. ``forward(images, taps=None)`` takes uint8 (or float in
    [0, 255]) RGB images of any size, shape (B, 3, H, W), and returns ``{tap: float32 (B, dim)}``
    for the requested taps (all available taps by default). See the module docstring for taps.

    ``has_classifier`` is False when the weights had no ``fc`` layer (a pytorch-fid ``InceptionV3``
    module state dict); then the logit taps are unavailable and asking for them raises.

    On CUDA the forward pass turns TF32 off for its own convolutions and matmuls (restoring the
    global settings afterwards) so that GPU features match the fp32 reference; set
    ``allow_tf32 = True`` on the instance to skip that (faster, ~1e-3 relative error).
    """

    allow_tf32: bool = False

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        self.has_classifier = True
        self.weights_path: str | None = None
        self.to(dtype)
        self.requires_grad_(False)
        self.eval()

    @property
    def available_taps(self) -> tuple[str, ...]:
        if self.has_classifier:
            return INCEPTION_TAPS
        return tuple(t for t in INCEPTION_TAPS if t not in _LOGIT_TAPS)

    def _check_taps(self, taps: Iterable[str] | str | None) -> list[str]:
        if taps is None:
            return list(self.available_taps)
        if isinstance(taps, str):
            taps = [taps]
        taps = list(taps)
        for t in taps:
            if t not in INCEPTION_TAPS:
                raise ValueError(f"unknown Inception tap {t!r}; available: {', '.join(INCEPTION_TAPS)}")
            if t in _LOGIT_TAPS and not self.has_classifier:
                raise ValueError(
                    f"tap {t!r} needs the 1008-way classifier (fc.weight / fc.bias), but the weights "
                    f"loaded from {self.weights_path or '<state dict>'} have none (a pytorch-fid "
                    "InceptionV3 module state dict); use one of the released weight files "
                    f"({' or '.join(INCEPTION_WEIGHT_FILENAMES)}) for IS / logits."
                )
        return taps

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 / float [0, 255] (B, 3, H, W) -> network input (B, 3, 299, 299) in [-1, 1]."""
        if not torch.is_tensor(images):
            raise TypeError(f"expected a torch.Tensor of images, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images of shape (B, 3, H, W), got {tuple(images.shape)}")
        dtype = self.Conv2d_1a_3x3.conv.weight.dtype
        if images.dtype == torch.uint8:
            x = images.to(dtype)
        elif images.is_floating_point():
            x = images.to(dtype)
            if x.numel() and float(x.max()) <= 1.0 and float(x.min()) >= 0.0:
                warnings.warn(
                    "InceptionV3Features got float images with values in [0, 1]; it expects the 0..255 "
                    "range (uint8 or float). Multiply by 255 if these are [0, 1] images.",
                    stacklevel=3,
                )
        else:
            raise TypeError(f"expected uint8 or float images, got {images.dtype}")
        x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
        # The TF graph computes (x - 128) * 0.0078125; dividing by 128 gives the same bits.
        return (x - 128) / 128

    def forward(self, images: torch.Tensor, taps: Iterable[str] | str | None = None) -> dict[str, torch.Tensor]:
        taps = self._check_taps(taps)
        if torch.is_tensor(images) and images.is_cuda and not self.allow_tf32:
            with _ieee_fp32():
                return self._forward(images, taps)
        return self._forward(images, taps)

    def _forward(self, images: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        want = set(taps)
        out: dict[str, torch.Tensor] = {}

        def done() -> bool:
            return want.issubset(out)

        x = self.preprocess(images)
        x = self.Conv2d_1a_3x3(x)  # 32 x 149 x 149
        x = self.Conv2d_2a_3x3(x)  # 32 x 147 x 147
        x = self.Conv2d_2b_3x3(x)  # 64 x 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 64 x 73 x 73
        if "64" in want:
            out["64"] = _spatial_mean(x)
            if done():
                return self._finish(out, taps)
        x = self.Conv2d_3b_1x1(x)  # 80 x 73 x 73
        x = self.Conv2d_4a_3x3(x)  # 192 x 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 192 x 35 x 35
        if "192" in want:
            out["192"] = _spatial_mean(x)
            if done():
                return self._finish(out, taps)
        x = self.Mixed_5b(x)  # 256 x 35 x 35
        x = self.Mixed_5c(x)  # 288 x 35 x 35
        x = self.Mixed_5d(x)  # 288 x 35 x 35
        x = self.Mixed_6a(x)  # 768 x 17 x 17
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        if "spatial" in want:
            # TF `mixed_6/conv:0` = ReLU output of the 1x1 branch of mixed_6 (= Mixed_6d here).
            # ADM keeps channels [:7] of the NHWC tensor and flattens it row-major, so the
            # flattened order is (h, w, c); keep it so that ADM reference `mu_s`/`sigma_s` apply.
            b1 = self.Mixed_6d.branch1x1(x)
            out["spatial"] = b1[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(b1.shape[0], -1)
            if done():
                return self._finish(out, taps)
            x = self.Mixed_6d(x, branch1x1=b1)
        else:
            x = self.Mixed_6d(x)
        x = self.Mixed_6e(x)  # 768 x 17 x 17
        if "768" in want:
            out["768"] = _spatial_mean(x)
            if done():
                return self._finish(out, taps)
        x = self.Mixed_7a(x)  # 1280 x 8 x 8
        x = self.Mixed_7b(x)  # 2048 x 8 x 8
        x = self.Mixed_7c(x)  # 2048 x 8 x 8
        x = _spatial_mean(x)  # pool_3: 2048
        if "2048" in want:
            out["2048"] = x
            if done():
                return self._finish(out, taps)
        # TF `softmax/logits/MatMul` has no bias; the IS of torch-fidelity / ADM uses it.
        logits_unbiased = x @ self.fc.weight.T
        out["logits_unbiased"] = logits_unbiased
        out["logits"] = logits_unbiased + self.fc.bias.unsqueeze(0)
        return self._finish(out, taps)

    @staticmethod
    def _finish(out: dict[str, torch.Tensor], taps: list[str]) -> dict[str, torch.Tensor]:
        return {t: out[t].to(torch.float32) for t in taps}


# --------------------------------------------------------------------------------------------------
# weights


def default_inception_weights_dir() -> Path:
    """``$XDG_CACHE_HOME/effigen`` (default ``~/.cache/effigen``): searched for the weight files last."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "effigen"


def _missing_weights_error(detail: str) -> FileNotFoundError:
    names = " or ".join(f"'{n}'" for n in INCEPTION_WEIGHT_FILENAMES)
    return FileNotFoundError(
        f"Inception-v3 FID weights not found: {detail}.\n"
        f"effigen never downloads them. Get the file {names} (the TF inception-2015-12-05 weights as "
        "released by torch-fidelity v0.2.0 / pytorch-fid 'fid_weights') and either\n"
        f"  - pass its path explicitly: load_inception(weights='/path/to/{INCEPTION_WEIGHT_FILENAMES[0]}'),\n"
        f"  - or set the environment variable {INCEPTION_WEIGHTS_ENV}=/path/to/that/file (or to the folder "
        "holding it),\n"
        f"  - or put it into {default_inception_weights_dir()}/."
    )


def _find_in_dir(folder: Path) -> Path | None:
    for name in INCEPTION_WEIGHT_FILENAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def resolve_inception_weights(weights: str | os.PathLike | None = None) -> Path:
    """Path of the weight file: ``weights`` (a file, or a folder with one of
    :data:`INCEPTION_WEIGHT_FILENAMES`), else ``$EFFIGEN_INCEPTION_WEIGHTS`` (same rules), else
    :func:`default_inception_weights_dir`. Raises :class:`FileNotFoundError` saying what to do."""
    if weights is not None:
        source, p = "weights=", Path(weights).expanduser()
    elif os.environ.get(INCEPTION_WEIGHTS_ENV):
        source, p = f"${INCEPTION_WEIGHTS_ENV}=", Path(os.environ[INCEPTION_WEIGHTS_ENV]).expanduser()
    else:
        d = default_inception_weights_dir()
        found = _find_in_dir(d)
        if found is None:
            raise _missing_weights_error(
                f"no weights= path given, ${INCEPTION_WEIGHTS_ENV} is not set, and {d} holds neither file"
            )
        return found
    if p.is_dir():
        found = _find_in_dir(p)
        if found is None:
            raise _missing_weights_error(f"{source}'{p}' is a folder that holds neither file")
        return found
    if not p.is_file():
        raise _missing_weights_error(f"{source}'{p}' does not exist")
    return p


def _blocks_layout_map() -> dict[str, str]:
    """Prefix map of a pytorch-fid ``InceptionV3`` module state dict (``blocks.i.j.``) to ours."""
    blocks = [
        ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"],  # blocks.0.3 is a max pool
        ["Conv2d_3b_1x1", "Conv2d_4a_3x3"],  # blocks.1.2 is a max pool
        ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
        ["Mixed_7a", "Mixed_7b", "Mixed_7c"],  # blocks.3.3 is the average pool
    ]
    return {f"blocks.{i}.{j}.": name + "." for i, names in enumerate(blocks) for j, name in enumerate(names)}


def convert_inception_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>"
) -> tuple[dict[str, torch.Tensor], str]:
    """Map a state dict in any supported layout to :class:`InceptionV3Features` names.

    Supported layouts (detected from the keys):

    * ``"flat"``: ``Conv2d_1a_3x3.conv.weight`` ... ``Mixed_7c.*``, ``fc.weight``, ``fc.bias``
      (torchvision's Inception3 module names). Both released files use it: torch-fidelity's
      ``weights-inception-2015-12-05-6726825d.pth`` and pytorch-fid's
      ``pt_inception-2015-12-05-6726825d.pth`` (which pytorch-fid loads strictly into torchvision's
      Inception3). BatchNorm ``num_batches_tracked`` entries may be present or absent (they are
      unused in eval mode).
    * ``"pytorch-fid-blocks"``: the state dict of pytorch-fid's ``InceptionV3`` wrapper module
      (``blocks.0.0.conv.weight`` ...). It has no classifier, so logit taps will be unavailable.

    A ``module.`` prefix (DataParallel) is stripped. Returns ``(converted, layout)``; raises
    ``ValueError`` naming ``source`` on any unknown/missing key or shape mismatch.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("blocks.") for k in sd):
        layout = "pytorch-fid-blocks"
        prefixes = _blocks_layout_map()
        converted = {}
        for k, v in sd.items():
            parts = k.split(".")
            prefix = ".".join(parts[:3]) + "."
            if prefix not in prefixes:
                raise ValueError(f"{source}: unexpected key {k!r} for the pytorch-fid InceptionV3 (blocks.*) layout")
            converted[prefixes[prefix] + ".".join(parts[3:])] = v
    else:
        layout = "flat"
        converted = sd

    reference = InceptionV3Features().state_dict()
    if layout == "pytorch-fid-blocks":
        reference = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    for k, v in reference.items():  # unused in eval mode; the TF-converted files do not carry them
        if k.endswith("num_batches_tracked") and k not in converted:
            converted[k] = v.clone()
    missing = sorted(set(reference) - set(converted))
    unexpected = sorted(set(converted) - set(reference))
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        msg = [f"{source}: not an Inception-v3 FID state dict in a supported layout (detected layout: {layout})."]
        if missing:
            msg.append(f"missing keys: {show(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {show(unexpected)}")
        raise ValueError("\n".join(msg))
    for k, ref in reference.items():
        v = converted[k]
        if not torch.is_tensor(v):
            raise ValueError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(ref.shape):
            raise ValueError(f"{source}: shape mismatch for {k!r}: file has {tuple(v.shape)}, expected {tuple(ref.shape)}")
    return converted, layout


def load_inception(
    weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> InceptionV3Features:
    """Build :class:`InceptionV3Features` and load the FID weights (never downloaded).

    ``weights``: path to the weight file (or a folder holding it), or an already loaded state dict;
    ``None`` looks at ``$EFFIGEN_INCEPTION_WEIGHTS`` then :func:`default_inception_weights_dir`.
    ``dtype``: internal precision (float32 as torch-fidelity's default; float64 for checks).
    """
    if isinstance(weights, Mapping):
        source, state_dict = "<state dict>", weights
    else:
        path = resolve_inception_weights(weights)
        source = str(path)
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"could not read Inception weights from {path}: {e}") from e
    converted, layout = convert_inception_state_dict(state_dict, source)
    model = InceptionV3Features()
    if layout == "pytorch-fid-blocks":
        model.fc = None  # type: ignore[assignment]
        model.has_classifier = False
    model.load_state_dict(converted, strict=True)
    model.weights_path = source
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()
