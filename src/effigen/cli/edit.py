"""`effigen edit`: zero-shot inpainting, outpainting and class-conditional editing with a token generator (VAR, HMAR).

    effigen edit --from runs/mnist-var/final --image in.png --mask mask.png --class 3 --out out.png
    effigen edit --from DIR --image in.png --box 0.25,0.25,0.75,0.75 --out inpainted.png            # inpaint a box
    effigen edit --from DIR --image in.png --box 0.25,0.25,0.75,0.75 --outpaint --out outpainted.png  # keep the box

The mask is an image the size of the input (any size; it is resized): white = regenerate, black = keep. `--box`
makes one from fractions x0,y0,x1,y1 of the side; `--outpaint` inverts it. At every scale the tokens of the input
image are forced where the (resized) mask keeps them, so the kept region stays and the rest is generated around it
(HMAR: forced tokens are never re-masked; its mask branch refines the generated ones around them).
Without `--class` the edit is unconditional (the null class); with it, class-conditional. `--num` edits with
different seeds are written as one grid: input, masked input, then the edits; an `--out` folder (one PNG per edit)
must be empty or new, or hold only PNGs and be given with `--overwrite`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..config import UserError
from ..images import box_mask, load_image, load_mask, save_image_grid, save_images
from ..pipeline import Pipeline
from .main import (check_output_file, clear_images, finite_float, positive_int, prepare_image_folder,
                   select_device_flag, write_output)
from .sample import GRID_SUFFIXES, checked_sampler_settings, given_as, parse_sampler_overrides


def read_image_flag(flag: str, load, path: str, *args) -> torch.Tensor:
    """`load(path, *args)`; a file that is not an image becomes a UserError naming the flag."""
    try:
        return load(path, *args)
    except ValueError as e:
        raise UserError(f"{flag} {path}: not a readable image ({e.__cause__ or e}); give a PNG or JPEG file") from None


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="effigen edit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="pipeline folder of a token generator (var, hmar, resgen)")
    parser.add_argument("--image", required=True, help="the image to edit (resized to the model's resolution)")
    parser.add_argument("--mask", help="mask image: white = regenerate, black = keep")
    parser.add_argument("--box", help="regenerate a box instead of a mask file: x0,y0,x1,y1 as fractions of the side")
    parser.add_argument("--outpaint", action="store_true", help="invert the mask: keep the box, regenerate around it")
    parser.add_argument("--class", dest="label", type=int, help="target class (default: unconditional)")
    parser.add_argument("--num", type=positive_int, default=4, help="number of edits (different seeds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg-scale", type=finite_float, help="override the saved guidance scale")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: a GPU when there is one)")
    parser.add_argument("--out", default="edit.png", help="a .png grid (input, masked input, edits) or a folder")
    parser.add_argument("--overwrite", action="store_true", help="let a folder --out that holds PNG images be cleared "
                        "first (without it a non-empty folder is refused)")
    parser.add_argument("--upscale", type=positive_int, default=4)
    args, extra = parser.parse_known_args(argv)
    if (args.mask is None) == (args.box is None):
        parser.error("give exactly one of --mask FILE or --box x0,y0,x1,y1")
    try:
        overrides = parse_sampler_overrides(extra)
    except ValueError as e:
        parser.error(str(e))
    device = select_device_flag(args.device)
    folder = args.source  # a local pipeline folder; nothing is downloaded (from_pretrained fails if it is missing)
    pipeline = Pipeline.from_pretrained(folder, device=device)
    if not hasattr(pipeline.objective, "edit_spec"):
        why = getattr(pipeline.objective, "no_edit_reason", "")
        raise UserError(f"--from {folder}: method {pipeline.method.name} does not support zero-shot editing"
                        f"{' (' + why + ')' if why else ''}; give the folder of a token generator (var, hmar, resgen)")
    out = Path(args.out)  # checked before the work: a folder must be empty (or --overwrite), and either writable
    grid = out.suffix.lower() in GRID_SUFFIXES
    old_images = [] if grid else prepare_image_folder(out, args.overwrite)
    if grid:
        check_output_file(out)
    channels, resolution, _ = pipeline.sample_shape
    image = read_image_flag("--image", load_image, args.image, resolution, channels)
    if args.box is not None:
        try:
            mask = box_mask(tuple(float(v) for v in args.box.split(",")), resolution)
        except ValueError as e:
            parser.error(f"--box: {e}")
    else:
        mask = read_image_flag("--mask", load_mask, args.mask, resolution)
    if args.outpaint:
        mask = 1.0 - mask
    if args.label is not None and not 0 <= args.label < pipeline.num_classes:
        parser.error(f"--class {args.label}: this model has classes 0..{pipeline.num_classes - 1}")
    label = pipeline.num_classes if args.label is None else args.label
    sampler_overrides = {"cfg_scale": args.cfg_scale, **overrides}
    checked_sampler_settings(pipeline, sampler_overrides, given_as(sampler_overrides, overrides))
    images = image.expand(args.num, -1, -1, -1)
    generator = torch.Generator().manual_seed(args.seed)
    edits = pipeline.edit(images, mask, [label] * args.num, generator=generator, precision=args.precision,
                          **sampler_overrides)
    if grid:
        masked = image * (1 - mask) + mask * -0.5  # grey where the model regenerates
        write_output("--out", out, lambda: save_image_grid(torch.cat((image, masked, edits)), out, nrow=args.num + 2,
                                                           upscale=args.upscale))
        print(f"wrote input, masked input and {args.num} edits to {out}")
    else:
        clear_images(old_images)
        write_output("--out", out, lambda: save_images(edits, out))
        print(f"wrote {args.num} edits to {out}/")
    return 0
