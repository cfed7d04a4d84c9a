"""`effigen neon`: Neon (arXiv 2510.03597) on a trained pipeline folder: sample a synthetic set with the model's own
sampler, fine-tune on it briefly, extrapolate away from the fine-tune (theta + w (theta - theta_finetuned)), choose w
(and the guidance scale) by held-out FID, and write the merged pipeline folder.

    effigen neon --from runs/mnist-var/final --out neon/mnist-var
    effigen neon --from runs/mnist-dit/final --out neon/mnist-dit --num-synthetic 1000 --finetune-steps 50 \
        --w 0.25,0.5,1 --cfg-scales 1.5,2 --eval-samples 500
    effigen neon --from DIR --out OUT --trainer.grad_clip=2     # any extra fine-tune setting

Writes into --out: synthetic/ (the synthetic set, a `folder` dataset), finetune/ (the fine-tune run), sweep.json and
sweep.md (FID, precision, recall, IS per (cfg, w); w = 0 is the base model), neon.json (summary and compute), and
final/ (the merged pipeline at the best (w, cfg): `effigen sample --from OUT/final`). Rerunning resumes: a complete
synthetic set and fine-tune are reused, scored sweep rows are not scored again.
"""

from __future__ import annotations

import argparse

from ..config import ConfigError


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers like 0,0.5,1, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what} is empty")
    return values


def run(argv: list[str]) -> int:
    from ..post.neon import NeonConfig, run_neon

    defaults = NeonConfig()
    parser = argparse.ArgumentParser(prog="effigen neon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="base", required=True, help="the trained pipeline folder (e.g. runs/x/final)")
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    parser.add_argument("--num-synthetic", type=int, default=defaults.num_synthetic, help="synthetic set size")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="synthetic set and fine-tune seed")
    parser.add_argument("--finetune-steps", type=int, default=defaults.finetune_steps)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate,
                        help="fine-tune learning rate (reached by a linear ramp over the whole fine-tune)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="fine-tune batch size")
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay,
                        help="the fine-tuned weights are the fine-tune's EMA with this decay (0: its raw weights)")
    parser.add_argument("--w", default=",".join(f"{w:g}" for w in defaults.weights),
                        help="extrapolation weights to try (0, the base model, is always scored)")
    parser.add_argument("--cfg-scales", help="guidance scales swept jointly with w (default: the folder's saved one)")
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples, help="images per sweep point")
    parser.add_argument("--eval-seed", type=int, help="seed of the sweep's samples (default: --seed + 1)")
    parser.add_argument("--feature-net", help="mnist-net, digits-net, shapes-net or inception (default: the dataset's)")
    parser.add_argument("--inception-weights", help="local Inception weight file (for --feature-net inception)")
    parser.add_argument("--ref-split", default=defaults.reference_split, choices=["train", "test"],
                        help="reference split for the FID (default: the held-out test split)")
    parser.add_argument("--ref-dataset", help="reference dataset (default: the one recorded in the folder)")
    parser.add_argument("--ref-root", help="root of a `folder` reference dataset")
    parser.add_argument("--early-stop", type=float, help="stop a guidance scale's w sweep once FID > best + this")
    parser.add_argument("--precision", default=defaults.precision, choices=["fp32", "bf16", "fp16"],
                        help="fine-tune autocast and sampling precision")
    parser.add_argument("--sample-batch-size", type=int, default=defaults.sample_batch_size)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o or "." not in o.split("=", 1)[0]]
    if bad:
        parser.error(f"unrecognised arguments {bad}; fine-tune settings look like --trainer.key=value")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = NeonConfig(
        num_synthetic=args.num_synthetic, seed=args.seed, finetune_steps=args.finetune_steps, learning_rate=args.lr,
        batch_size=args.batch_size, ema_decay=args.ema_decay, weights=parse_floats(args.w, "--w"),
        cfg_scales=parse_floats(args.cfg_scales, "--cfg-scales"), eval_samples=args.eval_samples,
        eval_seed=args.eval_seed, feature_net=args.feature_net, inception_weights=args.inception_weights,
        reference_split=args.ref_split, reference_dataset=args.ref_dataset, reference_root=args.ref_root,
        early_stop=args.early_stop, precision=args.precision, sample_batch_size=args.sample_batch_size,
        device=args.device, finetune_overrides=tuple(overrides), progress=not args.quiet)
    summary = run_neon(args.base, args.out, config)
    cost = summary["cost"]
    saved = summary["base_fid_saved_cfg"]
    print(f"neon: best w {summary['w']:g} at cfg {summary['cfg_scale']}: FID ({summary['feature_extractor']}) "
          f"{summary['fid']:.3f}; base {summary['base_fid_best_cfg']:.3f} at its best cfg {summary['base_best_cfg']}"
          + (f", {saved:.3f} at the saved cfg" if saved is not None else ""))
    print(f"compute: {cost['synthetic_images']} synthetic images, fine-tune {cost['finetune_steps']} steps = "
          f"{cost['finetune_images']} images")
    print(f"sweep table: {args.out}/sweep.md; merged pipeline folder: {summary['pipeline']}")
    return 0
