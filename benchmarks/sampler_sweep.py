"""FID (built-in feature net) against sampling steps for each solver of a pipeline, in one process.

    python benchmarks/sampler_sweep.py --from runs/mnist-dit/final --num-images 500 --steps 4,8,16,32 \
        --solvers euler,heun,euler_maruyama --json sweep.json
    python benchmarks/sampler_sweep.py --from runs/mnist-dit-ddpm/final --solvers ddim,ddpm --steps 10,25,50,100
    python benchmarks/sampler_sweep.py --from DIR --solvers ddim --set eta=1.0 --json ddim-eta1.json
    python benchmarks/plot_sweep.py sweep.json ddim-eta1.json --out fid-vs-nfe.png

Prints one row per (solver, steps): network evaluations per image (with guidance), seconds, FID, precision, recall.
`--set KEY=VALUE` (repeatable) overrides any other sampler setting of the folder for every row (e.g. DDIM's eta).
"""

from __future__ import annotations

import argparse
import json
import time

import yaml

from effigen.eval.evaluate import Reference, default_extractor_for, evaluate_images, generate_for_evaluation, load_extractor
from effigen.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True)
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--steps", default="4,8,16,32")
    parser.add_argument("--solvers", default="euler,heun,euler_maruyama")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another sampler setting for every row, e.g. eta=1.0 or cfg_scale=3")
    parser.add_argument("--json")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    pipeline = Pipeline.from_pretrained(args.source)
    dataset = pipeline.info["dataset"]
    extractor = load_extractor(default_extractor_for(dataset))
    reference = Reference(dataset=dataset, split="train", resolution=pipeline.sample_shape[-1])
    rows = []
    print(f"{'solver':<16}{'steps':>6}{'NFE':>6}{'seconds':>9}{'FID':>9}{'prec':>7}{'recall':>7}")
    for solver in args.solvers.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            start = time.perf_counter()
            images = generate_for_evaluation(pipeline, args.num_images, seed=args.seed, precision=args.precision,
                                             progress=False, **overrides, solver=solver, num_steps=steps)
            seconds = time.perf_counter() - start
            record = evaluate_images(images, reference, extractor, ("fid", "precision_recall"), progress=False)
            values = {m["metric"]: m["value"] for m in record["metrics"]}
            nfe = pipeline.number_of_evaluations(**overrides, solver=solver, num_steps=steps)
            rows.append({"solver": solver, "steps": steps, "nfe": nfe, "seconds": seconds, **values})
            print(f"{solver:<16}{steps:>6}{nfe:>6}{seconds:>9.1f}{values['fid']:>9.3f}{values['precision']:>7.3f}"
                  f"{values['recall']:>7.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pipeline": args.source, "method": pipeline.method.name, "feature_extractor": extractor.name,
                       "num_images": args.num_images, "sampler_overrides": overrides, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
