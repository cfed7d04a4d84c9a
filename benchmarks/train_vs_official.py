"""Training speed of effigen's `Trainer.train_step` (what `effigen train` runs per step) against the official training
step of VAR (FoundationVision/VAR) and DiT (facebookresearch/DiT), same model, same weights, same batch, one process.

    python benchmarks/train_vs_official.py --model both --official-repo /path/to/VAR --dit-repo /path/to/DiT
    python benchmarks/train_vs_official.py --model var --official-repo /path/to/VAR --depth 12 --batch-size 8
    python benchmarks/train_vs_official.py --model var --official-repo /path/to/VAR --depth 12 --token-cache

`--token-cache` adds effigen rows that train from the token ids a token cache stores (`effigen train
--data.token_cache=true`, `effigen cache-latents --tokens`): the same step without the frozen VQVAE encoder, which
the official step (and effigen's step from images) runs on every batch; their fraction of peak uses their own
FLOP count (no encoder convolutions). `--kernels-ab` adds effigen bf16 rows with the C kernels switched off, i.e. with
torch's CPU flash attention forward and backward instead of effigen's (`nn.attention`, bf16 training).

The official code is not part of effigen: pass checkouts of https://github.com/FoundationVision/VAR (--official-repo)
and https://github.com/facebookresearch/DiT (--dit-repo); each is put on sys.path. For each model the script builds
the official network with random weights (perturbed so that no layer is trivially zero), saves its state dict,
converts it with effigen's converters (`convert.var_official.load_official_var`,
`convert.dit_official.load_official_dit`) so both sides start from identical weights, then

1. checks agreement in fp32 (label dropout and drop path switched off for the check only): the same batch, noise,
   timesteps and labels give the same loss (relative error < 1e-4) and, after one optimizer step of each side, the
   same gradient (the AdamW first moment, relative to its largest entry, < 1e-3) and the same updated weights (the
   update of every element within 1% of the learning rate, except where a gradient entry is below 1e-6 of the
   largest: Adam's first step is lr * g / (|g| + eps), whose sign two fp32 computations of a ~0 gradient can
   flip; those are counted and printed); else it stops;
2. times effigen's `Trainer.train_step` (objective under the Trainer's autocast, backward, clipping, AdamW, LR
   schedule, EMA) against the official step in fp32 and bf16 autocast, one warm-up step each, the repeats interleaved
   (effigen, official, effigen, ...) so that load changes hit every row alike; prints images/s (median), the ratio
   effigen / official in the same precision (of the medians, and of the fastest steps), and the fraction of this
   machine's matmul peak (useful FLOPs: the matrix products, convolutions and attention of one effigen fp32 step,
   forward and backward, counted by torch's FlopCounterMode as `effigen.bench` does; the same count for both sides;
   CPU flash attention's backward counted as torch counts its other SDPA backward kernels, five products, since
   2026-12-07: figures from before leave it out).

What is timed of the official step:

- VAR: the official `trainer.VARTrainer.train_step` itself (it=1, g_it=1, so its .item() logging and tensorboard
  branches do not run, as on 499 of 500 steps), with the official `utils.amp_sc.AmpOptimizer` (grad clip 2.0 as
  `--tclip`, AdamW betas (0.9, 0.95), fused=True as `--afuse`, the official `utils.lr_control.filter_params` groups;
  weight decay 0 in both so the weights can be compared; a decayed AdamW costs the same): VQVAE `img_to_idxBl` of
  the 256 px images, `idxBl_to_var_input`, VAR forward with label dropout 0.1 and drop path 0.1 * depth / 24, the
  1/L-weighted cross-entropy, backward, clip, AdamW step, zero_grad. One substitution: the AmpOptimizer's autocast is
  `torch.autocast('cuda')`, which does nothing to CPU tensors, so for the bf16 row it is replaced by
  `torch.autocast('cpu', bfloat16, cache_enabled=True)` (same settings, on the CPU). Not timed: the per-iteration
  `lr_wd_annealing` call of the training loop (a few Python assignments) and data loading (both sides get the batch
  in memory). effigen's step does the same work with its own code (tokenizer, teacher forcing, VAR, cross-entropy,
  clip 2.0, AdamW (0.9, 0.95)) plus what `effigen train` always adds: an EMA of the weights (official VAR keeps
  none), the LR scheduler step and the accuracy logs.
- DiT: the loop body of the official `train.py` on cached latents (its VAE encoding is skipped on both sides):
  `t = torch.randint(0, 1000, (B,))`, `diffusion.training_losses(model, x, t, dict(y=y))` of the official
  `create_diffusion(timestep_respacing="")` (learned sigma: MSE + VB term), `.mean()`, `opt.zero_grad()`,
  `backward`, `opt.step()` (AdamW lr 1e-4, weight decay 0, torch defaults as in train.py), and train.py's own
  `update_ema` (decay 0.9999; the function is taken from train.py's source with `ast`, since train.py itself imports
  torchvision and diffusers). The official training runs in fp32 (TF32 on GPU); its bf16 row wraps
  `training_losses` in `torch.autocast('cpu', bfloat16)`. effigen's Trainer runs with grad_clip off, ema_warmup off
  and the same AdamW, to match. Without timm installed, the three timm layers that the official models.py imports
  (PatchEmbed, Attention with fused scaled_dot_product_attention, Mlp) are supplied by a minimal stand-in module
  (`_timm_stand_in` below) that computes what timm's do; the rest of models.py is the official code.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import copy
import dataclasses
import io
import math
import shlex
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from effigen.bench.throughput import count_flops, environment, measure_matmul_peak
from effigen.runtime import tune_cpu_allocator
from effigen.convert.dit_official import OFFICIAL_HEADS, load_official_dit
from effigen.convert.var_official import load_official_var
from effigen.nn import cpu_kernels
from effigen.models.dit import DIT_PRESETS
from effigen.models.var import VAR as EffigenVAR
from effigen.objectives.ddpm import DDPMConfig
from effigen.objectives.next_scale import NextScaleConfig
from effigen.registry import build_objective, get_method
from effigen.tokenizers.msvq import VAR_SCALES
from effigen.training.trainer import Trainer, TrainerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from var_vs_official import _construct, import_official  # noqa: E402  (the sampling benchmark's official build)

PRECISIONS = ("fp32", "bf16")


# ------------------------------------------------------------------------------------------------ shared pieces
class FixedRandom:
    """Stands in for the Trainer's BatchRandom in the agreement check: hands out the given draws (timesteps, noise)
    and `rand() = 1` (no label dropout, no flip)."""

    def __init__(self, batch_size: int, index: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        self.batch_size, self.index, self.noise = batch_size, index, noise

    def rand(self, *shape):
        return torch.ones(self.batch_size, *shape)

    def randint(self, high, *shape):
        return self.index.clone()

    def randn(self, *shape):
        return self.noise.clone()


def repeat_batch(images: torch.Tensor, labels: torch.Tensor):
    while True:
        yield images, labels


def make_trainer(network: nn.Module, objective, precision: str, batch_size: int, folder: str, **options) -> Trainer:
    config = TrainerConfig(output_dir=folder, max_steps=10**9, batch_size=batch_size, precision=precision,
                           device="cpu", log_every=10**9, checkpoint_every=10**9, progress=False, **options)
    return Trainer(config, network, objective, dataset=[], save_folder=lambda *a, **k: None)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def compare_step(official: nn.Module, official_opt: torch.optim.Optimizer, before: dict[str, torch.Tensor],
                 trainer: Trainer, lr: float) -> tuple[float, float, int, int]:
    """After one step of each side from the same weights `before`: the AdamW first moments (0.1 x the clipped
    gradient) relative to the largest, and the weight updates in units of lr (max difference over the elements whose
    gradient is not ~0; the count of ~0-gradient elements whose update differs by more than 1% of lr)."""
    ours = dict(trainer.network.named_parameters())
    theirs = {n: p for n, p in official.named_parameters() if p.requires_grad}
    if sorted(ours) != sorted(theirs):
        raise SystemExit(f"parameter names differ: {sorted(set(ours) ^ set(theirs))[:8]}")
    m_ours = torch.cat([trainer.optimizer.state[ours[n]]["exp_avg"].flatten() for n in sorted(ours)])
    m_theirs = torch.cat([official_opt.state[theirs[n]]["exp_avg"].flatten() for n in sorted(ours)])
    d_ours = torch.cat([(ours[n].detach() - before[n]).flatten() for n in sorted(ours)])
    d_theirs = torch.cat([(theirs[n].detach() - before[n]).flatten() for n in sorted(ours)])
    significant = m_theirs.abs() > 1e-6 * m_theirs.abs().max()
    update_error = (d_ours - d_theirs).abs() / lr
    worst = float(update_error[significant].max()) if significant.any() else 0.0
    flipped = int((update_error[~significant] > 0.01).sum())
    return relative_error(m_ours, m_theirs), worst, flipped, int((~significant).sum())


def check_or_stop(name: str, loss_error: float, moment_error: float, update_error: float, flipped: int, tiny: int,
                  extra: str = "") -> None:
    ok = loss_error < 1e-4 and moment_error < 1e-3 and update_error < 0.01
    print(f"{name} fp32 check: loss relative error {loss_error:.2e} (limit 1e-4); after one step: gradient (AdamW "
          f"first moment) {moment_error:.2e} (limit 1e-3), weight updates max |effigen - official| = "
          f"{update_error:.2e} lr (limit 0.01 lr; {flipped} of {tiny} elements with a ~0 gradient differ){extra}: "
          f"{'agree' if ok else 'DISAGREE'}", flush=True)
    if not ok:
        raise SystemExit(f"{name}: effigen's training step does not reproduce the official one; not timing")


def profile(name: str, fn, rows: int = 20) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n--- profile: {name} (one step) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))



def profile_and_time(rows, args, batch, flops, peaks, model: str, title: str) -> None:
    """With --profile, one profiled call of every row first; then the interleaved timing of all rows."""
    if args.profile:
        for name, fn in rows.items():
            fn()
            profile(f"{model} {name}", fn)
    time_rows(rows, args.repeats, batch, flops, peaks, title)


def kernels_off(step):
    """`step` with effigen's C kernels switched off (`cpu_kernels.set_enabled(False)`): in a bf16 training step that
    is the attention forward and backward kernels, so this row shows what they give (torch's CPU flash attention
    instead)."""
    def run():
        cpu_kernels.set_enabled(False)
        try:
            step()
        finally:
            cpu_kernels.set_enabled(True)
    return run


def time_rows(rows: dict, repeats: int, batch_size: int, flops: int | dict[str, int], peaks: dict[str, float],
              title: str) -> None:
    flops = flops if isinstance(flops, dict) else {name: flops for name in rows}
    times: dict[str, list[float]] = {name: [] for name in rows}
    for fn in rows.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in rows.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    counts = sorted(set(flops.values()), reverse=True)
    print(f"{title}: {repeats} repeats, 1 warm-up step, rows interleaved; useful FLOPs "
          f"{' / '.join(f'{f / batch_size / 1e9:.1f}' for f in counts)} GFLOP/image per step"
          f"{' (from images / from a token cache)' if len(counts) > 1 else ''}; images/s, s/step and % of peak from the median step; "
          f"x official from the medians and (on a loaded machine, where other jobs only ever slow a step down) from "
          f"the fastest steps")
    width = max(26, max(len(name) for name in median) + 2)
    print(f"{'run':<{width}}{'images/s':>10}{'s/step':>9}{'min..max s':>14}{'% of peak':>11}{'x official':>12}"
          f"{'(fastest)':>11}")
    for name, seconds in median.items():
        side, precision = name.split()[:2]
        other = next((n for n in median if n.split()[:2] == ["official", precision]), None)
        mine = side == "effigen" and other is not None
        ratio = f"{median[other] / seconds:.2f}" if mine else "-"
        fastest = f"{best[other] / best[name]:.2f}" if mine else "-"
        spread = f"{min(times[name]):.2f}..{max(times[name]):.2f}"
        print(f"{name:<{width}}{batch_size / seconds:>10.2f}{seconds:>9.2f}{spread:>14}"
              f"{100 * flops[name] / seconds / peaks[precision]:>10.1f}%{ratio:>12}{fastest:>11}", flush=True)


# ------------------------------------------------------------------------------------------------------- VAR
def import_var_trainer(repo: str):
    """The official VARTrainer and AmpOptimizer. trainer.py imports utils.misc (loggers, with typed-argument-parser
    and tensorboard behind it), which the step only touches on logging iterations: a stand-in module is put in its
    place when it does not import."""
    VQVAE, official_var, basic_var = import_official(repo)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # its arg_util asks for typed-argument-parser on stderr
            import utils.misc  # noqa: F401
    except Exception:  # noqa: BLE001
        stand_in = types.ModuleType("utils.misc")
        stand_in.MetricLogger = stand_in.TensorboardLogger = type("Logger", (), {})
        sys.modules["utils.misc"] = stand_in
    from trainer import VARTrainer
    from utils.amp_sc import AmpOptimizer
    from utils.lr_control import filter_params
    return VQVAE, official_var, basic_var, VARTrainer, AmpOptimizer, filter_params


@contextlib.contextmanager
def quiet_print():
    """The official code prints its configuration, some of it with dist's `print(..., force=True)`."""
    original = builtins.print
    builtins.print = lambda *a, **k: None
    try:
        yield
    finally:
        builtins.print = original


def run_var(args, peaks: dict[str, float], precisions: list[str]) -> None:
    VQVAE, official_var, basic_var, VARTrainer, AmpOptimizer, filter_params = import_var_trainer(args.official_repo)
    depth, B, lr = args.depth, args.batch_size or 4, args.lr
    scales = VAR_SCALES[args.resolution]
    hp = dict(vocab=4096, cvae=32, ch=args.vae_ch, patch_nums=scales, depth=depth, width=64 * depth, heads=depth,
              num_classes=1000, resolution=args.resolution, shared_aln=False)
    torch.manual_seed(args.seed)
    with quiet_print():
        vae, var = _construct(VQVAE, official_var.VAR, hp)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # away from the init (adaLN gamma 1e-3, zero biases) so every path carries gradient
        for p in var.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
        var.head.weight.normal_(0, 4.0 / math.sqrt(hp["width"]), generator=generator)
    vae.eval().requires_grad_(False)
    drop_path = 0.1 * depth / 24
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(vae.state_dict(), Path(tmp) / "vae.pth")
        torch.save(var.state_dict(), Path(tmp) / "var.pth")
        tokenizer, converted = load_official_var(Path(tmp) / "vae.pth", Path(tmp) / "var.pth",
                                                 resolution=args.resolution)
    config = dataclasses.replace(converted.config, drop_path_rate=drop_path)
    state = {k: v.clone() for k, v in converted.state_dict().items()}
    images = torch.rand(B, 3, args.resolution, args.resolution, generator=generator) * 2 - 1
    labels = torch.randint(0, 1000, (B,), generator=generator)
    params = sum(p.numel() for p in var.parameters())
    print(f"\n=== VAR: depth {depth}, width {hp['width']}, heads {depth} ({params / 1e6:.1f} M parameters), scales "
          f"{scales} ({sum(s * s for s in scales)} tokens), {args.resolution} px; VQVAE ch {args.vae_ch}, vocabulary "
          f"4096, Cvae 32 (its encoder runs in every step: img_to_idxBl); batch {B}; label dropout 0.1, drop path "
          f"{drop_path:.3f}, grad clip 2, AdamW (0.9, 0.95) lr {lr:g}; random weights; official attention: "
          f"flash-attn {'yes' if basic_var.flash_attn_func is not None else 'no'}, xformers "
          f"{'yes' if basic_var.memory_efficient_attention is not None else 'no'}", flush=True)

    def official_side(precision: str):
        model = copy.deepcopy(var).train()
        with quiet_print():
            names, paras, groups = filter_params(model, nowd_keys={
                "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul"})
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0, betas=(0.9, 0.95), fused=True)
        amp = AmpOptimizer(mixed_precision=0, optimizer=optimizer, names=names, paras=paras, grad_clip=2.0)
        if precision == "bf16":  # the official amp_ctx is a CUDA autocast; the same one on the CPU
            amp.amp_ctx = torch.autocast("cpu", enabled=True, dtype=torch.bfloat16, cache_enabled=True)
        trainer = VARTrainer(torch.device("cpu"), scales, tuple(s * 16 for s in scales), vae, model, model, amp, 0.0)
        logger = types.SimpleNamespace(log_iters=set())

        def step():
            return trainer.train_step(it=1, g_it=1, stepping=True, metric_lg=logger, tb_lg=None, inp_B3HW=images,
                                      label_B=labels, prog_si=-1, prog_wp_it=1.0)
        return model, optimizer, amp, step

    def effigen_side(precision: str, folder: str):
        network = EffigenVAR(config)
        network.load_state_dict(state)
        objective = build_objective(get_method("var"), NextScaleConfig(label_dropout=0.1), num_classes=1000,
                                    tokenizer=tokenizer)
        trainer = make_trainer(network, objective, precision, B, folder, learning_rate=lr, weight_decay=0.0,
                               betas=(0.9, 0.95), grad_clip=2.0)
        batches = repeat_batch(images, labels)
        return trainer, lambda: trainer.train_step(batches)

    # --token-cache: the same step from the ids a token cache stores (`data.token_cache`), no encoder in the step
    cached_ids = tokenizer.output.flatten_indices(tokenizer.indices_from_images(images))

    def effigen_cached(precision: str, folder: str):
        trainer, _ = effigen_side(precision, folder)
        batches = repeat_batch(cached_ids, labels)
        return trainer, lambda: trainer.train_step(batches)

    with tempfile.TemporaryDirectory() as folder:
        # --- 1. agreement, fp32, no label dropout, no drop path
        model, optimizer, amp, step = official_side("fp32")
        trainer, _ = effigen_side("fp32", folder)
        model.cond_drop_rate = 0.0
        for module in model.modules():
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0
        for module in trainer.network.modules():
            if type(module).__name__ == "DropPath":
                module.p = 0.0
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        recorded = {}
        backward_clip_step = amp.backward_clip_step

        def recording(stepping, loss):
            recorded["loss"] = loss.detach().clone()
            return backward_clip_step(stepping=stepping, loss=loss)

        amp.backward_clip_step = recording
        official_norm, _ = step()
        trainer._random = lambda micro: FixedRandom(B)
        logs = trainer.train_step(repeat_batch(images, labels))
        ours_idx = torch.cat(tokenizer.indices_from_images(images), 1)
        theirs_idx = torch.cat(vae.img_to_idxBl(images), 1)
        same_tokens = int((ours_idx == theirs_idx).sum())
        extra = (f"; tokens equal {same_tokens}/{ours_idx.numel()}; grad norm {float(logs['grad_norm']):.4f} vs "
                 f"{float(official_norm):.4f}; loss {float(logs['loss']):.4f}")
        check_or_stop("VAR", relative_error(logs["loss"], recorded["loss"]),
                      *compare_step(model, optimizer, before, trainer, lr), extra=extra)
        del model, optimizer, amp, trainer

        # --- 2. speed
        rows = {}
        for precision in precisions:
            _, _, _, official_step = official_side(precision)
            ours, effigen_step = effigen_side(precision, folder)
            rows[f"effigen {precision}"] = effigen_step
            rows[f"official {precision}" + (" autocast" if precision == "bf16" else "")] = official_step
            if args.token_cache:
                rows[f"effigen {precision} token-cache"] = effigen_cached(precision, folder)[1]
            if args.kernels_ab and precision == "bf16":
                rows["effigen bf16 C-kernels-off"] = kernels_off(effigen_step)
                if args.token_cache:
                    rows["effigen bf16 token-cache C-kernels-off"] = kernels_off(rows["effigen bf16 token-cache"])
            if precision == "fp32":
                flops_trainer = ours
        counting, _ = effigen_side("fp32", folder) if "fp32" not in precisions else (flops_trainer, None)
        flops, _ = count_flops(lambda: counting.train_step(repeat_batch(images, labels)))
        if args.token_cache:  # the cached rows do less work: their own count (no encoder convolutions)
            cached_flops, _ = count_flops(lambda: counting.train_step(repeat_batch(cached_ids, labels)))
            flops = {name: cached_flops if "token-cache" in name else flops for name in rows}
        profile_and_time(rows, args, B, flops, peaks, "VAR", f"VAR-d{depth} batch {B}")


# ------------------------------------------------------------------------------------------------------- DiT
def _timm_stand_in() -> types.ModuleType:
    """`timm.models.vision_transformer`'s PatchEmbed, Attention and Mlp as DiT's models.py uses them (timm >= 0.9:
    fused scaled_dot_product_attention, no q/k norm, no dropout), for when timm is not installed."""
    class PatchEmbed(nn.Module):
        def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True,
                     bias=True):
            super().__init__()
            self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
            self.grid_size = (img_size // patch_size, img_size // patch_size)
            self.num_patches = self.grid_size[0] * self.grid_size[1]
            self.flatten = flatten
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
            self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

        def forward(self, x):
            x = self.proj(x)
            if self.flatten:
                x = x.flatten(2).transpose(1, 2)
            return self.norm(x)

    class Attention(nn.Module):
        def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0.0, proj_drop=0.0,
                     norm_layer=nn.LayerNorm):
            super().__init__()
            self.num_heads, self.head_dim = num_heads, dim // num_heads
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
            self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
            self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
            self.attn_drop = nn.Dropout(attn_drop)
            self.proj = nn.Linear(dim, dim)
            self.proj_drop = nn.Dropout(proj_drop)

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            x = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
            return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))

    class Mlp(nn.Module):
        def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, norm_layer=None,
                     bias=True, drop=0.0):
            super().__init__()
            out_features, hidden_features = out_features or in_features, hidden_features or in_features
            self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
            self.act = act_layer()
            self.drop1 = nn.Dropout(drop)
            self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
            self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
            self.drop2 = nn.Dropout(drop)

        def forward(self, x):
            return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    module = types.ModuleType("timm.models.vision_transformer")
    module.PatchEmbed, module.Attention, module.Mlp = PatchEmbed, Attention, Mlp
    return module


def import_dit(repo: str):
    repo_path = Path(repo).resolve()
    if not (repo_path / "models.py").is_file() or not (repo_path / "diffusion" / "gaussian_diffusion.py").is_file():
        raise SystemExit(f"{repo_path} is not a facebookresearch/DiT checkout (no models.py / diffusion/)")
    timm = "timm"
    try:
        import timm.models.vision_transformer  # noqa: F401
    except ImportError:
        timm = "stand-in for timm's PatchEmbed/Attention/Mlp (timm is not installed)"
        for name in ("timm", "timm.models"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["timm.models.vision_transformer"] = _timm_stand_in()
    sys.path.insert(0, str(repo_path))
    saved = sys.modules.pop("models", None)  # VAR's checkout has a `models` package too
    try:
        import models as dit_models
        from diffusion import create_diffusion
    finally:
        if saved is not None:
            sys.modules["dit_models"], sys.modules["models"] = sys.modules.get("models"), saved
    # train.py's update_ema, compiled from its source (train.py itself imports torchvision and diffusers)
    source = (repo_path / "train.py").read_text()
    function = next(node for node in ast.parse(source).body
                    if isinstance(node, ast.FunctionDef) and node.name == "update_ema")
    namespace = {"OrderedDict": OrderedDict, "torch": torch}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(repo_path / "train.py"), "exec"), namespace)
    return dit_models.DiT_models, create_diffusion, namespace["update_ema"], timm


def run_dit(args, peaks: dict[str, float], precisions: list[str]) -> None:
    DiT_models, create_diffusion, update_ema, timm = import_dit(args.dit_repo)
    B, lr, latent, C = args.batch_size or 8, args.lr, args.latent_size, 4
    torch.manual_seed(args.seed)
    official = DiT_models[args.size](input_size=latent, num_classes=1000)  # learn_sigma, class dropout 0.1
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # away from the adaLN-Zero init, which would make every block the identity
        for p in official.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(official.state_dict(), Path(tmp) / "dit.pt")
        converted = load_official_dit(Path(tmp) / "dit.pt")
    state = {k: v.clone() for k, v in converted.state_dict().items()}
    diffusion = create_diffusion(timestep_respacing="")
    x = torch.randn(B, C, latent, latent, generator=generator)
    y = torch.randint(0, 1000, (B,), generator=generator)
    config = converted.config
    params = sum(p.numel() for p in official.parameters() if p.requires_grad)
    print(f"\n=== DiT: {args.size} (depth {config.depth}, width {config.hidden_size}, heads {config.num_heads}, "
          f"{params / 1e6:.1f} M parameters), latents {C}x{latent}x{latent} ({(latent // config.patch_size) ** 2} "
          f"tokens), 1000 classes, learned sigma (MSE + VB); batch {B}; label dropout 0.1, AdamW lr {lr:g} weight "
          f"decay 0, no grad clip, EMA 0.9999; random weights; official models.py with {timm}", flush=True)

    def official_side(precision: str):
        model = copy.deepcopy(official).train()
        ema = copy.deepcopy(model).requires_grad_(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        recorded = {}

        def step(t=None, noise=None):
            t = torch.randint(0, diffusion.num_timesteps, (B,)) if t is None else t
            with autocast:
                loss_dict = diffusion.training_losses(model, x, t, dict(y=y), noise=noise)
            loss = loss_dict["loss"].mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            update_ema(ema, model)
            recorded["loss"] = loss.detach()
        return model, ema, optimizer, recorded, step

    def effigen_side(precision: str, folder: str):
        network = type(converted)(config)
        network.load_state_dict(state)
        objective = build_objective(get_method("dit-ddpm"), DDPMConfig(learn_sigma=True, label_dropout=0.1),
                                    num_classes=1000)
        trainer = make_trainer(network, objective, precision, B, folder, learning_rate=lr, weight_decay=0.0,
                               grad_clip=None, ema_decay=0.9999, ema_warmup=False)
        batches = repeat_batch(x, y)
        return trainer, lambda: trainer.train_step(batches)

    with tempfile.TemporaryDirectory() as folder:
        # --- 1. agreement, fp32, no label dropout
        model, ema, optimizer, recorded, step = official_side("fp32")
        trainer, _ = effigen_side("fp32", folder)
        model.y_embedder.dropout_prob = 0.0
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        t = torch.randint(0, 1000, (B,), generator=generator)
        noise = torch.randn(x.shape, generator=generator)
        step(t, noise)
        trainer._random = lambda micro: FixedRandom(B, t, noise)
        logs = trainer.train_step(repeat_batch(x, y))
        ema_ours = dict(trainer.ema.network.named_parameters())
        ema_error = max(float((ema_ours[n] - p).abs().max()) for n, p in ema.named_parameters() if n in ema_ours)
        check_or_stop("DiT", relative_error(logs["loss"], recorded["loss"]),
                      *compare_step(model, optimizer, before, trainer, lr),
                      extra=f"; EMA max |effigen - official| {ema_error:.1e}; timesteps {t.tolist()}; loss "
                            f"{float(logs['loss']):.4f}")
        del model, ema, optimizer, trainer

        # --- 2. speed
        rows = {}
        for precision in precisions:
            ours, effigen_step = effigen_side(precision, folder)
            rows[f"effigen {precision}"] = effigen_step
            rows[f"official {precision}" + (" autocast" if precision == "bf16" else "")] = official_side(precision)[-1]
            if args.kernels_ab and precision == "bf16":
                rows["effigen bf16 C-kernels-off"] = kernels_off(effigen_step)
            if precision == "fp32":
                flops_trainer = ours
        counting = flops_trainer if "fp32" in precisions else effigen_side("fp32", folder)[0]
        flops, _ = count_flops(lambda: counting.train_step(repeat_batch(x, y)))
        profile_and_time(rows, args, B, flops, peaks, "DiT", f"{args.size} batch {B}")


def main() -> None:
    tune_cpu_allocator()  # as the effigen CLI; EFFIGEN_CPU_ALLOCATOR=default keeps glibc's thresholds (both sides share it)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["var", "dit", "both"], default="both")
    parser.add_argument("--official-repo", help="checkout of FoundationVision/VAR (not part of effigen)")
    parser.add_argument("--dit-repo", help="checkout of facebookresearch/DiT (not part of effigen)")
    parser.add_argument("--depth", type=int, default=8, help="VAR depth (width 64 x depth, heads = depth)")
    parser.add_argument("--resolution", type=int, default=256, choices=[256, 512], help="VAR's scale schedule")
    parser.add_argument("--vae-ch", type=int, default=160, help="VQVAE base channels (official: 160)")
    parser.add_argument("--size", default="DiT-S/2", choices=[k for k in DIT_PRESETS if k.startswith("DiT-")
                                                              and DIT_PRESETS[k]["hidden_size"] in OFFICIAL_HEADS])
    parser.add_argument("--latent-size", type=int, default=32, help="DiT latent grid (32 = 256 px)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: VAR 4, DiT 8")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=["both", "fp32", "bf16"], default="both", help="which rows to time")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-size", type=int, default=4096, help="square GEMM of the matmul peak measurement")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of one step per row")
    parser.add_argument("--kernels-ab", action="store_true",
                        help="also time effigen's bf16 rows with the C kernels off (torch's CPU flash attention)")
    parser.add_argument("--token-cache", action="store_true",
                        help="VAR: also time effigen's step from a token cache's ids (data.token_cache: no encoder)")
    args = parser.parse_args()
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), flush=True)
    if args.model in ("var", "both") and not args.official_repo:
        parser.error("--model var needs --official-repo (a FoundationVision/VAR checkout)")
    if args.model in ("dit", "both") and not args.dit_repo:
        parser.error("--model dit needs --dit-repo (a facebookresearch/DiT checkout)")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    precisions = list(PRECISIONS) if args.precision == "both" else [args.precision]
    env = environment("cpu")
    peaks = {p: measure_matmul_peak(p, "cpu", args.peak_size, 2.0) for p in precisions}
    print(f"torch {env['torch_version']}, {env['threads']} threads, {env.get('cpu_name', '?')}, allocator {env['cpu_allocator']}; matmul peak "
          + ", ".join(f"{p} {v / 1e12:.3f} TFLOP/s" for p, v in peaks.items()) + f" ({args.peak_size}^3 GEMM)",
          flush=True)
    if args.model in ("var", "both"):
        run_var(args, peaks, precisions)
    if args.model in ("dit", "both"):
        run_dit(args, peaks, precisions)


if __name__ == "__main__":
    main()
