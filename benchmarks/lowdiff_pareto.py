"""LowDiff cascade against single-resolution SiT: FID (built-in feature net) against total sampling FLOPs, in one process.

    python benchmarks/lowdiff_pareto.py --lowdiff runs/mnist-lowdiff/final --lowdiff runs/lowdiff-concat/final \
        --sit runs/mnist-sit/final \
        --budgets "4,2,1;8,4,2;16,8,4" --sit-steps 2,4,8,16 --num-images 300 \
        --json docs/images/lowdiff/pareto.json --plot docs/images/lowdiff/pareto.png

Each row samples --num-images class-balanced images with one sampler setting (the folder's own sampler otherwise,
with --solver), timing the generation (images/s; rows alternate between the two pipelines so machine-load changes hit
both) and counting the FLOPs of generating one image (torch's FlopCounterMode through effigen.bench.count_flops,
guidance's doubled batch included). LowDiff rows set `stage_steps` (low to high resolution); SiT rows set num_steps.
`--step-time` instead measures the training step cost of both presets (mnist-lowdiff, mnist-sit at the same DiT
width/depth/heads/patch) in this one process, interleaved: loss + backward + AdamW on a batch of MNIST-shaped data,
median over rounds; the ratio sets the step counts for equal step-time training.
The gain at equal FID: for each LowDiff point inside SiT's FID range, SiT's FLOPs and images/s at that FID
(interpolated linearly in log FID along SiT's curve), then LowDiff's images/s divided by SiT's.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from effigen.bench.throughput import count_flops
from effigen.eval.evaluate import Reference, default_extractor_for, evaluate_images, generate_for_evaluation, load_extractor
from effigen.pipeline import Pipeline


def measure(pipeline, reference, extractor, args, label, overrides):
    start = time.perf_counter()
    images = generate_for_evaluation(pipeline, args.num_images, seed=args.seed, precision=args.precision,
                                     progress=False, solver=args.solver, **overrides)
    seconds = time.perf_counter() - start
    record = evaluate_images(images, reference, extractor, ("fid",), progress=False)
    fid = {m["metric"]: m["value"] for m in record["metrics"]}["fid"]
    flops, _ = count_flops(lambda: pipeline([0], seed=0, precision="fp32", solver=args.solver, **overrides))
    row = {"method": label, **overrides, "nfe": pipeline.number_of_evaluations(solver=args.solver, **overrides),
           "gflops_per_image": flops / 1e9, "images_per_s": args.num_images / seconds, "fid": fid}
    print(f"{label:<8}{str(overrides):<28}{row['nfe']:>5}{row['gflops_per_image']:>10.3f}{row['images_per_s']:>9.1f}"
          f"{fid:>9.2f}", flush=True)
    return row


def at_equal_fid(fid: float, sit_rows: list[dict], key: str) -> float | None:
    """SiT's `key` at `fid`, interpolated in log FID along its curve ordered by FLOPs; None outside its range."""
    rows = sorted(sit_rows, key=lambda r: r["gflops_per_image"])
    for a, b in zip(rows, rows[1:]):
        lo, hi = sorted((a["fid"], b["fid"]))
        if lo <= fid <= hi and a["fid"] != b["fid"]:
            w = (math.log(fid) - math.log(a["fid"])) / (math.log(b["fid"]) - math.log(a["fid"]))
            return float(np.exp((1 - w) * np.log(a[key]) + w * np.log(b[key])))
    return None


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = sorted({r["method"] for r in rows}, key=lambda m: (m != "sit", m))
    for label, marker in zip(labels, "osD^v"):
        pts = sorted((r for r in rows if r["method"] == label), key=lambda r: r["gflops_per_image"])
        ax.plot([r["gflops_per_image"] for r in pts], [r["fid"] for r in pts], marker=marker,
                label="SiT (32 px only)" if label == "sit" else f"LowDiff 8-16-32, {label[8:]}")
        for r in pts:
            text = "/".join(map(str, r["stage_steps"])) if label != "sit" else str(r["num_steps"])
            ax.annotate(text, (r["gflops_per_image"], r["fid"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_xlabel("sampling GFLOPs per image")
    ax.set_ylabel("FID (mnist-net)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def step_time(batch: int = 64, rounds: int = 5, steps: int = 4) -> None:
    import statistics

    import torch

    from effigen.models.dit import DiT, DiTConfig
    from effigen.models.lowdiff import LOWDIFF_PRESETS, LowDiffConfig, LowDiffNet
    from effigen.objectives.flow_matching import RectifiedFlow, RectifiedFlowConfig
    from effigen.objectives.lowdiff import LowDiffCascade, LowDiffObjectiveConfig
    from effigen.rng import BatchRandom
    from effigen.training.experiment import EXPERIMENT_PRESETS

    torch.manual_seed(0)
    sit_preset, ld_preset = EXPERIMENT_PRESETS["mnist-sit"], EXPERIMENT_PRESETS["mnist-lowdiff"]
    sit = DiT(DiTConfig(input_size=32, in_channels=3, num_classes=10, **sit_preset["network"]))
    ld = LowDiffNet(LowDiffConfig(input_size=32, in_channels=3, num_classes=10,
                                  **LOWDIFF_PRESETS[ld_preset["network_preset"]], **ld_preset["network"]))
    runs = {"sit": (sit, RectifiedFlow(RectifiedFlowConfig(**sit_preset["objective"]), 10)),
            "lowdiff": (ld, LowDiffCascade(LowDiffObjectiveConfig(**ld_preset["objective"]), 10))}
    data = {"images": torch.rand(batch, 3, 32, 32) * 2 - 1, "labels": torch.randint(10, (batch,))}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (model, objective) in runs.items():
            start = time.perf_counter()
            for i in range(steps):
                loss = objective.loss(model, data, BatchRandom.local(r * steps + i, batch))["loss"]
                optimizers[name].zero_grad()
                loss.backward()
                optimizers[name].step()
            if r:
                times[name].append((time.perf_counter() - start) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:<8} {v * 1000:8.1f} ms/step (batch {batch})")
    print(f"lowdiff / sit step time: {med['lowdiff'] / med['sit']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lowdiff", action="append", help="a LowDiff pipeline folder (repeatable: e.g. both modes)")
    parser.add_argument("--sit")
    parser.add_argument("--budgets", default="4,2,1;8,4,2;16,8,4", help="LowDiff stage_steps, ';' between settings")
    parser.add_argument("--sit-steps", default="2,4,8,16")
    parser.add_argument("--solver", default="euler")
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--step-time", action="store_true", help="measure the training step costs and exit")
    if "--step-time" in __import__("sys").argv:
        step_time()
        return
    args = parser.parse_args()
    if not (args.lowdiff and args.sit):
        parser.error("--lowdiff and --sit (pipeline folders) are required unless --step-time")
    cascades = [Pipeline.from_pretrained(folder) for folder in args.lowdiff]
    sit = Pipeline.from_pretrained(args.sit)
    dataset = sit.info["dataset"]
    extractor = load_extractor(default_extractor_for(dataset))
    reference = Reference(dataset=dataset, split="train", resolution=sit.sample_shape[-1])
    budgets = [[int(n) for n in b.split(",")] for b in args.budgets.split(";")]
    sit_steps = [int(n) for n in args.sit_steps.split(",")]
    print(f"{'method':<8}{'setting':<28}{'NFE':>5}{'GFLOPs':>10}{'img/s':>9}{'FID':>9}")
    rows = []
    for i in range(max(len(budgets), len(sit_steps))):  # alternate the two pipelines
        if i < len(sit_steps):
            rows.append(measure(sit, reference, extractor, args, "sit", {"num_steps": sit_steps[i]}))
        for lowdiff in cascades if i < len(budgets) else ():
            label = f"lowdiff-{lowdiff.generator.config.mode}"
            rows.append(measure(lowdiff, reference, extractor, args, label, {"stage_steps": budgets[i]}))
    sit_rows = [r for r in rows if r["method"] == "sit"]
    for r in rows:
        if r["method"] == "sit":
            continue
        flops, speed = at_equal_fid(r["fid"], sit_rows, "gflops_per_image"), at_equal_fid(r["fid"], sit_rows, "images_per_s")
        r["sit_gflops_at_equal_fid"], r["sit_images_per_s_at_equal_fid"] = flops, speed
        r["throughput_gain_at_equal_fid"] = None if speed is None else r["images_per_s"] / speed
        gain = "outside SiT's FID range" if speed is None else (
            f"{r['images_per_s'] / speed:.2f}x images/s, {flops / r['gflops_per_image']:.2f}x fewer FLOPs")
        print(f"{r['method']} {r['stage_steps']}: FID {r['fid']:.2f}, vs SiT at equal FID: {gain}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"lowdiff": args.lowdiff, "sit": args.sit, "solver": args.solver, "num_images": args.num_images,
                       "feature_extractor": extractor.name, "rows": rows}, f, indent=2)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
