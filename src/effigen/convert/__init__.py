"""Converters from the papers' official checkpoint formats to effigen folders."""
