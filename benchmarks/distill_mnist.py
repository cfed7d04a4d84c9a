"""Guided distillation on MNIST (docs/distill.md): distil a mnist-dit teacher (stage 1, then progressive rounds
teacher_steps -> ... -> 1 step), then measure quality (FID / precision / recall on the built-in mnist-net feature net,
the same class-balanced labels and seeds for every row) and sampling speed (images/s of the evaluation batches, all
rows in one process) for the guided teacher at several step counts and for every student.

    OMP_NUM_THREADS=1 python benchmarks/distill_mnist.py --teacher /work/scratch/teachers/mnist-dit/final \
        --out /work/scratch/distill/mnist --teacher-steps 8 --stage1-minutes 5 --round-minutes 4 \
        --num-images 1000 --json /work/scratch/distill/mnist.json

The distillation is skipped when OUT/final exists (rerun with --redo-distill after deleting OUT to train again;
an interrupted run resumes round by round). Images/s is the generation rate of the evaluation images (batch 64).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from effigen.cli.distill import run as distill_cli
from effigen.eval.evaluate import Reference, evaluate_images, generate_for_evaluation, load_extractor
from effigen.pipeline import Pipeline


def distill(args) -> None:
    out = Path(args.out)
    common = ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--max-steps", "1000000",
              "--trainer.progress=false", f"--trainer.precision={args.train_precision}"]
    if not (out / "guidance" / "final").is_dir():
        distill_cli(["--from", args.teacher, "--out", str(out), "--stage", "guidance", "--teacher-steps",
                     str(args.teacher_steps), "--steps", str(args.teacher_steps), "--max-minutes", str(args.stage1_minutes),
                     *common])
    distill_cli(["--from", str(out / "guidance" / "final"), "--out", str(out), "--stage", "progressive", "--steps",
                 str(args.steps), "--max-minutes", str(args.round_minutes), *common])


def rows_to_measure(args) -> list[tuple[str, str, dict]]:
    """(label, folder, sampler overrides): the guided teacher at its saved sampler and with Euler at 2T, T, T/2, ...
    steps; the stage-1 student (one evaluation per step, no progressive rounds) at the same step counts; the
    progressive students at their own step counts, deterministic and stochastic."""
    out = Path(args.out)
    teacher = Pipeline.from_pretrained(args.teacher)
    saved = teacher.sampler_config
    counts = [2 * args.teacher_steps]
    while counts[-1] > args.steps:
        counts.append(counts[-1] // 2)
    rows = [(f"teacher {saved.solver} {saved.num_steps}, cfg {saved.cfg_scale}", args.teacher, {})]
    rows += [(f"teacher euler {n}, cfg {saved.cfg_scale}", args.teacher, {"solver": "euler", "num_steps": n}) for n in counts]
    stage1 = str(out / "guidance" / "final")
    rows += [(f"stage-1 student {n} steps", stage1, {"num_steps": n}) for n in counts]
    for n in counts:
        if n < args.teacher_steps:
            folder = str(out / f"progressive_{2 * n}to{n}" / "final")
            rows.append((f"student {n} steps", folder, {}))
            if n > 1:
                rows.append((f"student {n} steps, stochastic", folder, {"stochastic": True}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="/work/scratch/teachers/mnist-dit/final")
    parser.add_argument("--out", default="/work/scratch/distill/mnist")
    parser.add_argument("--teacher-steps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--stage1-minutes", type=float, default=5.0)
    parser.add_argument("--round-minutes", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--train-precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--skip-distill", action="store_true", help="only measure existing folders")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_distill and not (Path(args.out) / "final").is_dir():
        started = time.perf_counter()
        distill(args)
        print(f"distillation: {(time.perf_counter() - started) / 60:.1f} minutes", flush=True)

    extractor = load_extractor("mnist-net")
    results = []
    for label, folder, overrides in rows_to_measure(args):
        pipeline = Pipeline.from_pretrained(folder)
        reference = Reference(dataset=pipeline.info["dataset"], split="train", resolution=pipeline.sample_shape[-1])
        started = time.perf_counter()
        images = generate_for_evaluation(pipeline, args.num_images, seed=args.seed, precision=args.precision,
                                         progress=False, **overrides)
        seconds = time.perf_counter() - started
        record = evaluate_images(images, reference, extractor, metrics=("fid", "precision_recall"), progress=False)
        metrics = {m["metric"]: m["value"] for m in record["metrics"]}
        row = {"row": label, "folder": folder, "overrides": overrides, "nfe": pipeline.number_of_evaluations(**overrides),
               "images_per_second": args.num_images / seconds, **metrics}
        results.append(row)
        print(f"{label:<34} NFE {row['nfe']:>3}  FID {metrics['fid']:7.3f}  precision {metrics['precision']:.3f}  "
              f"recall {metrics['recall']:.3f}  {row['images_per_second']:8.1f} img/s", flush=True)
    print(f"\nfeature net {extractor.name}, {args.num_images} images per row, seed {args.seed}, {args.precision}, "
          f"{args.threads} thread(s)\n")
    print("| sampler | NFE / image | FID | precision | recall | images/s |\n|---|---:|---:|---:|---:|---:|")
    for row in results:
        print(f"| {row['row']} | {row['nfe']} | {row['fid']:.2f} | {row['precision']:.3f} | {row['recall']:.3f} | "
              f"{row['images_per_second']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": results}, indent=2))


if __name__ == "__main__":
    main()
