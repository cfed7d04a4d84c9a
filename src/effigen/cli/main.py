"""`effigen` command line: one thin command per job. Each command's module parses its own flags.

Errors in what the user gave (a flag, a setting, a file, a folder) end in one line, `effigen CMD: error: ...`, that
names the input and the fix, and exit status 2: `UserError` (ConfigError is one), FileNotFoundError, and the data and
checkpoint errors. Anything else is a bug and keeps its traceback. The helpers below check the flags several commands
share (devices, output files and folders) before any work starts.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import tempfile
from pathlib import Path

from ..config import UserError

COMMANDS = {
    "train": ("effigen.cli.train", "train a generator (torchrun-ready)"),
    "sample": ("effigen.cli.sample", "generate images from a pipeline folder"),
    "presets": ("effigen.cli.presets", "list experiment and network presets"),
    "edit": ("effigen.cli.edit", "zero-shot inpainting / outpainting / class editing (VAR, HMAR)"),
    "eval": ("effigen.cli.evaluate", "FID / sFID / IS / KID / precision-recall"),
    "bench": ("effigen.cli.bench", "throughput, latency, memory and FLOPs of a pipeline"),
    "convert": ("effigen.cli.convert", "convert an official checkpoint into an effigen folder"),
    "cache-latents": ("effigen.cli.cache_latents", "encode a dataset once (KL-VAE latents, or VQ token ids with --tokens)"),
    "distill": ("effigen.cli.distill", "guided distillation into a few-step, one-evaluation student (2210.03142)"),
    "neon": ("effigen.cli.neon", "Neon: self-training + negative extrapolation of a trained generator (2510.03597)"),
    "quantize": ("effigen.cli.quantize", "low-bit quantization: PTQ or EfficientDM QALoRA distillation (2310.03270)"),
    "report": ("effigen.cli.report", "train, evaluate and benchmark every generator under one budget (docs/results.md)"),
    "serve": ("effigen.cli.serve", "the web page (Gradio): generate, edit and compare with pipeline folders"),
}


def usage() -> str:
    lines = ["usage: effigen <command> [options]", "", "commands:"]
    lines += [f"  {name:<14} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run `effigen <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"effigen {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"effigen: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[name][0])
    from ..runtime import tune_cpu_allocator

    try:  # large tensors recycled by malloc instead of page-faulted at every use (effigen.runtime)
        tune_cpu_allocator()
    except ValueError as e:
        print(f"effigen {name}: error: {e}", file=sys.stderr)
        return 2
    try:
        return int(module.run(rest) or 0)
    except (UserError, FileNotFoundError) as e:
        print(f"effigen {name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # known user-facing errors carry their own fix in the message
        from ..data import DataError
        from ..io import CheckpointError

        if isinstance(e, (DataError, CheckpointError)):
            print(f"effigen {name}: error: {e}", file=sys.stderr)
            return 2
        raise


def entry() -> None:
    """The `effigen` executable and `python -m effigen`: `main`, then exit with its code.

    A process started by torchrun (WORLD_SIZE > 1) leaves with `os._exit` once its output is flushed: its work is
    done and its process group torn down, but static destructors in torch's C++ runtime can still abort it at
    interpreter shutdown ("terminate called without an active exception", SIGABRT or SIGSEGV after the run printed
    its results), which torchrun reports as a failed run."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


# ------------------------------------------------------------------------------ checks shared by the commands
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (`--num`, `--steps`, `--batch-size`, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (NaN and infinity are refused: they sample NaN images)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def select_device_flag(name: str, flag: str = "--device", local_rank: int = 0):
    """`training.distributed.select_device` with errors that name the flag and the fix (its own message suggests
    `--trainer.device`, a flag only `effigen train` has)."""
    check_device_flag(name, flag)
    from ..training.distributed import select_device

    return select_device(name, local_rank)


def check_device_flag(name: str, flag: str = "--device") -> None:
    """Raise a UserError when `name` is not a device this machine has (auto always passes)."""
    if name == "auto":
        return
    import torch

    fix = f"use {flag} cpu, or {flag} auto (a GPU when there is one)"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{flag} {name!r} is not a device name: use {flag} cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {name}: CUDA is not available on this machine; {fix}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"{flag} {name}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                            f"(cuda:0..cuda:{count - 1}); {fix}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} {name}: MPS is not available on this machine; {fix}")


def _write_problem(error: OSError) -> str:
    if isinstance(error, (FileExistsError, NotADirectoryError)) or error.errno in (errno.EEXIST, errno.ENOTDIR):
        return "a file is in the way of a folder on that path"
    if error.errno == errno.ENOSPC:
        return "the disk is full"
    if error.errno == errno.EROFS:
        return "the file system is read-only"
    if isinstance(error, PermissionError):
        return "permission denied"
    return error.strerror or str(error)


def output_error(flag: str, path: str | Path, error: OSError) -> UserError:
    """A UserError for an output path that cannot be written, naming the flag, the path and why."""
    return UserError(f"{flag} {path}: cannot write there ({_write_problem(error)}); choose a writable path")


def _probe_folder(folder: Path, flag: str, path: str | Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".effigen-write-test-"):
            pass
    except OSError as e:
        raise output_error(flag, path, e) from None


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """Before any work: `path` will be written as a file; its folder is created and must be writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    _probe_folder(path.parent, flag, path)
    return path


def check_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """Before any work: `path` will be written as a folder (atomically, next to it); it must not be a file, and the
    folder that will hold it is created and must be writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; give a folder")
    _probe_folder(path.parent, flag, path)
    return path


def prepare_image_folder(path: str | Path, overwrite: bool, flag: str = "--out") -> list[Path]:
    """Before any work: `path` will receive one PNG per image. A non-empty folder is refused (its old images would
    sit beside the new ones, and `effigen eval --images` would mix the runs) unless `overwrite`; then it may hold
    only PNG files, which are returned for `clear_images` to delete just before the new images are written."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder; give a folder for the images "
                        "(or a .png file name for one grid)")
    old: list[Path] = []
    if folder.is_dir():
        entries = sorted(folder.iterdir())
        if entries and not overwrite:
            raise UserError(f"{flag} {folder} is not empty ({len(entries)} entries, e.g. {entries[0].name}): new images "
                            "would mix with the old ones; pass --overwrite to replace its PNG images, or give an empty "
                            "or new folder")
        others = [e.name for e in entries if not (e.is_file() and e.suffix.lower() == ".png")]
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise UserError(f"{flag} {folder} holds files other than PNG images ({shown}); --overwrite clears only "
                            "PNG images, so give an empty or new folder")
        old = entries
    _probe_folder(folder, flag, folder)
    return old


def clear_images(paths: list[Path], flag: str = "--out") -> None:
    """Delete the old images `prepare_image_folder` returned (with --overwrite)."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise UserError(f"{flag}: cannot delete the old image {path} ({_write_problem(e)})") from None


def write_output(flag: str, path: str | Path, write) -> None:
    """Run `write()`; an OSError (full disk, a folder turned read-only) becomes a UserError naming `flag` and `path`."""
    try:
        write()
    except OSError as e:
        raise output_error(flag, path, e) from None
