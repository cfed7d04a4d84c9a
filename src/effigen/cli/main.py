"""`effigen` command line: one thin command per job. Each command's module parses its own flags."""

from __future__ import annotations

import sys

from ..config import ConfigError

COMMANDS = {
    "train": ("effigen.cli.train", "train a generator (torchrun-ready)"),
    "sample": ("effigen.cli.sample", "generate images from a pipeline folder"),
    "presets": ("effigen.cli.presets", "list experiment and network presets"),
    "edit": ("effigen.cli.edit", "zero-shot inpainting / outpainting / class editing (VAR, HMAR)"),
    "eval": ("effigen.cli.evaluate", "FID / sFID / IS / KID / precision-recall"),
    "bench": ("effigen.cli.bench", "throughput, latency, memory and FLOPs of a pipeline"),
    "convert": ("effigen.cli.convert", "convert an official checkpoint into an effigen folder"),
    "cache-latents": ("effigen.cli.cache_latents", "encode a dataset once with a KL-VAE for latent training"),
    "distill": ("effigen.cli.distill", "guided distillation into a few-step, one-evaluation student (2210.03142)"),
    "neon": ("effigen.cli.neon", "Neon: self-training + negative extrapolation of a trained generator (2510.03597)"),
    "report": ("effigen.cli.report", "train, evaluate and benchmark every generator under one budget (docs/results.md)"),
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
    try:
        return int(module.run(rest) or 0)
    except (ConfigError, FileNotFoundError) as e:
        print(f"effigen {name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # known user-facing errors carry their own fix in the message
        from ..data import DataError
        from ..io import CheckpointError

        if isinstance(e, (DataError, CheckpointError)):
            print(f"effigen {name}: error: {e}", file=sys.stderr)
            return 2
        raise
