"""`effigen report`: reproduce effigen's results table (docs/results.md) with one command.

    python -m effigen.cli.report --budget full --docs docs                 # every method, >= 10 min training each
    python -m effigen.cli.report --budget smoke --out /tmp/report-smoke    # about a minute per method
    python -m effigen.cli.report --budget full --docs docs --resume --methods lightningdit-latent   # add one later

Trains each method's recipe (benchmarks/results/*.sh) two at a time with OMP_NUM_THREADS=1, evaluates them all with
one protocol, benchmarks their sampling in one process and writes results.md with a grid per method and a plot of FID
against sampling time (see `effigen.report`). Runs, logs and per-method JSON results go under --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run(argv: list[str]) -> int:
    from ..report import BUDGETS, RECIPES, Report, selected_recipes

    parser = argparse.ArgumentParser(prog="effigen report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="smoke")
    parser.add_argument("--out", default=None, help="runs, logs and JSON results (default: runs/results-BUDGET)")
    parser.add_argument("--docs", default=None, help="write results.md and images/results/ here (default: --out); "
                        "`--docs docs` writes docs/results.md")
    parser.add_argument("--methods", help="comma-separated subset of: " + ", ".join(r.name for r in RECIPES
                                                                                  if r.kind == "generator"))
    parser.add_argument("--resume", action="store_true", help="reuse finished runs and results under --out")
    parser.add_argument("--jobs", type=int, default=2, help="recipes trained at a time (one core each)")
    parser.add_argument("--no-spread", action="store_true", help="skip the second-seed run of dit-flow")
    parser.add_argument("--train-minutes", type=float, help="override the budget's training minutes per generator")
    parser.add_argument("--num-images", type=int, help="override the budget's evaluation samples per method")
    parser.add_argument("--clock", choices=("cpu", "wall"), help="what the training minutes count (default cpu: CPU "
                        "time of each training process, equal work on a shared machine; wall: elapsed time)")
    parser.add_argument("--schedule", choices=("time", "steps"), help="the recipes' learning-rate clock (default "
                        "time: each cosine spans the whole budget; steps: it spans the recipe's estimated step count)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # evaluation and the speed benchmark: one core, as every training run
    budget = BUDGETS[args.budget]
    if any(v is not None for v in (args.train_minutes, args.num_images, args.clock, args.schedule)):
        import dataclasses

        budget = dataclasses.replace(budget, train_minutes=args.train_minutes or budget.train_minutes,
                                     num_images=args.num_images or budget.num_images, clock=args.clock or budget.clock,
                                     schedule=args.schedule or budget.schedule)
    try:
        recipes = selected_recipes(args.methods, spread=not args.no_spread)
    except ValueError as e:
        parser.error(str(e))
    out = Path(args.out or f"runs/results-{budget.name}")
    report = Report(out=out, budget=budget, recipes=recipes, resume=args.resume, jobs=args.jobs,
                    docs=Path(args.docs) if args.docs else None, log=lambda m: print(m, flush=True))
    page = report.run()
    print(f"wrote {page}")
    bad = [name for name, r in report.results.items() if r.get("status") not in ("ok", "trained", "skipped")]
    if bad:
        print(f"not all methods finished: {', '.join(bad)} (see the page)")
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
