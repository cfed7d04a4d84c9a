"""Sampling speed of effigen's VAR against the official FoundationVision/VAR code, same weights, one process.

    python benchmarks/var_vs_official.py --official-repo /path/to/VAR --depth 16 --batch-size 16 --repeats 3
    python benchmarks/var_vs_official.py --official-repo /path/to/VAR --small --repeats 1   # quick check

The official code is not part of effigen: pass a checkout of https://github.com/FoundationVision/VAR with
--official-repo (it is put on sys.path; its models/var.py imports huggingface_hub, and flash-attn / xformers are
used if installed, as in the official demo). The script builds the official VQVAE (vocabulary 4096, Cvae 32,
ch 160, 4 partially shared phis, by default) and VAR (width 64 x depth, heads = depth, the official 256 or 512
scale schedule) with random weights (no released checkpoints are downloaded here; speed does not depend on the
values), perturbed so that greedy choices have clear margins, saves their state dicts, converts them with
`effigen.convert.var_official.convert_var_official` and loads the effigen pipeline. It then

1. checks in fp32 that a greedy (top_k=1) guided sample of 2 images agrees: max |official - effigen| over images
   in [0, 1] (effigen returns [-1, 1]) must be below 2e-3, else it stops. Two correct fp32 implementations can
   still pick different codes where the top two guided logits of the random network nearly tie (the smallest
   top-1 / top-2 gap of the official run is printed); such a near-tie (gap < 0.05) is retried with other labels
   (up to 4 times), a mismatch with clear margins is a failure;
2. times official fp32, effigen fp32, official under torch.autocast(bf16) (if it runs), effigen precision='bf16'
   with --cfg/--top-k/--top-p (VAR's README FID setting by default), one warm-up each, the repeats interleaved
   so that load changes hit every row alike, and prints images/s, seconds/image, the fraction of this machine's
   matmul peak in the row's precision (useful FLOPs: matrix products and attention of effigen's call, the same
   count for both sides) and the ratio effigen / official in the same precision. --precision times one pair only.

Guidance: --cfg is VAR's w (logits (1 + w) cond - w uncond, ramped over the scales); effigen's cfg_scale is 1 + w.
A top-k at or above the vocabulary size (e.g. 900 with --small's 512 codes) disables the filter in both.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from effigen.bench.throughput import count_flops, environment, measure_matmul_peak
from effigen.runtime import tune_cpu_allocator
from effigen.convert.var_official import convert_var_official
from effigen.pipeline import Pipeline
from effigen.tokenizers.msvq import VAR_SCALES

# var-official-small (the shipped parity folder)
SMALL = dict(vocab=512, cvae=32, ch=32, patch_nums=(1, 2, 3, 4, 6, 8), depth=2, width=128, heads=2, num_classes=10,
             resolution=128)


def import_official(repo: str):
    repo_path = Path(repo).resolve()
    if not (repo_path / "models" / "var.py").is_file():
        raise SystemExit(f"{repo_path} is not a FoundationVision/VAR checkout (no models/var.py)")
    sys.path.insert(0, str(repo_path))
    try:
        import huggingface_hub  # noqa: F401  (models/var.py needs PyTorchModelHubMixin for VARHF only)
    except ImportError:
        raise SystemExit("the official models/var.py imports huggingface_hub: install it, or put a stub package "
                         "defining `class PyTorchModelHubMixin: pass` on PYTHONPATH") from None
    import models.basic_var as basic_var
    import models.var as official_var
    from models.vqvae import VQVAE
    return VQVAE, official_var, basic_var


def build_official(VQVAE, VAR, hp: dict, device: torch.device, logit_std: float, seed: int):
    torch.manual_seed(seed)
    quiet = contextlib.redirect_stdout(io.StringIO())  # the official constructors print their configuration
    with quiet:
        vae, var = _construct(VQVAE, VAR, hp)
    with torch.no_grad():
        # random weights with non-trivial blocks and logits of std ~logit_std, so greedy choices have margins
        # far above the fp32 differences between two implementations
        generator = torch.Generator().manual_seed(seed)
        for p in var.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
        var.head.weight.normal_(0, logit_std / math.sqrt(hp["width"]), generator=generator)
    vae, var = vae.to(device).eval(), var.to(device).eval()
    var.rng = torch.Generator(device=device)  # the official one lives on dist.get_device()
    return vae, var


def _construct(VQVAE, VAR, hp: dict):
    """What the official build_vae_var does (without its global switch-off of torch's parameter init)."""
    vae = VQVAE(vocab_size=hp["vocab"], z_channels=hp["cvae"], ch=hp["ch"], test_mode=True, share_quant_resi=4,
                v_patch_nums=hp["patch_nums"])
    var = VAR(vae_local=vae, num_classes=hp["num_classes"], depth=hp["depth"], embed_dim=hp["width"],
              num_heads=hp["heads"], drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * hp["depth"] / 24,
              norm_eps=1e-6, shared_aln=hp["shared_aln"], cond_drop_rate=0.1, attn_l2_norm=True,
              patch_nums=hp["patch_nums"], flash_if_available=True, fused_if_available=True)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02, init_std=-1)
    return vae, var


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    tune_cpu_allocator()  # as the effigen CLI; EFFIGEN_CPU_ALLOCATOR=default keeps glibc's thresholds (both sides share it)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-repo", required=True, help="checkout of FoundationVision/VAR (not part of effigen)")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256, choices=[256, 512], help="official scale schedule")
    parser.add_argument("--shared-aln", action="store_true", help="shared adaLN (the official d36 at 512 px)")
    parser.add_argument("--small", action="store_true", help="var-official-small sizes (depth 2, 128 px, 512 codes)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cfg", type=float, default=1.5, help="VAR's cfg w (effigen cfg_scale = 1 + w)")
    parser.add_argument("--top-k", type=int, default=900)
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logit-std", type=float, default=40.0, help="scale of the random head (check margins)")
    parser.add_argument("--precision", choices=["both", "fp32", "bf16"], default="both", help="which rows to time")
    parser.add_argument("--peak-size", type=int, default=4096, help="square GEMM of the matmul peak measurement")
    args = parser.parse_args()
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast", category=FutureWarning)
    device = torch.device(args.device)

    if args.small:
        hp = dict(SMALL, shared_aln=args.shared_aln)
    else:
        hp = dict(vocab=4096, cvae=32, ch=160, patch_nums=VAR_SCALES[args.resolution], depth=args.depth,
                  width=64 * args.depth, heads=args.depth, num_classes=args.num_classes, resolution=args.resolution,
                  shared_aln=args.shared_aln)
    VQVAE, official_var, basic_var = import_official(args.official_repo)
    vae, var = build_official(VQVAE, official_var.VAR, hp, device, args.logit_std, args.seed)
    backends = (f"flash-attn {'yes' if basic_var.flash_attn_func is not None else 'no'}, "
                f"xformers {'yes' if basic_var.memory_efficient_attention is not None else 'no'}, "
                f"fused mlp/ln {'yes' if basic_var.fused_mlp_func is not None else 'no'}")

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(vae.state_dict(), Path(tmp) / "vae.pth")
        torch.save(var.state_dict(), Path(tmp) / "var.pth")
        folder = convert_var_official(Path(tmp) / "vae.pth", Path(tmp) / "var.pth", Path(tmp) / "effigen",
                                      resolution=hp["resolution"])
        pipeline = Pipeline.from_pretrained(folder, device=device)

    B = args.batch_size
    labels = torch.randint(0, hp["num_classes"], (B,), generator=torch.Generator().manual_seed(args.seed)).to(device)
    top_k = min(args.top_k, hp["vocab"])  # the official topk needs k <= V; k = V keeps every code (no filter)
    params = sum(p.numel() for p in var.parameters())
    print(f"VAR depth {hp['depth']} width {hp['width']} heads {hp['heads']} ({params / 1e6:.1f} M parameters), "
          f"scales {hp['patch_nums']} ({sum(s * s for s in hp['patch_nums'])} tokens), {hp['resolution']} px, "
          f"VQVAE vocabulary {hp['vocab']} ch {hp['ch']}; random weights (no released checkpoint)")
    print(f"batch {B}, cfg {args.cfg} (effigen cfg_scale {1 + args.cfg}), top-k {args.top_k}"
          f"{f' (= vocabulary {top_k}: no filter)' if top_k != args.top_k else ''}, top-p {args.top_p}; "
          f"official attention backends: {backends}")

    def official(top_k: int, top_p: float, bf16: bool):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return var.autoregressive_infer_cfg(B, labels, g_seed=args.seed, cfg=args.cfg, top_k=top_k, top_p=top_p,
                                                more_smooth=False)

    def effigen(top_k: int, top_p: float, precision: str):
        return pipeline(labels.cpu(), seed=args.seed, batch_size=B, precision=precision, cfg_scale=1 + args.cfg,
                        top_k=top_k, top_p=top_p)

    # 1. agreement, fp32 greedy, 2 images (retried with other labels only where the official run had a near-tie)
    for attempt in range(4):
        check = (torch.arange(2) * 7 + 3 * attempt + args.seed).remainder(hp["num_classes"]).to(device)
        margins = []
        sample = official_var.sample_with_top_k_top_p_

        def recording(logits, **kw):
            top = logits.topk(2, dim=-1).values
            margins.append(float((top[..., 0] - top[..., 1]).min()))
            return sample(logits, **kw)

        official_var.sample_with_top_k_top_p_ = recording
        try:
            reference = var.autoregressive_infer_cfg(2, check, g_seed=args.seed, cfg=args.cfg, top_k=1, top_p=0.0,
                                                     more_smooth=False).float().cpu()
        finally:
            official_var.sample_with_top_k_top_p_ = sample
        ours = (pipeline(check.cpu(), seed=args.seed, batch_size=2, precision="fp32", cfg_scale=1 + args.cfg, top_k=1,
                         top_p=0.0) + 1) / 2
        error = float((reference - ours).abs().max())
        print(f"fp32 greedy check (labels {check.tolist()}): max |official - effigen| = {error:.2e} (images in "
              f"[0, 1]; limit 2e-3); smallest top-1/top-2 guided-logit gap of the official run {min(margins):.3g}")
        if error < 2e-3:
            break
        if min(margins) >= 0.05:
            raise SystemExit("the greedy samples disagree with clear margins: effigen's VAR does not reproduce the "
                             "official one here")
        print("  a near-tie between two codes can flip in fp32; retrying with other labels")
    else:
        raise SystemExit("the greedy samples disagree on 4 label pairs: effigen's VAR does not reproduce the official "
                         "one")

    # 2. speed
    rows = {"official fp32": lambda: official(top_k, args.top_p, False),
            "effigen fp32": lambda: effigen(top_k, args.top_p, "fp32"),
            "official bf16 autocast": lambda: official(top_k, args.top_p, True),
            "effigen bf16": lambda: effigen(top_k, args.top_p, "bf16")}
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    rows = {name: fn for name, fn in rows.items() if any(p in name for p in precisions)}
    # useful FLOPs: those of effigen's call (matrix products and attention, fused ones included; the same network
    # and token counts on both sides, whatever tokens are drawn)
    flops, _ = count_flops(lambda: effigen(top_k, args.top_p, precisions[-1]))
    peaks = {p: measure_matmul_peak(p, device, args.peak_size, 2.0) for p in precisions}
    times: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    for name, fn in rows.items():  # warm-up
        try:
            fn()
            times[name] = []
        except Exception as e:  # noqa: BLE001 (the official code under CPU bf16 autocast may not run)
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    for _ in range(args.repeats):
        for name in times:
            times[name].append(timed(rows[name], device))

    env = environment(device)
    print(f"torch {env['torch_version']}, {env['threads']} threads, {env.get('cpu_name', '?')}, allocator {env['cpu_allocator']}"
          f"{', ' + env['device_name'] if 'device_name' in env else ''}; {args.repeats} repeats (median), 1 warm-up, "
          f"rows interleaved")
    print(f"useful FLOPs {flops / B / 1e9:.1f} GFLOP/image (counted on effigen's {precisions[-1]} call); matmul peak "
          + ", ".join(f"{p} {v / 1e12:.3f} TFLOP/s" for p, v in peaks.items()) + f" ({args.peak_size}^3 GEMM)")
    print(f"{'run':<24}{'images/s':>10}{'s/image':>10}{'min..max s':>14}{'% of peak':>11}{'x official':>12}")
    for name in rows:
        if name in failed:
            print(f"{name:<24}{'did not run: ' + failed[name]}")
            continue
        seconds = statistics.median(times[name])
        precision = name.split()[-1] if name.split()[-1] in peaks else name.split()[1]
        other = f"official {precision}{' autocast' if precision == 'bf16' else ''}"
        ratio = f"{statistics.median(times[other]) / seconds:.2f}" if other in times else "-"
        spread = f"{min(times[name]):.1f}..{max(times[name]):.1f}"
        print(f"{name:<24}{B / seconds:>10.3f}{seconds / B:>10.4f}{spread:>14}"
              f"{100 * flops / seconds / peaks[precision]:>10.1f}%{ratio:>12}")


if __name__ == "__main__":
    main()
