"""`effigen quantize`: low-bit quantization of a diffusion / flow pipeline folder, plain post-training quantization or
EfficientDM's data-free quantization-aware LoRA fine-tuning (arXiv 2310.03270, docs/quantize.md).

    effigen quantize --from runs/mnist-dit/final --bits w4a8 --out runs/mnist-dit-w4a8                 # EfficientDM
    effigen quantize --from runs/mnist-dit/final --bits w8a8 --mode ptq --out runs/mnist-dit-w8a8-ptq  # baseline
    effigen quantize --from DIR --bits w4a4 --epochs 64 --batch-size 8 --lora-rank 16 --out DIR2

The output is a pipeline folder of the same method with packed integer weights (generator/ holds a QuantizedNetwork)
and one activation step size per calibrated sampling step: `effigen sample --from DIR2`, `effigen eval --from DIR2`
and `effigen bench --from DIR2 --vs DIR` use it like any folder. Sampling with another step count than the folder's
interpolates the activation step sizes between calibrated timesteps (`--timestep-policy strict` makes it an error).
"""

from __future__ import annotations

import argparse
import json

from ..post.quantize import QuantizeSettings, parse_bits, quantize
from .main import check_device_flag, check_output_folder, positive_int


def build_parser() -> argparse.ArgumentParser:
    defaults = QuantizeSettings()
    parser = argparse.ArgumentParser(prog="effigen quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="full-precision pipeline folder (dit-flow, "
                        "dit-ddpm, dico-*; pixels or latents)")
    parser.add_argument("--out", required=True, help="the quantized pipeline folder to write")
    parser.add_argument("--bits", default=defaults.bits, help="wNaM: weight bits N in {2, 4, 8}, activation bits M "
                        "(first and last layer stay W8A8); e.g. w4a4, w4a8, w8a8 (default %(default)s)")
    parser.add_argument("--mode", choices=["ptq", "efficientdm"], default=defaults.mode,
                        help="ptq: calibration only (the baseline); efficientdm: + QALoRA / TALSQ distillation")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help="FP sampling trajectories to distill on (one update per network call; default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="labels per trajectory")
    parser.add_argument("--lora-rank", type=positive_int, default=defaults.lora_rank)
    parser.add_argument("--lora-lr-scale", type=float, default=defaults.lora_lr_scale,
                        help="multiplies the paper's per-layer LoRA rate mean(weight step) / 2500 (default 1)")
    parser.add_argument("--act-lr", type=float, default=defaults.act_lr)
    parser.add_argument("--calib-images", type=positive_int, default=defaults.calib_images)
    parser.add_argument("--act-init", choices=["shared", "per_step"], default=defaults.act_init,
                        help="activation step initialisation: one for all timesteps (paper) or searched per step")
    parser.add_argument("--timestep-policy", choices=["interpolate", "nearest", "strict"],
                        default=defaults.timestep_policy, help="sampling at times between the calibrated ones")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    parse_bits(args.bits)
    check_device_flag(args.device)
    check_output_folder(args.out, "--out")
    settings = QuantizeSettings(bits=args.bits, mode=args.mode, epochs=args.epochs, batch_size=args.batch_size,
                                lora_rank=args.lora_rank, lora_lr_scale=args.lora_lr_scale, act_lr=args.act_lr,
                                calib_images=args.calib_images, act_init=args.act_init,
                                timestep_policy=args.timestep_policy, seed=args.seed)
    result = quantize(args.source, args.out, settings, device=args.device, progress=not args.no_progress)
    print(json.dumps(result))
    print(f"quantized pipeline folder: {result['out']}")
    return 0
