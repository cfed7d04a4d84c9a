"""`effigen distill`: guided distillation of a diffusion / flow teacher (Meng et al. arXiv 2210.03142, docs/distill.md).

    effigen distill --from runs/mnist-dit/final --out runs/mnist-dit-distilled --steps 4
    effigen distill --from TEACHER --out DIR --stage guidance --w-min 0 --w-max 4 --max-steps 500
    effigen distill --from DIR/guidance/final --out DIR --stage progressive --steps 1 --max-minutes 3
    effigen distill --from TEACHER --out DIR --trainer.precision=fp32 --trainer.ema_decay=0.99

Stage 1 (`guidance`) trains a student that takes the guidance strength w as an input and matches the teacher's
two-evaluation guided prediction with one evaluation; stage 2 (`progressive`) halves its number of steps, round by
round, from --teacher-steps down to --steps. `all` runs both. w is the paper's: effigen's cfg_scale = 1 + w.
Every round is a resumable trainer run in DIR/<round>/ (rerun the same command to continue an interrupted one);
--max-steps / --max-minutes / --batch-size / --lr apply to each round. DIR/final is the last student, a normal
pipeline folder: `effigen sample --from DIR/final` samples it with its distilled step count and w
(`--steps`, `--sampler.guidance_w=...`, `--sampler.stochastic=true` override them).
"""

from __future__ import annotations

import argparse
import json

from ..config import ConfigError, apply_overrides, config_from_dict
from ..post.distill import DISTILL_TRAINER_DEFAULTS, DistillSettings, distill
from ..training.trainer import TrainerConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effigen distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="teacher pipeline folder (dit-flow / dit-ddpm), "
                        "or a stage-1 student folder for --stage progressive")
    parser.add_argument("--out", required=True, help="output folder (one subfolder per round, and final/)")
    parser.add_argument("--stage", choices=["guidance", "progressive", "all"], default="all")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps of the final student")
    parser.add_argument("--teacher-steps", type=int, help="steps of the stage-1 student that progressive distillation "
                        "starts from (--steps times a power of two; default: the smallest such >= the teacher's steps)")
    parser.add_argument("--w-min", type=float, help="smallest guidance strength w trained (default 0)")
    parser.add_argument("--w-max", type=float, help="largest guidance strength w trained (default 4)")
    parser.add_argument("--w", type=float, help="the students' default sampling w (default: the teacher's cfg_scale - 1)")
    parser.add_argument("--stochastic", action="store_true", help="make the paper's stochastic sampler the default")
    parser.add_argument("--parameterization", choices=["teacher", "x", "v"], default="teacher",
                        help="what a dit-ddpm student predicts (teacher = epsilon); flow students keep the teacher's")
    parser.add_argument("--max-steps", type=int, help="optimizer steps per round")
    parser.add_argument("--max-minutes", type=float, help="wall-clock budget per round")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    return parser


def run(argv: list[str]) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--trainer.") or o.startswith("--data.")) or "=" not in o]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like --trainer.KEY=VALUE or --data.KEY=VALUE")
    nested = apply_overrides({"trainer": dict(DISTILL_TRAINER_DEFAULTS), "data": {}}, overrides)
    for key, value in (("max_steps", args.max_steps), ("max_minutes", args.max_minutes), ("batch_size", args.batch_size),
                       ("learning_rate", args.lr), ("seed", args.seed)):
        if value is not None:
            nested["trainer"][key] = value
    trainer = config_from_dict(TrainerConfig, nested["trainer"], "trainer")
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    settings = DistillSettings(stage=args.stage, steps=args.steps, teacher_steps=args.teacher_steps, w_min=args.w_min,
                               w_max=args.w_max, w=args.w, stochastic=args.stochastic,
                               parameterization=args.parameterization)
    result = distill(args.source, args.out, settings, trainer, nested["data"])
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}))
    print(f"distilled pipeline folder: {result['final']} ({result['steps'] if settings.stage != 'guidance' else result['teacher_steps']} "
          f"steps, w = {result['w']}, i.e. cfg_scale {result['w'] + 1})")
    return 0
