"""Safe, atomic file and folder I/O for checkpoints and pipeline folders.

- Every folder is written into a temporary sibling and renamed into place, so a crash mid-write
  never replaces a good checkpoint with a half-written one.
- Weights are read with safetensors or `torch.load(weights_only=True)` only; a corrupt or mismatched
  file raises `CheckpointError` naming the file, never a silent partial load.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint or pipeline folder is missing, corrupt, or does not match the model."""


class NonFiniteWeightsError(CheckpointError):
    """Weights hold NaN or inf: refused when loading a file and before writing a checkpoint."""


class OutputDirectoryError(CheckpointError):
    """A run's output directory cannot be created or written, a write into it failed, or it is locked."""


# The temporaries of `atomic_directory` / `atomic_write_text`: `.tmp-NAME-XXXXXXXX` and `.old-NAME-XXXXXXXX`.
TEMPORARY_PATTERN = re.compile(r"^\.(tmp|old)-(.+)-[0-9a-f]{8}$")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in (nearly) one step.

    The old folder, if any, is first renamed aside and removed only after the new one is in place,
    so at every instant one complete version exists on disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if path.exists():
            old = path.parent / f".old-{path.name}-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; is {path.parent} a complete effigen folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupt") from e


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Save tensors as safetensors (contiguous CPU copies; shared storage is fine)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(path))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"weights file {path} is corrupt or not a safetensors file: {e}") from e


def load_torch_file(path: str | Path) -> Any:
    """`torch.load` restricted to tensors and plain containers (safe on untrusted files)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncation, zip errors all land here
        raise CheckpointError(f"{path} could not be read safely (corrupt, truncated, or holds pickled code): {e}") from e


def non_finite_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an inf, in the dict's order."""
    bad = []
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            if hasattr(value, "to_local"):  # a DTensor shard: this process's part
                value = value.to_local()
            if not bool(torch.isfinite(value).all()):
                bad.append(key)
    return bad


def check_finite(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise NonFiniteWeightsError naming `source` and the first tensors that hold NaN or inf."""
    bad = non_finite_keys(state_dict)
    if bad:
        raise NonFiniteWeightsError(
            f"{source} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}. The file is corrupt or was saved from a diverged run; "
            "use an earlier checkpoint (or retrain) instead of this one"
        )


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load every tensor or fail with a message listing what is missing, unexpected, mis-shaped or non-finite."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the {type(module).__name__} built from its config:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(
                f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
            )
        if mismatched:
            lines.append(f"  shape mismatches: {'; '.join(mismatched[:8])}")
        lines.append("Check that the config.json beside the weights is the one they were saved with.")
        raise CheckpointError("\n".join(lines))
    check_finite(state_dict, source)
    module.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------- run folders

def describe_os_error(error: OSError) -> str:
    """A one-line cause, saying plainly when the disk is full or the folder is read-only / not ours."""
    detail = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"the disk is full ({detail}); free some space"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied ({detail})"
    if error.errno == errno.EROFS:
        return f"the file system is read-only ({detail})"
    return f"{type(error).__name__}: {error}"


def check_writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """Create `path` (with its parents) and write and delete a probe file in it, or raise OutputDirectoryError
    naming the directory and the cause. Call it before any work whose results would be lost."""
    path = Path(path)
    probe = path / f".tmp-probe-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"effigen write probe\n")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise OutputDirectoryError(
            f"cannot write into the {what} {path}: {describe_os_error(e)}; choose another --trainer.output_dir "
            "or make that directory writable"
        ) from None
    return path


def clean_stale_temporaries(folder: str | Path) -> list[str]:
    """Remove the `.tmp-*` / `.old-*` leftovers of interrupted `atomic_directory` / `atomic_write_text` calls in
    `folder` (only names of that exact pattern). An `.old-NAME-*` folder whose NAME is missing is the last complete
    version of NAME (the process died between the two renames) and is renamed back instead. Call it only while no
    other process writes into `folder`. Returns what was done, one line per entry."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = []
    for entry in sorted(folder.iterdir()):
        match = TEMPORARY_PATTERN.match(entry.name)
        if match is None:
            continue
        kind, name = match.groups()
        target = folder / name
        if kind == "old" and entry.is_dir() and not target.exists():
            os.replace(entry, target)
            done.append(f"restored {target} from {entry.name}")
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed {entry}")
        else:
            entry.unlink(missing_ok=True)
            done.append(f"removed {entry}")
    return done


class CheckpointWriteError(OutputDirectoryError):
    """Writing a checkpoint failed (disk full, permissions, ...); the previous checkpoint is intact."""


class RunLockedError(OutputDirectoryError):
    """Another process holds the lock of a run's output directory."""


LOCK_NAME = ".effigen-run.lock"
_HELD_LOCKS: dict[str, list] = {}  # resolved lock path -> [open file, depth]: re-entrant within one process


class DirectoryLock:
    """An exclusive lock on `directory` for a run's lifetime: `directory/.effigen-run.lock`, held with `flock`
    (POSIX; `msvcrt.locking` elsewhere) and recording the holder's pid. The operating system drops the lock when the
    holder exits, so the file of a dead run never blocks a new one. Re-entrant within one process.

        with DirectoryLock(output_dir):
            ...  # a second run into output_dir raises RunLockedError naming this process
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._key: str | None = None

    def acquire(self) -> "DirectoryLock":
        if self._key is not None:
            return self
        check_writable_dir(self.directory)
        key = str(self.path.resolve())
        if key in _HELD_LOCKS:
            _HELD_LOCKS[key][1] += 1
            self._key = key
            return self
        handle = open(self.path, "a+")
        try:
            _lock_file(handle)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunLockedError(
                f"another effigen run (pid {holder}) is training into {self.directory}; wait for it to finish, stop it, "
                "or choose another --trainer.output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _HELD_LOCKS[key] = [handle, 1]
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        held = _HELD_LOCKS[self._key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD_LOCKS[self._key]
            _unlock_file(held[0])
            held[0].close()
        self._key = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_file(handle) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock_file(handle) -> None:
    try:
        import fcntl
    except ImportError:
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
