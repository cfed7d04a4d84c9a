"""`effigen sample`: generate images from a pipeline folder.

    effigen sample --from runs/mnist-dit/final --classes 3,5 --num 16 --seed 0 --out grid.png
    effigen sample --from runs/mnist-dit/final --num 100 --out samples/      # a folder of PNGs
    effigen sample --from DIR --steps 50 --solver heun --cfg-scale 3.0 --out grid.png
    effigen sample --from runs/mnist-var/final --sampler.top_k=50 --sampler.top_p=0.9 --out grid.png
    effigen sample --from runs/mnist-hmar-mask/final --schedule 1/1,3/1,1,2,5/4,12/25/36/64 --out grid.png

Any saved sampler setting can be overridden with --sampler.KEY=VALUE (see the folder's model_index.json).
`--schedule` sets HMAR's masked schedule (`--sampler.mask_schedule=[[1],[1,3],...]` in a shorter form): per scale,
the tokens committed at each step, scales separated by `/` and steps by `,`, or JSON, or `default` / `off`.

`--num` is the total number of images; the classes are cycled so each grid row holds one class
when `--num` is a multiple of the number of classes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..images import save_image_grid, save_images
from ..pipeline import Pipeline
from ..training.distributed import select_device


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


def labels_for(classes: list[int], num: int) -> torch.Tensor:
    """`num` labels, class-major: the first num/len(classes) are classes[0], and so on."""
    per_class = -(-num // len(classes))
    return torch.tensor(classes).repeat_interleave(per_class)[:num]


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="effigen sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="pipeline folder (model_index.json inside)")
    parser.add_argument("--classes", help="comma-separated class ids (default: all classes)")
    parser.add_argument("--num", type=int, default=None, help="total number of images (default: 8 per class)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples.png", help="a .png file for a grid, or a folder for one PNG per image")
    parser.add_argument("--steps", type=int, help="override the saved number of sampling steps")
    parser.add_argument("--cfg-scale", type=float, help="override the saved guidance scale (1 = no guidance)")
    parser.add_argument("--solver", help="override the saved solver (e.g. euler, heun)")
    parser.add_argument("--schedule", help="HMAR: masked schedule, e.g. 1/1,3/1,1,2,5/16/25 or [[1],[1,3],...], "
                                           "default, off")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--upscale", type=int, default=1, help="nearest-neighbour upscale factor for the grid")
    args, extra = parser.parse_known_args(argv)
    try:
        sampler_overrides = parse_sampler_overrides(extra)
    except ValueError as e:
        parser.error(str(e))

    device = select_device(args.device)
    folder = args.source  # a local pipeline folder; nothing is downloaded
    pipeline = Pipeline.from_pretrained(folder, device=device)
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
    started = time.perf_counter()
    images = pipeline(labels, seed=args.seed, batch_size=args.batch_size, precision=args.precision,
                      progress=True, **overrides)
    seconds = time.perf_counter() - started
    out = Path(args.out)
    if out.suffix.lower() in (".png", ".jpg", ".jpeg"):
        nrow = num // len(classes) if num % len(classes) == 0 and num > len(classes) else None
        save_image_grid(images, out, nrow=nrow, upscale=args.upscale)
        print(f"wrote a grid of {num} images to {out} ({seconds:.1f}s, {num / seconds:.2f} images/s)")
    else:
        save_images(images, out)
        print(f"wrote {num} images to {out}/ ({seconds:.1f}s, {num / seconds:.2f} images/s)")
    return 0
