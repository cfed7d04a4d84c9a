"""Frozen vision encoders (teachers) for representation alignment: see `teachers/base.py` for the interface.

    load_teacher("mnist-vit")                        # built-in ViT trained on the built-in MNIST (attention maps)
    load_teacher("mnist-net")                        # the MNIST FID feature net's 8 x 8 map (features only)
    load_teacher("dinov2-vitb14=/w/dinov2_vitb14_pretrain.pth")           # official .pth layout
    load_teacher("dinov2-vitb14-reg=/w/dinov2-with-registers-base")       # transformers save_pretrained folder

DINOv2 sizes: vits14, vitb14, vitl14, vitg14, each with `-reg` (4 registers). Nothing is downloaded: a missing path
raises `TeacherError` naming the file to fetch and the flag that takes it. `mnist-vit=PATH` / `mnist-net=PATH` load
a rebuilt file instead of the packaged one.
"""

from __future__ import annotations

from .base import Teacher, TeacherError, check_grid_mapping, resample_attention_probs, resample_tokens
from .builtin import BUILTIN_TEACHERS, MNIST_NET_GRID, FeatureNetTeacher, load_vit_teacher
from .dinov2 import DINOV2_PRESETS, dinov2_teacher, load_dinov2
from .vit import ViTConfig, ViTTeacher, VisionTransformer

TEACHERS = (*BUILTIN_TEACHERS, *DINOV2_PRESETS)


def load_teacher(spec: str, resize_antialias: bool = True) -> Teacher:
    """The frozen teacher named by `spec`: a built-in name (`mnist-vit`, `mnist-net`, optionally `=PATH` of a
    rebuilt file) or `dinov2-vit{s,b,l,g}14[-reg]=PATH` with PATH an official .pth or a transformers folder.
    `resize_antialias=False` resizes a ViT teacher's input without antialiasing (REPA's own preprocessing)."""
    name, _, path = str(spec).strip().partition("=")
    name, path = name.strip().lower().replace("_", "-"), path.strip() or None
    name = name.removesuffix("4") if name.endswith("-reg4") else name
    if name == "mnist-vit":
        return load_vit_teacher(name, path, resize_antialias)
    if name == "mnist-net":
        from ..eval.feature_nets import load_feature_net, load_feature_net_file
        from ..io import CheckpointError

        try:
            net = load_feature_net_file(path) if path else load_feature_net(name)
        except (CheckpointError, ValueError) as error:
            raise TeacherError(f"the mnist-net teacher: {error}") from None
        return FeatureNetTeacher(net, MNIST_NET_GRID, name)
    if name in DINOV2_PRESETS:
        return dinov2_teacher(name, path, resize_antialias=resize_antialias)
    raise TeacherError(f"unknown teacher {spec!r}; choose a built-in one ({', '.join(BUILTIN_TEACHERS)}) or "
                       f"dinov2-<size>[-reg]=PATH with size vits14, vitb14, vitl14 or vitg14")


__all__ = [
    "DINOV2_PRESETS", "TEACHERS", "FeatureNetTeacher", "Teacher", "TeacherError", "ViTConfig", "ViTTeacher",
    "VisionTransformer", "check_grid_mapping", "load_dinov2", "load_teacher", "resample_attention_probs",
    "resample_tokens",
]
