"""Neon (arXiv 2510.03597) on generators effigen trained on built-in MNIST: FID before and after, the chosen w, and the
extra compute as a fraction of the base training (images and wall time).

    OMP_NUM_THREADS=1 python benchmarks/neon_mnist.py --threads 1 --out /work/scratch/neon \
        --model var=runs/mnist-var/final --cfg var=1.5,3 \
        --model dit=runs/mnist-dit/final --cfg dit=1.5,2,3 \
        --num-synthetic 1000 --finetune-steps 60 --lr 2e-4 --w 0.5,1,2,4 --eval-samples 500 --confirm-samples 1000

For each model, `effigen neon` (effigen.post.neon.run_neon) runs into OUT/NAME with the same settings; the sweep
chooses (w, cfg) by FID (mnist-net) against the held-out test split. Because that choice is tuned on the FID itself,
the base (at its own best cfg from the same sweep) and the Neon folder are scored again with fresh seeds
(`--confirm-samples`, 0 to skip) against the training split (4,500 images, not used by the sweep); so are the base and
the best w at the folder's saved cfg (the model's usual sampler, the setting the paper's argument is about).

Base training cost comes from the base run's folder (final/..): images seen (checkpoints/*/train_state/state.json)
and training seconds (metrics.jsonl); Neon's cost is the synthetic images (sampling) plus the fine-tune's images,
and the wall time of generation + fine-tune (the sweep's evaluation is reported apart: it is evaluation, as the
paper's FID grid is).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from effigen.eval.evaluate import Reference, default_extractor_for, load_extractor, reference_features
from effigen.io import load_weights, read_json
from effigen.pipeline import Pipeline
from effigen.post.neon import NeonConfig, _file_digest, merge_state_dicts, run_neon, score


def base_training_cost(folder: Path) -> dict:
    """Images seen and seconds of the run that wrote `folder` (a run's final/), from its checkpoints and metrics."""
    run = folder.parent
    images = None
    for state in sorted(run.glob("checkpoints/step_*/train_state/state.json")):
        images = max(images or 0, json.loads(state.read_text())["images_seen"])
    seconds = None
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        # a resumed run restarts elapsed_seconds: add the last value of every segment
        seconds, last = 0.0, 0.0
        for record in records:
            if record.get("elapsed_seconds", 0.0) < last:
                seconds += last
            last = record.get("elapsed_seconds", last)
        seconds += last
    return {"images": images, "seconds": seconds}


def confirm(pipeline: Pipeline, base: dict, finetuned: dict, cfg: float, w: float, num: int, seed: int,
            precision: str, cache: Path, finetuned_digest: str) -> dict:
    """FID of the merge at (cfg, w) with fresh seeds against the training split (a reference the sweep did not use);
    results are cached in `cache` (JSON) by (cfg, w, num, seed, precision, the fine-tune's weights unless w = 0)."""
    key = f"{cfg}|{w}|{num}|{seed}|{precision}|{finetuned_digest if w else 'base'}"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in done:
        pipeline.generator.load_state_dict(merge_state_dicts(base, finetuned, w))
        dataset, resolution = pipeline.info["dataset"], pipeline.sample_shape[-1]
        extractor = load_extractor(default_extractor_for(dataset))
        feats = reference_features(Reference(dataset=dataset, split="train", resolution=resolution), extractor,
                                   progress=False)
        done[key] = score(pipeline, extractor, feats, num, seed, precision, 64, cfg_scale=cfg)
        cache.write_text(json.dumps(done, indent=1))
    return {"cfg_scale": cfg, "w": w, **done[key]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="NAME=PIPELINE_FOLDER (repeat)")
    parser.add_argument("--cfg", action="append", default=[], help="NAME=1.5,3: guidance scales swept for NAME")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-synthetic", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--w", default="0.5,1,2,4")
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--confirm-samples", type=int, default=1000)
    parser.add_argument("--early-stop", type=float)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--tag", default="neon_mnist", help="name of the result files OUT/TAG.json and OUT/TAG.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfgs = {name: tuple(float(c) for c in text.split(",")) for name, text in (item.split("=", 1) for item in args.cfg)}
    rows = []
    for item in args.model:
        name, folder = item.split("=", 1)
        folder = Path(folder)
        config = NeonConfig(num_synthetic=args.num_synthetic, seed=args.seed, finetune_steps=args.finetune_steps,
                            learning_rate=args.lr, batch_size=args.batch_size, ema_decay=args.ema_decay,
                            weights=tuple(float(w) for w in args.w.split(",")), cfg_scales=cfgs.get(name),
                            eval_samples=args.eval_samples, early_stop=args.early_stop, precision=args.precision,
                            progress=False)
        started = time.perf_counter()
        summary = run_neon(folder, Path(args.out) / name, config)
        wall = time.perf_counter() - started
        sweep = read_json(Path(args.out) / name / "sweep.json")
        base_cost = base_training_cost(folder)
        cost = summary["cost"]
        row = {"model": name, "base": str(folder), "summary": summary, "sweep_rows": sweep["rows"],
               "base_training": base_cost, "neon_wall_seconds_this_run": wall}
        if base_cost["images"]:
            row["extra_images_fraction"] = (cost["synthetic_images"] + cost["finetune_images"]) / base_cost["images"]
        if base_cost["seconds"] and cost["synthetic_seconds"] is not None and cost["finetune_seconds"] is not None:
            extra = cost["synthetic_seconds"] + cost["finetune_seconds"]
            row["extra_seconds_fraction"] = extra / base_cost["seconds"]
        if args.confirm_samples:
            # the base at its best cfg vs Neon at its best (cfg, w); and both at the folder's saved cfg
            pipeline = Pipeline.from_pretrained(folder)
            base_weights = load_weights(folder / "generator" / "model.safetensors")
            tuned_file = Path(args.out) / name / "finetune" / "final" / "generator" / "model.safetensors"
            tuned, tuned_digest = load_weights(tuned_file), _file_digest(tuned_file)
            saved_cfg = pipeline.sampler_config.cfg_scale
            at_saved = min((r for r in sweep["rows"] if r["cfg_scale"] == saved_cfg), key=lambda r: r["fid"],
                           default=None)
            points = {"base": (summary["base_best_cfg"], 0.0), "neon": (summary["cfg_scale"], summary["w"])}
            if at_saved is not None:  # (repeated points are scored once: the cache)
                points.update({"base_saved_cfg": (saved_cfg, 0.0), "neon_saved_cfg": (saved_cfg, at_saved["w"])})
            seed = args.seed + 1000
            cache = Path(args.out) / name / "confirm.json"
            row["confirm"] = {label: confirm(pipeline, base_weights, tuned, cfg, w, args.confirm_samples, seed,
                                             args.precision, cache, tuned_digest) for label, (cfg, w) in points.items()}
            row["confirm"].update(num=args.confirm_samples, seed=seed)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("sweep_rows",)}, indent=1, default=str), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.tag}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    lines = ["| model | base FID, best cfg | Neon FID (w, cfg) | fresh seeds, train ref: base -> Neon | "
             "at the saved cfg: base -> Neon (w), sweep / fresh | extra images | extra time |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        s, c = row["summary"], row.get("confirm") or {}
        fresh = f"{c['base']['fid']:.3f} -> {c['neon']['fid']:.3f}" if "base" in c else "-"
        saved = "-"
        if "base_saved_cfg" in c:
            sweep_rows = {(r["cfg_scale"], r["w"]): r["fid"] for r in row["sweep_rows"]}
            cfg, w = c["neon_saved_cfg"]["cfg_scale"], c["neon_saved_cfg"]["w"]
            saved = (f"cfg {cfg}: {sweep_rows[(cfg, 0.0)]:.3f} -> {sweep_rows[(cfg, w)]:.3f} (w {w:g}) / "
                     f"{c['base_saved_cfg']['fid']:.3f} -> {c['neon_saved_cfg']['fid']:.3f}")
        lines.append(f"| {row['model']} | {s['base_fid_best_cfg']:.3f} (cfg {s['base_best_cfg']}) | {s['fid']:.3f} "
                     f"(w {s['w']:g}, cfg {s['cfg_scale']}) | {fresh} | {saved} | "
                     f"{100 * row.get('extra_images_fraction', float('nan')):.1f}% | "
                     f"{100 * row.get('extra_seconds_fraction', float('nan')):.1f}% |")
    (Path(args.out) / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
