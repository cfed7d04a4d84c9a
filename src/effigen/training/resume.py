"""Resuming a run with changed settings: compare the new experiment config with the one the run was trained with.

Re-running `effigen train` into an `output_dir` that holds checkpoints continues that run. What it trains must then
stay what it was: another learning rate, prediction target, seed or network shape would silently turn the run into
something neither setting describes (a velocity-trained model continued as a data-prediction one). So before anything
is written into `output_dir`, the run-builder compares the new config with the stored `config.yaml`:

    stored = read_stored_config(output_dir)              # None: no checkpoint yet, the run may start afresh
    if stored is not None and new["trainer"]["resume"]:
        for change in check_resume_compatible(stored, new, where=output_dir):
            print(f"resuming with {change}")             # only settings that do not change what is trained

Allowed (and reported) are the settings that only say how long, how often or where: `trainer.max_steps`,
`trainer.max_minutes`, the logging/sampling/checkpoint intervals, `keep_checkpoints`, `progress`, `tensorboard`,
`num_workers`, `device`, `output_dir`, `resume`, and the whole `sampler` section (sampling settings do not change
training). Every other difference in method, data, network, objective, trainer, tokenizer or init_from is refused
with a ConfigError that lists each one as `section.key: old -> new` and says how to go on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError

SAFE_KEYS = frozenset({
    "trainer.max_steps", "trainer.max_minutes", "trainer.log_every", "trainer.sample_every", "trainer.checkpoint_every",
    "trainer.keep_checkpoints", "trainer.progress", "trainer.tensorboard", "trainer.num_workers", "trainer.device",
    "trainer.output_dir", "trainer.resume",
})
SAFE_SECTIONS = frozenset({"sampler"})  # sampling settings do not change what is trained


class ResumeConfigError(ConfigError):
    """The settings of a run being resumed differ from those it was trained with, or its config.yaml is corrupt."""


def _trainer_defaults() -> dict[str, Any]:
    from .trainer import TrainerConfig

    return {f.name: _plain(getattr(TrainerConfig(), f.name)) for f in dataclasses.fields(TrainerConfig)}


def _plain(value: Any) -> Any:
    """Tuples as lists, as YAML gives them back."""
    return json.loads(json.dumps(value, default=str))


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = _plain(value)
    return out


def _normalise(config: dict[str, Any]) -> dict[str, Any]:
    """Flat `section.key -> value`, the trainer section completed with TrainerConfig's defaults (so a config.yaml
    written before a trainer option existed compares equal to one that leaves it at its default)."""
    if not isinstance(config, dict):
        raise TypeError(f"expected an experiment config dict, got {type(config).__name__}")
    config = dict(config)
    trainer = config.get("trainer")
    if trainer is None or isinstance(trainer, dict):
        config["trainer"] = {**_trainer_defaults(), **(trainer or {})}
    return _flatten(config)


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(not set)"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _is_safe(key: str) -> bool:
    return key in SAFE_KEYS or key.split(".", 1)[0] in SAFE_SECTIONS


def check_resume_compatible(stored: dict[str, Any], new: dict[str, Any], where: str | Path | None = None) -> list[str]:
    """Compare the experiment config a run was trained with (`stored`, its config.yaml) with the one it is resumed
    with (`new`, `config.to_dict()`). Returns the allowed changes as `"key: old -> new"` lines (empty when nothing
    changed); raises ResumeConfigError listing every other difference and the way out. `where` (the run folder)
    only makes the message name it."""
    old_flat, new_flat = _normalise(stored), _normalise(new)
    safe, unsafe = [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        before, after = old_flat.get(key, _MISSING), new_flat.get(key, _MISSING)
        if before is not _MISSING and after is not _MISSING and _same(before, after):
            continue
        if before is _MISSING and after is None or after is _MISSING and before is None:
            continue  # an optional setting left unset on both sides
        line = f"{key}: {_show(before)} -> {_show(after)}"
        (safe if _is_safe(key) else unsafe).append(line)
    if unsafe:
        run = f"the run in {where}" if where is not None else "the existing run"
        folder = f" {Path(where) / 'checkpoints'}" if where is not None else " its checkpoints/ folder"
        raise ResumeConfigError(
            f"cannot resume {run}: these settings differ from those it was trained with (its config.yaml):\n  "
            + "\n  ".join(unsafe)
            + "\nRestore them to continue the run, or train into a new --trainer.output_dir (or delete"
            + f"{folder} to restart it from step 0). Changes allowed on resume: the sampler section and "
            + ", ".join(sorted(SAFE_KEYS)) + "."
        )
    return safe


def read_stored_config(output_dir: str | Path) -> dict[str, Any] | None:
    """The experiment config (config.yaml) of the run in `output_dir` when that run holds checkpoints, else None (a
    run that never checkpointed may be restarted with any settings; so may a folder without a config.yaml, e.g. a
    Trainer run outside `effigen train`). Raises ResumeConfigError naming the file when it is unreadable or corrupt."""
    from .trainer import list_checkpoints

    output_dir = Path(output_dir)
    if not list_checkpoints(output_dir):
        return None
    path = output_dir / "config.yaml"
    if not path.is_file():
        return None
    fix = (f"it records the settings the checkpoints in {output_dir / 'checkpoints'} were trained with: restore it, or "
           "train into a new --trainer.output_dir")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        detail = str(e).replace("\n", " ")
        raise ResumeConfigError(f"{path} cannot be read or is corrupt ({detail}); {fix}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ResumeConfigError(f"{path} is corrupt (it does not hold a mapping of settings); {fix}")
    return data
