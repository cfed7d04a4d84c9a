"""`effigen train`: train a generator from a preset / config file / overrides.

    effigen train --preset mnist-dit
    effigen train --preset mnist-dit --trainer.max_steps=200 --network.depth=4
    effigen train --preset mnist-sit --align repa                 # + REPA to the built-in mnist-vit teacher
    effigen train --preset mnist-sit --align haste --align.stop_step=600 --align.teacher=dinov2-vitb14=PATH
    torchrun --nproc_per_node=2 -m effigen train --preset mnist-dit --trainer.device=cpu

Writes into trainer.output_dir: config.yaml, metrics.jsonl, samples/*.png, checkpoints/step_N/ (pipeline
folders with train_state/), final/ (the EMA pipeline, ready for `effigen sample --from`) and summary.json.
The work itself is `effigen.training.run.build_and_train`.
"""

from __future__ import annotations

import argparse

from ..training.experiment import build_experiment_dict, parse_experiment
from ..training.run import build_and_train

__all__ = ["build_and_train", "run"]


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="effigen train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="experiment preset (see `effigen presets`)")
    parser.add_argument("--config", help="YAML or JSON experiment file (applied over the preset)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--align", choices=["none", "repa", "haste"],
                        help="representation alignment to a frozen teacher (= --align.method=...; docs/alignment.md)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
    if bad:
        parser.error(f"unrecognised arguments {bad}; config overrides look like --section.key=value")
    if args.preset is None and args.config is None:
        args.preset = "mnist-dit"
    if args.align is not None:
        overrides.append(f"--align.method={args.align}")
    config_dict = build_experiment_dict(args.preset, args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(parse_experiment(config_dict).to_dict(), sort_keys=False))
        return 0
    summary = build_and_train(config_dict)
    if "grid" in summary:
        print(f"trained {summary['steps']} steps ({summary['steps_this_run']} this run) in {summary['seconds']:.1f}s: "
              f"{summary['images_per_second']:.1f} images/s, final loss {summary['final_loss']}")
        if summary.get("budget_clock") == "cpu":
            print(f"budget clock: {summary['budget_seconds_this_run']:.1f} CPU seconds this run "
                  f"(trainer.budget_clock=cpu)")
        print(f"pipeline folder: {summary['pipeline']}")
        print(f"sample grid: {summary['grid']}")
        if "latent_channel_std" in summary:
            stds = summary["latent_channel_std"]
            shown = ", ".join(map(str, stds[:8])) + (f", ... ({len(stds)} channels)" if len(stds) > 8 else "")
            print(f"latent statistics stored with the tokenizer (std per channel before normalisation: [{shown}])")
        if "codebook_usage_per_scale" in summary:
            print(f"codebook usage per scale (% of codes in use, coarse to fine): {summary['codebook_usage_per_scale']}")
    return 0
