"""`effigen convert`: official checkpoints -> effigen pipeline folders.

    effigen convert dit-official --ckpt DiT-XL-2-256x256.pt --out dit-xl-2-256 [--num-heads 16]
    effigen convert lightningdit-official --ckpt lightningdit-xl-imagenet256-800ep.pt --out lightningdit-xl-1
    effigen convert dico-official --ckpt DiCo-XL-256x256.pt --out dico-xl-256 [--input-size 32]
    effigen convert bfm-official --ckpt checkpoints/<step>/model_1.safetensors --out bfm-xl-2 [--steps-per-segment 41]
    effigen convert lamamba-official --ckpt 0500000.pt --config configs/LaMamba-DIff-XL.yaml --out lamamba-xl
    effigen convert sit-official --ckpt SiT-XL-2-256x256.pt --out sit-xl-2-256
    effigen convert repa-official --ckpt last.pt --out repa-sit-xl-2 [--keep-projectors] [--encoder-depth 8]
    effigen convert repa-official --ckpt exps/run/checkpoints/0400000.pt --out repa-400k --mode ode --steps 50
    effigen convert var-official --vae vae_ch160v4096z32.pth --var var_d16.pth --out var-d16
    effigen convert hmar-official --vae vae_ch160v4096z32.pth --hmar hmar-d16.pth --out hmar-d16
    effigen convert rae-official --ckpt stage2_model.pt [--guidance-ckpt DiTDH-S_ep14/stage2_model.pt] --out rae-dit-dh-xl
    effigen convert rae-decoder --ckpt decoders/dinov2/wReg_base/ViTXL_n08/model.pt --stats stat.pt \
        --encoder dinov2-vitb14-reg=/w/dinov2-with-registers-base --out rae-dinov2-b   # an `rae` tokenizer folder
    effigen convert sd-vae --vae sd-vae-ft-mse/ --out sd-vae          # diffusers folder or a single weights file
    effigen convert detailflow-official --tokenizer-ckpt DetailFlow-16/checkpoints/128.pt \
        --gpt-ckpt DetailFlow-16-GPT-L/checkpoints/128.pt --out detailflow-128
    effigen convert dit-official --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-mse/ --out dit-xl-2-256
    effigen convert lightningdit-official --ckpt lightningdit-xl-imagenet256-800ep.pt \
        --vae vavae-imagenet256-f16d32-dinov2.pt --latent-stats latents_stats.pt --out lightningdit-xl-1

Converters: dit-official (facebookresearch/DiT: released weights or training checkpoints, EMA weights);
lightningdit-official (hustvl/LightningDiT training checkpoints, EMA weights; time and velocity
conventions translated, official sampler settings recorded); sit-official (willisma/SiT released weights or
`train.py` checkpoints: LightningDiT's time and velocity translations, SiT's SDE recipe: 250 steps, cfg 1.5 on the first
3 channels); repa-official (sihyun-yu/REPA `train.py` checkpoints or the released last.pt: EMA weights, the paper's SDE
recipe: 250 steps, cfg 1.8, guidance while t <= 0.7; the projectors are dropped unless --keep-projectors, which saves
them as the folder's `projector` component); var-official and hmar-official (VAR's VQVAE + the
VAR or HMAR transformer; every hyperparameter read off the weights; HMAR's weights are non-commercial, NSCLv1).
rae-official (bytetriper/RAE stage-2 DiT^DH training checkpoints or released stage2_model.pt: EMA weights, the wide
DDT head, the official Euler grid and dimension-dependent shift; with --guidance-ckpt the autoguidance model becomes
the folder's `guidance_model` and the default sampler is the paper's autoguidance at 1.42); rae-decoder (an RAE
stage-1 ViT-MAE decoder + its stat.pt, with the frozen encoder named by --encoder, as an `rae` tokenizer folder;
checked against the official layout only, see docs/rae.md); detailflow-official (ByteFlow-AI/DetailFlow's released
<run>/checkpoints/<tokens>.pt of the tokenizer ('model') and the GPT ('ema'), with the run's config.json / config.yaml
two levels up, as the official loaders read them; Apache-2.0).
sd-vae: a KL autoencoder (SD-VAE in diffusers or LDM layout, LightningDiT's VA-VAE) -> a tokenizer folder.
With `--vae`, the DiT-family converters put the autoencoder into the folder so that it decodes to images;
without it they sample latents (`output_type="latent"`).
"""

from __future__ import annotations

import argparse

CONVERTERS = ("dit-official", "lightningdit-official", "sit-official", "repa-official", "var-official", "hmar-official",
              "sd-vae", "dico-official", "bfm-official", "lamamba-official", "rae-official", "rae-decoder",
              "detailflow-official")


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="effigen convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=CONVERTERS, help="which official format")
    parser.add_argument("--ckpt", help="the official checkpoint file (DiT, LightningDiT, SiT, REPA)")
    parser.add_argument("--vae", help="var/hmar-official: the VQVAE state dict (vae_ch160v4096z32.pth); sd-vae, "
                                      "dit-, lightningdit-, sit-, repa-official: a KL autoencoder (diffusers folder or file)")
    parser.add_argument("--latent-stats", help="KL autoencoder: per-channel latent mean/std file (LightningDiT's "
                                               "latents_stats.pt)")
    parser.add_argument("--scaling-factor", type=float, help="KL autoencoder: latent scaling (default: the diffusers "
                                                             "config's, else SD's 0.18215)")
    parser.add_argument("--var", help="var-official: the transformer state dict (var_d16.pth, ...)")
    parser.add_argument("--hmar", help="hmar-official: the HMAR state dict (hmar-d16.pth, ...)")
    parser.add_argument("--scales", help="var/hmar-official: scale schedule, e.g. 1,2,3,4,5,6,8,10,13,16 (default: from "
                                         "the weights)")
    parser.add_argument("--resolution", type=int, help="var/hmar-official: image size (default: last scale x downsampling)")
    parser.add_argument("--input-size", type=int, default=32,
                        help="dico-official: latent (or pixel) grid size, not stored in conv weights (default 32)")
    parser.add_argument("--steps-per-segment", type=int, default=41,
                        help="bfm-official: sampling steps per time segment saved with the folder (official eval: 41)")
    parser.add_argument("--in-channels", type=int, default=4,
                        help="bfm-official: latent channels (fixes the patch size; not separable in the weights)")
    parser.add_argument("--config", help="lamamba-official: the official yaml config (CONTINUOUS_SCAN; default: the "
                                         "checkpoint's own 'config' tree, else the official defaults)")
    parser.add_argument("--scan", choices=("snake", "raster"),
                        help="lamamba-official: override the scan order (default: the config's CONTINUOUS_SCAN)")
    parser.add_argument("--guidance-ckpt", help="rae-official: the autoguidance model's checkpoint (DiT^DH-S)")
    parser.add_argument("--shift-dim", type=int, help="rae-official: the config's time_dist_shift_dim (default: C h w of "
                                                      "the latent; the released models: 196608)")
    parser.add_argument("--head-depth", type=int, help="rae-official: the DDT head's depth (config depth[1]); needed "
                                                       "only when encoder and head have the same width")
    parser.add_argument("--guidance-head-depth", type=int, help="rae-official: the same for the guidance model")
    parser.add_argument("--encoder", help="rae-decoder: the frozen encoder's teacher spec (dinov2-vitb14-reg=PATH)")
    parser.add_argument("--stats", help="rae-decoder: the latent statistics file (stat.pt: mean and var)")
    parser.add_argument("--shift-base", type=float, help="rae-official: time_dist_shift_base (default 4096)")
    parser.add_argument("--tokenizer-ckpt", help="detailflow-official: the tokenizer's <run>/checkpoints/<tokens>.pt "
                                                 "(config.json and config.yaml two levels up)")
    parser.add_argument("--gpt-ckpt", help="detailflow-official: the AR model's <run>/checkpoints/<tokens>.pt")
    parser.add_argument("--siglip-config", help="detailflow-official: the SigLIP2 config.json the tokenizer was built "
                                                "from (default: $CACHE_DATA_PATH/siglip2-so400m-patch16-naflex, else "
                                                "so400m's head count)")
    parser.add_argument("--out", required=True, help="output pipeline folder")
    parser.add_argument("--num-heads", type=int, help="attention heads (not stored in DiT checkpoints; default: official sizes)")
    parser.add_argument("--steps", type=int, default=250,
                        help="default sampling steps saved with the folder (LightningDiT: its num_sampling_steps; "
                             "SiT, REPA: their num_steps)")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="default guidance scale saved with the folder (DiT: 1.5, LightningDiT: 6.7, SiT: 1.5, "
                             "REPA: 1.8)")
    parser.add_argument("--keep-projectors", action="store_true",
                        help="repa-official: save the projectors as the folder's `projector` component")
    parser.add_argument("--encoder-depth", type=int,
                        help="repa-official: the 1-indexed block the projectors read (default: the checkpoint's args, "
                             "else REPA's generate.py default 8)")
    parser.add_argument("--mode", choices=("sde", "ode"),
                        help="repa-official: the sampler saved with the folder (generate.py --mode; default sde)")
    parser.add_argument("--heun", action="store_true", help="repa-official --mode ode: Heun instead of Euler")
    parser.add_argument("--guidance-low", type=float,
                        help="repa-official: guidance interval low end (t, 1 = noise; default 0)")
    parser.add_argument("--guidance-high", type=float,
                        help="repa-official: guidance interval high end (default 0.7, the paper's)")
    args = parser.parse_args(argv)
    repa_only = [flag for flag, value in (("--keep-projectors", args.keep_projectors or None), ("--heun", args.heun or None),
                                          ("--encoder-depth", args.encoder_depth), ("--mode", args.mode),
                                          ("--guidance-low", args.guidance_low), ("--guidance-high", args.guidance_high))
                 if value is not None]
    rae_only = [flag for flag, value in (("--guidance-ckpt", args.guidance_ckpt), ("--shift-dim", args.shift_dim),
                                         ("--shift-base", args.shift_base), ("--head-depth", args.head_depth),
                                         ("--guidance-head-depth", args.guidance_head_depth)) if value is not None]
    if rae_only and args.source != "rae-official":
        parser.error(f"only rae-official takes {', '.join(rae_only)}")
    decoder_only = [flag for flag, value in (("--encoder", args.encoder), ("--stats", args.stats)) if value is not None]
    if decoder_only and args.source != "rae-decoder":
        parser.error(f"only rae-decoder takes {', '.join(decoder_only)}")
    if repa_only and args.source != "repa-official":
        parser.error(f"only repa-official takes {', '.join(repa_only)}")
    lamamba_only = [flag for flag, value in (("--config", args.config), ("--scan", args.scan)) if value is not None]
    if lamamba_only and args.source != "lamamba-official":
        parser.error(f"only lamamba-official takes {', '.join(lamamba_only)}")
    if args.heun and args.mode != "ode":
        parser.error("--heun is the ODE's corrector: give --mode ode with it")
    detailflow_only = [flag for flag, value in (("--tokenizer-ckpt", args.tokenizer_ckpt), ("--gpt-ckpt", args.gpt_ckpt),
                                                ("--siglip-config", args.siglip_config)) if value is not None]
    if detailflow_only and args.source != "detailflow-official":
        parser.error(f"only detailflow-official takes {', '.join(detailflow_only)}")
    if args.source == "detailflow-official":
        if not (args.tokenizer_ckpt and args.gpt_ckpt):
            parser.error("detailflow-official needs --tokenizer-ckpt and --gpt-ckpt (<run>/checkpoints/<tokens>.pt)")
        from ..convert.detailflow_official import convert_detailflow_official

        path = convert_detailflow_official(args.tokenizer_ckpt, args.gpt_ckpt, args.out, args.siglip_config,
                                           args.cfg_scale)
        print(f"converted {args.tokenizer_ckpt} + {args.gpt_ckpt} -> {path}\nlicence of the DetailFlow weights: Apache-2.0")
        return 0
    if args.source in ("var-official", "hmar-official"):  # VAR's VQVAE + a next-scale transformer
        kind = args.source.split("-")[0]
        weights = getattr(args, kind)
        if not (args.vae and weights):
            parser.error(f"{args.source} needs --vae and --{kind}")
        if kind == "var":
            from ..convert.var_official import convert_var_official as convert

            note = ""
        else:
            from ..convert.hmar_official import LICENCE, convert_hmar_official as convert

            note = f"\nlicence of the HMAR weights: {LICENCE}"
        scales = tuple(int(x) for x in args.scales.split(",")) if args.scales else None
        path = convert(args.vae, weights, args.out, args.num_heads, scales, args.resolution)
        print(f"converted {args.vae} + {weights} -> {path}{note}")
        return 0
    if args.source == "sd-vae":
        if not args.vae:
            parser.error("sd-vae needs --vae (a diffusers AutoencoderKL folder or a weights file)")
        from ..convert.sd_vae import convert_kl_vae

        path = convert_kl_vae(args.vae, args.out, args.resolution, args.scaling_factor, args.latent_stats)
        print(f"converted {args.vae} -> {path}")
        return 0
    if not args.ckpt:
        parser.error(f"{args.source} needs --ckpt")
    if args.source == "rae-decoder":
        from ..convert.rae_official import convert_rae_decoder

        if not args.encoder:
            parser.error("rae-decoder needs --encoder, the frozen encoder's teacher spec (e.g. "
                         "dinov2-vitb14-reg=/w/dinov2-with-registers-base)")
        path = convert_rae_decoder(args.ckpt, args.out, args.encoder, args.num_heads or 16, args.stats)
        print(f"converted {args.ckpt} -> {path}")
        return 0
    if args.source == "rae-official":
        from ..convert.rae_official import SHIFT_BASE, convert_rae_official

        if args.vae:
            parser.error("rae-official takes no --vae: its latent is an RAE tokenizer's (see docs/rae.md)")
        if args.shift_dim is not None and args.shift_dim < 1:
            parser.error("--shift-dim must be a positive integer (the official time_dist_shift_dim)")
        path = convert_rae_official(args.ckpt, args.out, args.guidance_ckpt, shift_dim=args.shift_dim,
                                    shift_base=args.shift_base or SHIFT_BASE,
                                    num_steps=50 if args.steps == 250 else args.steps, cfg_scale=args.cfg_scale,
                                    head_depth=args.head_depth, guidance_head_depth=args.guidance_head_depth)
        print(f"converted {args.ckpt}{' + ' + args.guidance_ckpt if args.guidance_ckpt else ''} -> {path}")
        return 0
    vae = None
    if args.vae:
        from ..convert.sd_vae import load_kl_vae

        vae = load_kl_vae(args.vae, args.resolution, args.scaling_factor, args.latent_stats)
    if args.source == "dit-official":
        from ..convert.dit_official import convert_dit_official

        path = convert_dit_official(args.ckpt, args.out, args.num_heads, args.steps,
                                    1.5 if args.cfg_scale is None else args.cfg_scale, vae=vae)
    elif args.source == "dico-official":
        from ..convert.dico_official import convert_dico_official

        path = convert_dico_official(args.ckpt, args.out, args.input_size, args.steps,
                                     1.5 if args.cfg_scale is None else args.cfg_scale, vae=vae)
    elif args.source == "bfm-official":
        from ..convert.bfm_official import convert_bfm_official

        path = convert_bfm_official(args.ckpt, args.out, args.in_channels, args.input_size, args.steps_per_segment,
                                    4.0 if args.cfg_scale is None else args.cfg_scale, vae=vae)
    elif args.source == "lamamba-official":
        from ..convert.lamamba_official import convert_lamamba_official

        path = convert_lamamba_official(args.ckpt, args.out, args.config, args.steps,
                                        1.5 if args.cfg_scale is None else args.cfg_scale, vae=vae, scan=args.scan)
    elif args.source == "sit-official":
        from ..convert.sit_official import convert_sit_official, official_sampler

        try:
            sampler = official_sampler(args.steps, 1.5 if args.cfg_scale is None else args.cfg_scale)
        except ValueError as e:  # a setting out of range: exit 2 naming it
            parser.error(str(e))
        path = convert_sit_official(args.ckpt, args.out, args.num_heads, sampler, vae=vae)
    elif args.source == "repa-official":
        from ..convert.repa_official import convert_repa_official, official_sampler

        try:
            sampler = official_sampler(args.mode or "sde", args.steps, 1.8 if args.cfg_scale is None else args.cfg_scale,
                                       0.0 if args.guidance_low is None else args.guidance_low,
                                       0.7 if args.guidance_high is None else args.guidance_high, args.heun)
        except ValueError as e:
            parser.error(str(e))
        path = convert_repa_official(args.ckpt, args.out, args.num_heads, sampler, args.keep_projectors,
                                     args.encoder_depth, vae=vae)
    else:
        from ..convert.lightningdit_official import convert_lightningdit_official, official_sampler

        sampler = official_sampler(args.steps, cfg_scale=6.7 if args.cfg_scale is None else args.cfg_scale)
        path = convert_lightningdit_official(args.ckpt, args.out, args.num_heads, sampler, vae=vae)
    print(f"converted {args.ckpt} -> {path}")
    return 0
