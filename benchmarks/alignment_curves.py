"""FID (built-in feature net) against training steps for runs with and without representation alignment, from the
checkpoints each run kept, plus each run's training speed; optionally the plot.

    # the runs: sit.sh / sit-repa.sh / sit-haste.sh with every checkpoint kept (--trainer.keep_checkpoints=100)
    python benchmarks/alignment_curves.py --runs vanilla=runs/sit-s0,runs/sit-s1,runs/sit-s2 repa=runs/sit-repa \
        haste=runs/sit-haste --num-images 500 --json curves.json --plot docs/images/alignment/fid-vs-steps.png

For each label, every run's checkpoints/step_N/ is sampled with the folder's own sampler (or `--solver/--steps`),
`--num-images` class-balanced images with one seed, and scored against the training split of the pipeline's dataset.
Several runs under one label (seeds) give the mean and the spread (min..max) per step. The table then says, for each
label, the first evaluated step at which its FID reaches the first label's final FID (the baseline), the step-count
ratio, and the images/s each run trained at (metrics.jsonl), so the speed-up in steps can be read against the cost
of a step.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

from effigen.eval.evaluate import Reference, default_extractor_for, evaluate_images, generate_for_evaluation, load_extractor
from effigen.pipeline import Pipeline


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in (run / "checkpoints").iterdir() if (m := re.match(r"step_(\d+)$", p.name))]
    return sorted(found)


def training_speed(run: Path) -> float:
    """Median images/s over the run's logged windows (the first window includes start-up and is skipped)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["images_per_second"] for r in records[1:]] or [r["images_per_second"] for r in records]
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, metavar="LABEL=RUN[,RUN...]",
                        help="the first label is the baseline")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--solver")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--at", help="evaluate only these steps, e.g. 100,200,300,401 (default: every checkpoint)")
    parser.add_argument("--cache", help="folder of per-(run, step) results: reused when present, so several processes "
                                        "can evaluate different runs and a last call tabulates them all")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    groups: dict[str, list[Path]] = {}
    for item in args.runs:
        label, sep, paths = item.partition("=")
        if not sep:
            parser.error(f"--runs {item!r}: expected LABEL=RUN[,RUN...]")
        groups[label] = [Path(p) for p in paths.split(",")]
    overrides = {k: v for k, v in (("solver", args.solver), ("num_steps", args.steps)) if v is not None}
    first = checkpoints(next(iter(groups.values()))[0])[0][1]
    info = json.loads((first / "model_index.json").read_text())["info"]
    extractor = load_extractor(default_extractor_for(info["dataset"]))
    reference = Reference(dataset=info["dataset"], split="train", resolution=info["resolution"])
    results: dict[str, dict] = {}
    for label, runs in groups.items():
        per_run = []
        for run in runs:
            curve = []
            wanted = {int(x) for x in args.at.split(",")} if args.at else None
            for step, folder in checkpoints(run):
                if wanted is not None and step not in wanted:
                    continue
                cached = Path(args.cache) / f"{run.resolve().as_posix().replace('/', '_')}-{step}.json" if args.cache else None
                if cached is not None and cached.is_file():
                    curve.append(json.loads(cached.read_text()))
                    continue
                pipeline = Pipeline.from_pretrained(folder)
                started = time.perf_counter()
                images = generate_for_evaluation(pipeline, args.num_images, seed=args.seed, precision=args.precision,
                                                 progress=False, **overrides)
                record = evaluate_images(images, reference, extractor, ("fid",), progress=False)
                fid = record["metrics"][0]["value"]
                curve.append({"step": step, "fid": fid})
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    cached.write_text(json.dumps(curve[-1]))
                print(f"{label:<10} {run.name:<22} step {step:>6}  FID {fid:8.3f}  ({time.perf_counter() - started:.0f}s)",
                      flush=True)
            per_run.append({"run": str(run), "images_per_second": training_speed(run), "curve": curve})
        steps = sorted(set.intersection(*({p["step"] for p in r["curve"]} for r in per_run)))
        mean = []
        for step in steps:
            values = [next(p["fid"] for p in r["curve"] if p["step"] == step) for r in per_run]
            mean.append({"step": step, "fid": statistics.mean(values), "min": min(values), "max": max(values)})
        results[label] = {"runs": per_run, "mean": mean,
                          "images_per_second": statistics.mean(r["images_per_second"] for r in per_run)}
    baseline_label = next(iter(results))
    baseline = results[baseline_label]
    target, final_step = baseline["mean"][-1]["fid"], baseline["mean"][-1]["step"]
    print(f"\nbaseline {baseline_label}: final FID {target:.3f} at step {final_step} "
          f"(spread over its runs {baseline['mean'][-1]['min']:.3f}..{baseline['mean'][-1]['max']:.3f})")
    print(f"{'label':<10}{'runs':>5}{'final FID':>11}{'reaches baseline at':>21}{'steps ratio':>13}{'images/s':>10}"
          f"{'speed vs baseline':>19}   (images/s as the runs logged them: compare speeds only from runs that ran alone, "
          "or with benchmarks/alignment_speed.py)")
    for label, result in results.items():
        reach = next((p["step"] for p in result["mean"] if p["fid"] <= target), None)
        ratio = f"{final_step / reach:.2f}x" if reach else "-"
        speed = result["images_per_second"] / baseline["images_per_second"]
        result.update(reaches_baseline_at=reach, steps_speedup=(final_step / reach) if reach else None,
                      speed_vs_baseline=speed)
        print(f"{label:<10}{len(result['runs']):>5}{result['mean'][-1]['fid']:>11.3f}{str(reach or 'never'):>21}"
              f"{ratio:>13}{result['images_per_second']:>10.1f}{speed:>18.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"num_images": args.num_images, "seed": args.seed,
                                               "feature_extractor": extractor.name, "sampler_overrides": overrides,
                                               "results": results}, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, result in results.items():
            xs = [p["step"] for p in result["mean"]]
            line, = ax.plot(xs, [p["fid"] for p in result["mean"]], marker="o", label=f"{label} ({len(result['runs'])} run"
                                                                                    f"{'s' if len(result['runs']) > 1 else ''})")
            if len(result["runs"]) > 1:
                ax.fill_between(xs, [p["min"] for p in result["mean"]], [p["max"] for p in result["mean"]],
                                color=line.get_color(), alpha=0.2)
        ax.set_xlabel("training steps")
        ax.set_ylabel(f"FID ({extractor.name}, {args.num_images} samples)")
        values = [p["fid"] for r in results.values() for p in r["mean"]]
        if max(values) / max(min(values), 1e-9) > 10:  # a log axis only where the values span more than a decade
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
