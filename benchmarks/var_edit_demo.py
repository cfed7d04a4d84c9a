"""Zero-shot editing with a trained VAR on held-out digits: one row per test image with the original, then
inpainting (the centre box regenerated, unconditional), outpainting (only the centre kept, the digit's own class),
and class-conditional editing (the centre box regenerated as another class), `--num` seeds each.

    python benchmarks/var_edit_demo.py --from runs/mnist-var/final --out docs/images/var-edits.png

Grey marks the regenerated region in the masked inputs.
"""

from __future__ import annotations

import argparse

import torch

from effigen.data import DataConfig, build_dataset
from effigen.images import box_mask, save_image_grid
from effigen.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True)
    parser.add_argument("--out", default="var-edits.png")
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--num", type=int, default=3)
    parser.add_argument("--box", default="0.25,0.3,0.75,0.7", help="x0,y0,x1,y1 fractions of the inpainted box")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pipe = Pipeline.from_pretrained(args.source)
    resolution = pipe.sample_shape[-1]
    test = build_dataset(DataConfig(name=pipe.info["dataset"], resolution=resolution), "test")
    picks = torch.linspace(0, len(test) - 1, args.rows).long().tolist()
    box = box_mask(tuple(float(v) for v in args.box.split(",")), resolution)
    columns = []
    for row, index in enumerate(picks):
        image, label = test[index]
        image = image[None]
        label = int(label)
        target = (label + 5) % pipe.num_classes
        images = image.expand(args.num, -1, -1, -1)
        inpaint = pipe.edit(images, box, None, seed=args.seed + row)
        outpaint = pipe.edit(images, 1 - box, [label] * args.num, seed=args.seed + row)
        recolour = pipe.edit(images, box, [target] * args.num, seed=args.seed + row)
        grey = -0.5
        columns.append(torch.cat([image, image * (1 - box) + box * grey, inpaint,
                                  image * box + (1 - box) * grey, outpaint, recolour]))
        print(f"row {row}: test image {index} (class {label}); class edit to {target}")
    grid = torch.cat(columns)
    save_image_grid(grid, args.out, nrow=3 + 3 * args.num, upscale=3)
    print(f"columns: original | inpaint mask, {args.num} unconditional inpaintings | outpaint mask, {args.num} "
          f"outpaintings (own class) | {args.num} class edits of the box (class + 5 mod 10); wrote {args.out}")


if __name__ == "__main__":
    main()
