"""`effigen sample`: generate images from a pipeline folder.

    effigen sample --from runs/mnist-dit/final --classes 3,5 --num 16 --seed 0 --out grid.png
    effigen sample --from runs/mnist-dit/final --num 100 --out samples/      # a folder of PNGs
    effigen sample --from runs/mnist-dit/final --num 100 --out samples/ --overwrite   # replace its PNGs
    effigen sample --from DIR --steps 50 --solver heun --cfg-scale 3.0 --out grid.png
    effigen sample --from runs/mnist-var/final --sampler.top_k=50 --sampler.top_p=0.9 --out grid.png
    effigen sample --from runs/mnist-hmar-mask/final --schedule 1/1,3/1,1,2,5/4,12/25/36/64 --out grid.png
    effigen sample --from runs/mnist-dit-dh/final --guidance-from runs/mnist-dit-dh-s/final --cfg-scale 1.5 --out grid.png

`--guidance-from FOLDER` (dit-dh): autoguidance with the generator of a second pipeline folder (a smaller or less
trained model of the same latent) as the guidance model (sets --sampler.guidance=autoguidance unless given).

Any saved sampler setting can be overridden with --sampler.KEY=VALUE (see the folder's model_index.json).
`--schedule` sets HMAR's masked schedule (`--sampler.mask_schedule=[[1],[1,3],...]` in a shorter form): per scale,
the tokens committed at each step, scales separated by `/` and steps by `,`, or JSON, or `default` / `off`.

`--num` is the total number of images; the classes are cycled so each grid row holds one class
when `--num` is a multiple of the number of classes. A folder `--out` must be empty or new (the old images would mix
with the new ones in a later `effigen eval --images`); `--overwrite` first deletes the PNGs of a folder holding only
PNGs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..config import ConfigError
from ..images import save_image_grid, save_images
from ..pipeline import Pipeline
from .main import (check_output_file, clear_images, finite_float, positive_int, prepare_image_folder,
                   select_device_flag, write_output)

GRID_SUFFIXES = (".png", ".jpg", ".jpeg")
# the flags that set a sampler setting, for error messages (any other setting is --sampler.KEY=VALUE)
SAMPLER_FLAGS = {"num_steps": "--steps", "cfg_scale": "--cfg-scale", "solver": "--solver", "time_shift": "--time-shift",
                 "mask_schedule": "--schedule"}


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    if text is None:
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated integers like 3,5, got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"--classes {text!r}: this model has classes 0..{num_classes - 1}")
    return classes


def parse_sampler_overrides(items: list[str]) -> dict:
    """['--sampler.top_k=50'] -> {'top_k': 50} (values parsed like config overrides)."""
    from ..config import parse_value

    out = {}
    for item in items:
        if not item.startswith("--sampler.") or "=" not in item:
            raise ValueError(f"unrecognised argument {item!r}; sampler settings look like --sampler.top_k=50")
        key, raw = item[len("--sampler."):].split("=", 1)
        out[key] = parse_value(raw)
    return out


def given_as(overrides: dict, sampler_overrides: dict, raw: dict[str, str] | None = None) -> dict[str, str]:
    """How the user wrote each override, for error messages: `--steps 0` for a dedicated flag, `--sampler.top_k=-1`
    for a --sampler.KEY=VALUE one (which wins over a flag). `raw`: the text a flag was given as (e.g. --schedule's)."""
    raw = raw or {}
    out = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in sampler_overrides or key not in SAMPLER_FLAGS:
            out[key] = f"--sampler.{key}={value}"
        else:
            text = raw.get(key, f"{value:g}" if isinstance(value, float) else str(value))
            out[key] = f"{SAMPLER_FLAGS[key]} {text}"
    return out


def checked_sampler_settings(pipeline: Pipeline, overrides: dict, given: dict[str, str] | None = None):
    """The pipeline's sampler settings with `overrides`, checked before any work: a bad value ends in a ConfigError
    that names the flag that set it (`given`, from `given_as`: `--steps 0`, `--sampler.top_k=-1`) and the valid range."""
    given = given or {}
    for key, value in overrides.items():
        if value is None:
            continue
        try:
            pipeline.sampler_settings(**{key: value})
        except ConfigError as e:
            shown = given.get(key, f"--sampler.{key}={value}")
            fields = vars(pipeline.sampler_config)
            if key == "cfg_scale" and "cfg_scale" not in fields and "guidance_w" in fields:
                raise ConfigError(f"{shown}: {guidance_w_hint(pipeline, value)}") from None
            message = str(e)
            for prefix in ("sampler: ", f"sampler.{key}: "):  # the flag already names the setting
                message = message[len(prefix):] if message.startswith(prefix) else message
            raise ConfigError(f"{shown}: {message}") from None
    return pipeline.sampler_settings(**overrides)


def guidance_w_hint(pipeline: Pipeline, cfg_scale) -> str:
    """What `--cfg-scale` means on a guided-distillation student (method dit-distilled): its guidance is its w input."""
    objective = pipeline.objective_config
    trained = ""
    if hasattr(objective, "w_min") and hasattr(objective, "w_max"):
        trained = f"; this student was trained on w in {objective.w_min:g}..{objective.w_max:g}"
    saved = pipeline.sampler_config.guidance_w
    try:
        w = f"{float(cfg_scale) - 1:g}"
    except (TypeError, ValueError):
        w = "W"
    return (f"{pipeline.method.name} is a guidance-distilled student: it has no cfg_scale, its guidance strength is "
            f"its w input (the teacher's cfg_scale = 1 + w), so cfg_scale {cfg_scale:g} is "
            f"--sampler.guidance_w={w} (saved: {saved:g}){trained}")


def labels_for(classes: list[int], num: int) -> torch.Tensor:
    """`num` labels, class-major: the first num/len(classes) are classes[0], and so on."""
    per_class = -(-num // len(classes))
    return torch.tensor(classes).repeat_interleave(per_class)[:num]


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="effigen sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="pipeline folder (model_index.json inside)")
    parser.add_argument("--classes", help="comma-separated class ids (default: all classes)")
    parser.add_argument("--num", type=positive_int, default=None, help="total number of images (default: 8 per class)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples.png", help="a .png file for a grid, or a folder for one PNG per image")
    parser.add_argument("--overwrite", action="store_true", help="let a folder --out that holds PNG images be cleared "
                        "first (without it a non-empty folder is refused)")
    parser.add_argument("--steps", type=positive_int, help="override the saved number of sampling steps")
    parser.add_argument("--cfg-scale", type=finite_float, help="override the saved guidance scale (1 = no guidance)")
    parser.add_argument("--solver", help="override the saved solver (e.g. euler, heun)")
    parser.add_argument("--schedule", help="HMAR: masked schedule, e.g. 1/1,3/1,1,2,5/16/25 or [[1],[1,3],...], "
                                           "default, off")
    parser.add_argument("--guidance-from", help="dit-dh: a second pipeline folder whose generator guides (autoguidance)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: a GPU when there is one)")
    parser.add_argument("--upscale", type=positive_int, default=1, help="nearest-neighbour upscale factor for the grid")
    args, extra = parser.parse_known_args(argv)
    try:
        sampler_overrides = parse_sampler_overrides(extra)
    except ValueError as e:
        parser.error(str(e))

    device = select_device_flag(args.device)
    folder = args.source  # a local pipeline folder; nothing is downloaded
    pipeline = Pipeline.from_pretrained(folder, device=device)
    if args.guidance_from:
        from ..convert.rae_official import add_guidance_model

        add_guidance_model(pipeline, Pipeline.from_pretrained(args.guidance_from, device=device).generator,
                           args.guidance_from)
        sampler_overrides.setdefault("guidance", "autoguidance")
    # the output is checked before the sampling: a folder must be empty (or --overwrite), and either must be writable
    out = Path(args.out)
    grid = out.suffix.lower() in GRID_SUFFIXES
    old_images = [] if grid else prepare_image_folder(out, args.overwrite)
    if grid:
        check_output_file(out)
    try:
        classes = parse_classes(args.classes, pipeline.num_classes)
    except ValueError as e:
        parser.error(str(e))
    num = args.num if args.num is not None else 8 * len(classes)
    labels = labels_for(classes, num)
    overrides = {"num_steps": args.steps, "cfg_scale": args.cfg_scale, "solver": args.solver, **sampler_overrides}
    if args.schedule is not None:
        from ..samplers.hmar import parse_mask_schedule

        overrides["mask_schedule"] = parse_mask_schedule(args.schedule)
    checked_sampler_settings(pipeline, overrides,
                             given_as(overrides, sampler_overrides, {"mask_schedule": args.schedule}))
    started = time.perf_counter()
    images = pipeline(labels, seed=args.seed, batch_size=args.batch_size, precision=args.precision,
                      progress=True, **overrides)
    seconds = time.perf_counter() - started
    if grid:
        nrow = num // len(classes) if num % len(classes) == 0 and num > len(classes) else None
        write_output("--out", out, lambda: save_image_grid(images, out, nrow=nrow, upscale=args.upscale))
        print(f"wrote a grid of {num} images to {out} ({seconds:.1f}s, {num / seconds:.2f} images/s)")
    else:
        clear_images(old_images)
        write_output("--out", out, lambda: save_images(images, out))
        replaced = f", replacing {len(old_images)} old images" if old_images else ""
        print(f"wrote {num} images to {out}/{replaced} ({seconds:.1f}s, {num / seconds:.2f} images/s)")
    return 0
