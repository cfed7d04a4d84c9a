"""`effigen eval`: FID / sFID / IS / KID / precision-recall of generated images against a reference.

Generated side (one of):
    --from DIR        a pipeline folder: generates --num class-balanced images with --seed
                      (under torchrun the work is sharded across processes and gathered)
    --images PATH     a folder of images or an ADM-style .npz (arr_0: uint8 N x H x W x 3)
Reference side (one of):
    --ref-dataset NAME [--ref-split train|test] [--ref-root DIR]   built-in dataset or `folder`
    --ref-images PATH                                            folder or .npz of images
    --ref-stats NPZ                                              mu/sigma (+ ADM mu_s/sigma_s)
Feature extractor: --features auto|inception|mnist-net|digits-net|shapes-net
    auto = the built-in net for a built-in dataset, else Inception (--inception-weights PATH or
    $EFFIGEN_INCEPTION_WEIGHTS: the torch-fidelity or pytorch-fid weight file; never downloaded).

    effigen eval --from runs/mnist-dit/final --num-images 5000
    torchrun --nproc_per_node=8 -m effigen eval --from DIR --num-images 50000 --ref-stats REF.npz --features inception
    effigen eval --images samples/ --ref-stats VIRTUAL_imagenet256_labeled.npz --features inception \
                 --inception-weights weights-inception-2015-12-05-6726825d.pth
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from ..eval.evaluate import (METRICS, Reference, SmallSampleWarning, default_extractor_for, evaluate_images,
                             format_table, generate_for_evaluation, load_extractor)
from ..eval.metrics import load_images
from ..training.distributed import init_distributed
from .main import check_device_flag, check_output_file, finite_float, positive_int, write_output
from .sample import checked_sampler_settings, given_as


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="effigen eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="pipeline", help="pipeline folder to generate from")
    source.add_argument("--images", help="folder of images or .npz (arr_0) of generated images")
    # `--num-images` (not `--num`): torchrun's own parser rejects `--num` as an ambiguous abbreviation of its
    # `--numa-binding`, even after `-m effigen`. Plain `effigen eval --num N` still works (argparse prefix).
    parser.add_argument("--num-images", dest="num", type=positive_int, default=5000,
                        help="images to generate (with --from)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=100)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="sampling precision")
    parser.add_argument("--steps", type=positive_int, help="sampler override")
    parser.add_argument("--cfg-scale", type=finite_float, help="sampler override")
    parser.add_argument("--solver", help="sampler override")
    parser.add_argument("--ref-dataset", help="mnist, digits, shapes or folder (default: the pipeline's dataset)")
    parser.add_argument("--ref-split", default="train", choices=["train", "test"])
    parser.add_argument("--ref-root", help="root of a `folder` reference dataset")
    parser.add_argument("--ref-num", type=positive_int, help="use only N reference images (a seeded random subset)")
    parser.add_argument("--ref-images", help="folder or .npz of reference images")
    parser.add_argument("--ref-stats", help=".npz with mu/sigma (and mu_s/sigma_s)")
    parser.add_argument("--resolution", type=positive_int,
                        help="reference resolution (default: the generated images' size)")
    parser.add_argument("--features", default="auto", help="auto, inception, mnist-net, digits-net, shapes-net")
    parser.add_argument("--inception-weights", help="path to the Inception weight file")
    parser.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated subset of {','.join(METRICS)}")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: a GPU when there is one)")
    parser.add_argument("--json", help="write the JSON record here")
    parser.add_argument("--save-images", help="also save the generated images as an ADM-style .npz")
    parser.add_argument("--no-cache", action="store_true", help="recompute reference features")
    args = parser.parse_args(argv)

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        parser.error(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}" if unknown else
                     f"--metrics is empty; choose from {', '.join(METRICS)}")
    if args.images and not (args.ref_dataset or args.ref_images or args.ref_stats):
        parser.error("give a reference: --ref-dataset, --ref-images or --ref-stats")
    check_device_flag(args.device)

    def check_outputs() -> None:  # before the work, not after an hour of generation
        for flag, path in (("--json", args.json), ("--save-images", args.save_images)):
            if path:
                check_output_file(path, flag)

    context = init_distributed(args.device)
    settings = {"precision": args.precision}
    started = time.perf_counter()
    dataset_name = args.ref_dataset
    if args.pipeline:
        from ..pipeline import Pipeline

        folder = args.pipeline  # a local pipeline folder; nothing is downloaded
        pipeline = Pipeline.from_pretrained(folder, device=context.device)
        overrides = {"num_steps": args.steps, "cfg_scale": args.cfg_scale, "solver": args.solver}
        sampler = checked_sampler_settings(pipeline, overrides, given_as(overrides, {}))
        settings.update(pipeline=str(args.pipeline), sampler=sampler.__dict__,
                        number_of_evaluations=pipeline.number_of_evaluations(**overrides))
        if dataset_name is None and not (args.ref_images or args.ref_stats):
            dataset_name = pipeline.info.get("dataset")
            if dataset_name is None:
                parser.error("the pipeline does not record its dataset; give --ref-dataset, --ref-images or --ref-stats")
        check_outputs()
        images = generate_for_evaluation(pipeline, args.num, seed=args.seed, batch_size=args.batch_size,
                                         precision=args.precision, **overrides)
    else:
        check_outputs()
        images = load_images(args.images)
    settings["generation_seconds"] = round(time.perf_counter() - started, 2)
    if not context.is_main:
        return 0
    if args.save_images:
        import numpy as np

        write_output("--save-images", args.save_images,
                     lambda: np.savez(args.save_images, arr_0=images.permute(0, 2, 3, 1).numpy()))
    if not (dataset_name or args.ref_images or args.ref_stats):
        parser.error("give a reference: --ref-dataset, --ref-images or --ref-stats")
    extractor_name = args.features if args.features != "auto" else default_extractor_for(dataset_name)
    extractor = load_extractor(extractor_name, args.inception_weights, device=context.device)
    reference = Reference(dataset=dataset_name if not (args.ref_images or args.ref_stats) else None,
                          split=args.ref_split, resolution=args.resolution or int(images.shape[-1]), root=args.ref_root,
                          num=args.ref_num, images=args.ref_images, statistics=args.ref_stats)
    with warnings.catch_warnings():  # printed once below, as one line each, and kept in the record
        warnings.simplefilter("ignore", SmallSampleWarning)
        record = evaluate_images(images, reference, extractor, metrics, batch_size=args.batch_size,
                                 seed=args.seed if args.pipeline else None, settings=settings,
                                 use_cache=not args.no_cache)
    for problem in record["warnings"]:
        print(f"effigen eval: warning: {problem}", file=sys.stderr)
    print(format_table(record))
    if args.json:
        path = Path(args.json)
        write_output("--json", path, lambda: path.write_text(json.dumps(record, indent=2) + "\n"))
        print(f"record written to {args.json}")
    return 0
