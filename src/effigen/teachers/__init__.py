"""Frozen vision encoders (teachers) for representation alignment: see `teachers/base.py` for the interface."""

from .base import Teacher, TeacherError, check_grid_mapping, resample_attention_probs, resample_tokens

__all__ = ["Teacher", "TeacherError", "check_grid_mapping", "resample_attention_probs", "resample_tokens"]
