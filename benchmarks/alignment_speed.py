"""Training step time of a generator with and without representation alignment, in one process.

    python benchmarks/alignment_speed.py --threads 1 --repeats 5
    python benchmarks/alignment_speed.py --preset mnist-sit --set network.hidden_size=256 --set network.num_heads=4

Builds the same experiment three times (`align.method` none, repa, haste; REPA/HASTE with the preset's or the
data's built-in teacher) and times full `Trainer.train_step`s (objective loss under autocast, the teacher forward,
backward through the network and the projector, clipping, AdamW, EMA) on the same batches. The runs take turns
(--steps steps each per round, --repeats rounds) so that load changes hit them alike; images/s is the median over
rounds, with the ratio to the unaligned run. HASTE after its stop step costs what the unaligned run costs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def build_trainer(preset: str, method: str, overrides: list[str], out: str):
    from effigen.data import build_dataset
    from effigen.registry import build_objective
    from effigen.training.experiment import build_experiment_dict, parse_experiment
    from effigen.training.run import aligned
    from effigen.training.trainer import Trainer

    data = build_experiment_dict(preset, overrides=[*overrides, f"--align.method={method}", f"--trainer.output_dir={out}",
                                                    "--trainer.progress=false"])
    config = parse_experiment(data)
    dataset = build_dataset(config.data, "train")
    config = parse_experiment(data, num_classes=dataset.num_classes)
    torch.manual_seed(0)
    network = config.method_spec.network_class(config.network)
    objective = build_objective(config.method_spec, config.objective, dataset.num_classes)
    if config.align.enabled:
        objective = aligned(objective, config, network)
    trainer = Trainer(config.trainer, network, objective, dataset, lambda *a: None)
    return trainer, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mnist-sit")
    parser.add_argument("--set", action="append", default=["network.hidden_size=256", "network.num_heads=4"],
                        metavar="KEY=VALUE", help="experiment overrides (default: the report recipe's SiT width)")
    parser.add_argument("--align-block", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"--{item}" for item in args.set] + [f"--align.block={args.align_block}", "--align.projector_dim=512"]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("none", "repa", "haste"):
            trainer, config = build_trainer(args.preset, method, overrides, f"{tmp}/{method}")
            runs[method] = (trainer, trainer._loader())
            trainer.train_step(runs[method][1])  # warm-up
        batch = config.trainer.batch_size
        seconds = {m: [] for m in runs}
        for _ in range(args.repeats):
            for method, (trainer, batches) in runs.items():
                started = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step(batches)
                seconds[method].append(time.perf_counter() - started)
    print(f"{args.preset} ({', '.join(args.set)}), batch {batch}, {torch.get_num_threads()} thread(s), "
          f"{args.repeats} rounds of {args.steps} steps")
    base = None
    for method, times in seconds.items():
        rate = batch * args.steps / statistics.median(times)
        base = base or rate
        print(f"  {method:<6} {rate:8.1f} images/s   {rate / base:5.2f}x   step {1000 * statistics.median(times) / args.steps:7.1f} ms")


if __name__ == "__main__":
    main()
