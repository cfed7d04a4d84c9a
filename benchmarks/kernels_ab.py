"""The fused C kernels of `effigen.nn.cpu_kernels` on and off, and LightningDiT against DiT, in one process.

    python benchmarks/kernels_ab.py --models DiT-B/2 LightningDiT-B/2 --batch-size 16 --steps 2 --rounds 5
    python benchmarks/kernels_ab.py --models DiT-B/2 LightningDiT-B/2 VAR-d16 HMAR-d16 --rounds 3
    python benchmarks/kernels_ab.py --models VAR-d16 HMAR-d16 --off sampling --rounds 3   # the token draw alone
    python benchmarks/kernels_ab.py --ops          # each kernel against the eager ops it replaces, one op at a time
    python benchmarks/kernels_ab.py --train --batch-size 8 --rounds 3   # bf16 training steps instead of sampling

Each model is `benchmarks/profile_sampling.py`'s random-weight sampling call (bf16, latents only, guidance on). The
rows (model x kernels on/off) run interleaved, round after round, after one warm-up call each, so a slow minute of
the shared machine hits every row alike; the medians give each model's speed-up from the kernels (the eager or
oneDNN-epilogue ops they replace: RoPE, tanh-GELU, GroupNorm+SiLU) and, where both DiT-B/2 and LightningDiT-B/2 run,
LightningDiT's images/s relative to DiT's (equal FLOPs by construction: issue #23 asks for >= 1.0x). `--off sampling`
switches off only the fused token draw (`cpu_kernels.sample_tokens`) in the "off" rows, all other kernels staying on.
`--train` times bf16 training steps (`Trainer.train_step` of `dit-flow`: the loss under autocast, backward, AdamW,
EMA) of the DiT-family models on (B, 4, 32, 32) latents instead: the kernels there are attention's forward and
backward, and the MLP activations' (tanh-GELU, SwiGLU) forward and backward; VAR's and HMAR's training steps are
timed by `train_vs_official.py --kernels-ab` and `hmar_vs_var.py`.

--ops times each kernel against the ops it replaces at the models' shapes (DiT-B/2 at batch 16 with guidance: 32 x 256
tokens of width 768; VAR's VQVAE decoder at batch 16: channels-last (16, 160, 256, 256)), and the SD-VAE decoder's
sampling layout (channels-last with the kernels) against NCHW eager, and each attention kernel the CPU has (AMX,
AVX-512 BF16) against SDPA at DiT-B/2's and VAR-d16's last-scale shapes, bf16 training attention (the AVX-512 BF16
forward with log-sum-exp and backward kernels against SDPA's forward and backward) at DiT-B/2's and VAR-d12's, bf16
training tanh-GELU (forward and backward C passes against torch's bf16 ops) at DiT-B/2's MLP, the token generators'
bf16 training cross-entropy at VAR-d12's (2720 x 4096 logits) against `F.cross_entropy` on the fp32 cast, and
the fused token draw (guidance, top-k
900, top-p 0.96, Gumbel-max) against the eager chain at VAR-d16's last scale (16 x 256 rows of 4096 logits; both from
the same uniform noise, whose generation is not timed); median of interleaved repeats, and prints each one's largest
deviation from the fp32 result beside the eager bf16 one's (for the draw: the number of tokens that differ from the
eager chain's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_sampling import MODELS, build  # noqa: E402

from effigen.bench.throughput import count_flops, environment, measure_matmul_peak  # noqa: E402
from effigen.nn import cpu_kernels  # noqa: E402
from effigen.runtime import tune_cpu_allocator  # noqa: E402


def _ops(repeats: int) -> None:
    import torch.nn.functional as F

    from effigen.nn.layers import SwiGLU, fused_linear
    from effigen.nn.norms import RMSNorm
    from effigen.nn.rope import VisionRoPE2D

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    rope = VisionRoPE2D(64, 16)
    qkv = torch.randn(32, 256, 3, 12, 64).to(bf16)
    cos32, sin32 = rope._signed_tables(torch.empty(0))
    fc1 = torch.nn.Linear(768, 3072)
    tokens = torch.randn(32 * 256, 768).to(bf16)
    swiglu = SwiGLU(768, 2048).eval()
    x, shift, scale = torch.randn(32, 256, 768).to(bf16), torch.randn(32, 1, 768).to(bf16), torch.randn(32, 1, 768).to(bf16)
    layer_norm, rms = torch.nn.LayerNorm(768, elementwise_affine=False, eps=1e-6), RMSNorm(768).eval()
    group = torch.nn.GroupNorm(32, 160, eps=1e-6)
    image = torch.randn(16, 160, 256, 256).to(bf16).contiguous(memory_format=torch.channels_last)

    def swiglu_kernel():
        return swiglu.w3(cpu_kernels.silu_mul(fused_linear(tokens, swiglu.w12, bf16, "none")))

    def swiglu_onednn():
        cpu_kernels.set_enabled(False)
        try:
            return swiglu(tokens)
        finally:
            cpu_kernels.set_enabled(True)

    from effigen.tokenizers.kl_vae import KLVAE, KLVAEConfig

    vae = KLVAE(KLVAEConfig()).eval()  # the SD-VAE architecture (f8, 4 latent channels)
    latents = torch.randn(4, 4, 32, 32)

    def decode_fast():  # eval + no_grad: channels-last, the GroupNorm + SiLU kernel
        with torch.autocast("cpu", dtype=bf16):
            return vae.decode_raw(latents)

    def decode_nchw():  # the layout and ops before: NCHW (train mode takes that path), no C kernels
        cpu_kernels.set_enabled(False)
        vae.train()
        try:
            with torch.autocast("cpu", dtype=bf16):
                return vae.decode_raw(latents)
        finally:
            vae.eval()
            cpu_kernels.set_enabled(True)

    cases = [  # name, kernel, eager, fp32 reference (or None)
        ("RoPE of q and k (32, 256, 2, 12, 64)", lambda: cpu_kernels.rope_qk(qkv, cos32, sin32),
         lambda: rope.rotate_tokens_major(qkv[:, :, :2]).permute(2, 0, 3, 1, 4).contiguous(),
         lambda: rope.rotate_tokens_major(qkv[:, :, :2].float()).permute(2, 0, 3, 1, 4)),
        ("fc1 + tanh-GELU (8192 x 768 x 3072)", lambda: _gelu_after(fused_linear(tokens, fc1, bf16, "none")),
         lambda: fused_linear(tokens, fc1, bf16, "gelu", "tanh"),
         lambda: F.gelu(fused_linear(tokens, fc1, bf16, "none").float(), approximate="tanh")),
        ("SwiGLU MLP (8192 x 768, hidden 2048)", swiglu_kernel, swiglu_onednn, None),
        ("LayerNorm + modulate (32, 256, 768)", lambda: cpu_kernels.norm_modulate(x, shift, scale, "layernorm", 1e-6),
         lambda: torch.addcmul(shift, layer_norm(x), 1 + scale),
         lambda: layer_norm(x.float()) * (1 + scale.float()) + shift.float()),
        ("RMSNorm + modulate (32, 256, 768)", lambda: cpu_kernels.norm_modulate(x, shift, scale, "rmsnorm", 1e-6,
                                                                                rms.weight),
         lambda: torch.addcmul(shift, rms.normalize_without_gain(x), (1 + scale) * rms.weight.to(bf16)),
         lambda: F.rms_norm(x.float(), (768,), rms.weight, 1e-6) * (1 + scale.float()) + shift.float()),
        ("GroupNorm + SiLU (16, 160, 256, 256) channels-last", lambda: cpu_kernels.group_norm(image, group, True),
         lambda: F.silu(group(image), inplace=True), lambda: F.silu(group(image.float()))),
        ("SD-VAE decoder, batch 4, 256 px: channels-last + kernels / NCHW eager", decode_fast, decode_nchw,
         lambda: vae.decode_raw(latents)),
    ]
    # softmax attention (AMX tiles, or AVX-512 BF16 dot products) against torch's CPU flash kernel (SDPA), bf16
    for kernel in cpu_kernels.attention_kernels():
        for name, (B, H, Lq, Lk) in (("DiT-B/2", (32, 12, 256, 256)), ("VAR-d16 last scale, KV cache", (32, 16, 256, 680))):
            q, k, v = (torch.randn(B, H, L, 64).to(bf16) for L in (Lq, Lk, Lk))
            cases.append((f"attention ({kernel}), {name}: ({B}, {H}, {Lq} queries, {Lk} keys, 64)",
                          lambda q=q, k=k, v=v, kernel=kernel: cpu_kernels.attention(q, k, v, kernel=kernel),
                          lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                          lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q.float(), k.float(), v.float())))
    # bf16 training attention, forward + backward: the AVX-512 BF16 kernel pair against SDPA with autograd (torch's
    # CPU flash forward and backward); the error column is over dq, dk and dv together
    if "avx512_bf16" in cpu_kernels.attention_kernels():
        from effigen.nn.attention import BlockMask

        var_groups = BlockMask((1, 4, 9, 16, 25, 36, 64, 100, 169, 256)).groups()
        start, end, sizes = var_groups[1]  # VAR's middle group: 269 queries over 424 keys, block-causal mask
        levels = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
        var_mask = torch.cat((torch.ones(end - start, start, dtype=torch.bool), levels[:, None] >= levels[None, :]), 1)
        for name, (B, H, Lq, Lk), mask in (("DiT-B/2 batch 8", (8, 12, 256, 256), None),
                                          ("VAR-d12 batch 4, last scale", (4, 12, 256, 680), None),
                                          ("VAR-d12 batch 4, block-causal group", (4, 12, end - start, end), var_mask)):
            q, k, v, g = (torch.randn(B, H, L, 64).to(bf16) for L in (Lq, Lk, Lk, Lq))

            def kernel_pair(q=q, k=k, v=v, g=g, mask=mask):
                out, lse = cpu_kernels.attention(q, k, v, mask=mask, return_lse=True, kernel="avx512_bf16")
                return torch.cat([t.flatten() for t in cpu_kernels.attention_backward(q, k, v, out, g, lse, mask)])

            def autograd(q=q, k=k, v=v, g=g, mask=mask, dtype=bf16):
                leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
                with torch.enable_grad():
                    F.scaled_dot_product_attention(*leaves, attn_mask=mask).backward(g.to(dtype))
                return torch.cat([t.grad.flatten() for t in leaves])

            cases.append((f"training attention fwd + bwd (avx512_bf16), {name}: ({B}, {H}, {Lq} queries, {Lk} keys, "
                          f"64){', mask' if mask is not None else ''}", kernel_pair, autograd,
                          lambda autograd=autograd: autograd(dtype=torch.float32)))
    # bf16 training tanh-GELU, forward + backward, at DiT-B/2's MLP (batch 8): C passes against torch's bf16 ops
    hidden, hidden_grad = torch.randn(8, 256, 3072).to(bf16), torch.randn(8, 256, 3072).to(bf16)
    cases.append(("training tanh-GELU fwd + bwd, DiT-B/2 batch 8 (8, 256, 3072)",
                  lambda: (cpu_kernels.gelu_tanh(hidden), cpu_kernels.gelu_tanh_backward(hidden_grad, hidden))[1],
                  lambda: (F.gelu(hidden, approximate="tanh"),
                           torch.ops.aten.gelu_backward(hidden_grad, hidden, approximate="tanh"))[1],
                  lambda: torch.ops.aten.gelu_backward(hidden_grad.float(), hidden.float(), approximate="tanh")))
    # the token generators' bf16 training loss, forward + backward, at VAR-d12 batch 4 (2720 tokens x 4096 logits)
    from effigen.nn.losses import token_cross_entropy

    token_logits, token_target = (torch.randn(2720, 4096) * 3).to(bf16), torch.randint(0, 4096, (2720,))

    def cross_entropy_grad(use_kernel: bool, dtype=bf16):
        leaf = token_logits.detach().to(dtype).requires_grad_()
        with torch.enable_grad():
            loss = (token_cross_entropy(leaf, token_target) if use_kernel
                    else F.cross_entropy(leaf.float(), token_target))
            loss.backward()
        return leaf.grad

    cases.append(("training cross-entropy fwd + bwd, VAR-d12 batch 4 (2720 tokens, 4096 logits)",
                  lambda: cross_entropy_grad(True), lambda: cross_entropy_grad(False),
                  lambda: cross_entropy_grad(False, torch.float32)))
    # the token draw of VAR-d16's last scale at batch 16 with guidance (fp32 logits, as the head returns them)
    from effigen.samplers.tokens import filter_logits, guided_logits

    logits = torch.randn(32, 256, 4096) * 3
    cond, uncond, uniform = logits[:16], logits[16:], torch.rand(16, 256, 4096)

    def draw_eager():
        filtered = filter_logits(guided_logits(cond, uncond, 1.2), 900, 0.96)
        return (filtered + -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))).argmax(-1)

    def draw_kernel():
        return cpu_kernels.sample_tokens(cond, uniform, 900, 0.96, 1.0, False, uncond, 1.2)[0]

    cases.append(("token draw, VAR-d16 last scale: guidance + top-k 900 + top-p 0.96 + Gumbel-max, (16, 256, 4096)",
                  draw_kernel, draw_eager, "tokens"))
    if not cpu_kernels.attention_kernels():
        print(f"(attention rows skipped: the kernel needs AMX or AVX-512 BF16; {cpu_kernels.unavailable_reason() or 'this CPU has neither'})")
    print("| op | kernel ms | eager ms | eager / kernel | max error kernel / eager vs fp32 |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for name, kernel, eager, reference in cases:
            times = {"kernel": [], "eager": []}
            for _ in range(repeats + 1):
                for label, function in (("kernel", kernel), ("eager", eager)):
                    start = time.perf_counter()
                    function()
                    times[label].append(time.perf_counter() - start)
            k, e = (statistics.median(times[label][1:]) * 1e3 for label in ("kernel", "eager"))
            errors = "-"
            if reference == "tokens":
                errors = f"{int((kernel() != eager()).sum())} of {eager().numel()} tokens differ"
            elif reference is not None:
                ref = reference()
                errors = " / ".join(f"{float((function().float() - ref).abs().max()):.3g}" for function in (kernel, eager))
            print(f"| {name} | {k:.2f} | {e:.2f} | {e / k:.2f}x | {errors} |")


def _gelu_after(hidden: torch.Tensor) -> torch.Tensor:
    cpu_kernels.gelu_tanh_(hidden)
    return hidden


def _training_steps(models: list[str], pipes: dict, labels: torch.Tensor, batch_size: int) -> dict:
    """One bf16 `Trainer.train_step` per model (rectified flow on random (B, 4, 32, 32) latents, the network's
    perturbed weights), as zero-argument callables."""
    import tempfile

    from effigen.objectives.flow_matching import RectifiedFlowConfig
    from effigen.registry import build_objective, get_method
    from effigen.training.trainer import Trainer, TrainerConfig

    unsupported = [name for name in models if not name.startswith(("DiT", "LightningDiT"))]
    if unsupported:
        raise SystemExit(f"--train times the DiT family only ({', '.join(unsupported)}: use train_vs_official.py "
                         "--kernels-ab or hmar_vs_var.py)")
    latents = torch.randn(batch_size, 4, 32, 32)

    def batches():
        while True:
            yield latents, labels

    steps = {}
    for name in models:
        folder = tempfile.mkdtemp(prefix="kernels_ab_")
        config = TrainerConfig(output_dir=folder, max_steps=10**9, batch_size=batch_size, precision="bf16",
                               device="cpu", log_every=10**9, checkpoint_every=10**9, progress=False)
        objective = build_objective(get_method("dit-flow"), RectifiedFlowConfig(), num_classes=1000)
        trainer = Trainer(config, pipes[name][0].generator.train(), objective, dataset=[], save_folder=lambda *a, **k: None)
        stream = batches()
        steps[name] = lambda trainer=trainer, stream=stream: trainer.train_step(stream)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["DiT-B/2", "LightningDiT-B/2"], choices=MODELS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="DiT-family sampling steps")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ops", action="store_true", help="time each kernel against the ops it replaces instead")
    parser.add_argument("--op-repeats", type=int, default=7)
    parser.add_argument("--train", action="store_true", help="time bf16 training steps (DiT-family models) instead")
    parser.add_argument("--off", choices=["all", "sampling"], default="all",
                        help="what the 'off' rows switch off: every kernel, or only the fused token draw")
    args = parser.parse_args()
    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        raise SystemExit(f"the C kernels are unavailable here: {cpu_kernels.unavailable_reason()}")
    env = environment("cpu")
    print(f"# {env.get('cpu_name')} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
          f"allocator: {env.get('cpu_allocator')} | {env.get('cpu_kernels')} | batch {args.batch_size}, bf16")
    if args.ops:
        return _ops(args.op_repeats)
    labels = torch.arange(args.batch_size) % 1000
    pipes = {name: build(name, args.steps) for name in args.models}
    if args.train:
        steps = _training_steps(args.models, pipes, labels, args.batch_size)

    def call(name: str) -> None:
        if args.train:
            return steps[name]()
        pipeline, extra = pipes[name]
        pipeline(labels, seed=0, batch_size=args.batch_size, precision="bf16", **extra)

    flops = {}
    for name in args.models:
        flops[name], _ = count_flops(lambda: call(name))
    peak_before = measure_matmul_peak("bf16", "cpu", 4096, 2.0)
    rows = [(name, on) for name in args.models for on in (True, False)]
    times: dict = {row: [] for row in rows}
    fused_draw = cpu_kernels.sample_tokens
    for round_ in range(args.rounds + 1):
        for name, on in rows:
            if args.off == "sampling":  # the eager draw runs where the kernel returns None
                cpu_kernels.sample_tokens = fused_draw if on else (lambda *args, **kwargs: None)
            else:
                cpu_kernels.set_enabled(on)
            start = time.perf_counter()
            call(name)
            if round_:  # round 0 warms up
                times[(name, on)].append(time.perf_counter() - start)
    cpu_kernels.set_enabled(True)
    cpu_kernels.sample_tokens = fused_draw
    peak_after = measure_matmul_peak("bf16", "cpu", 4096, 2.0)
    peak = max(peak_before, peak_after)  # the shared machine's peak drifts: the larger one (fractions err low)
    print(f"# bf16 matmul peak before / after the runs: {peak_before / 1e12:.2f} / {peak_after / 1e12:.2f} TFLOP/s "
          f"(4096^3, best 0.1 s chunk of 2 s); fractions below use the larger")
    print("| model | kernels | s / call (median) | range | images/s | TFLOP/s | % of peak | on / off |")
    print("|---|---|---|---|---|---|---|---|")
    median = {row: statistics.median(v) for row, v in times.items()}
    for name, on in rows:
        t = median[(name, on)]
        ratio = f"{median[(name, False)] / t:.2f}x" if on else ""
        print(f"| {name}{' training step' if args.train else ''} | {'on' if on else 'off' if args.off == 'all' else 'draw off'} | {t:.3f} | {min(times[(name, on)]):.3f}-{max(times[(name, on)]):.3f} "
              f"| {args.batch_size / t:.2f} | {flops[name] / t / 1e12:.2f} | {100 * flops[name] / t / peak:.1f}% "
              f"| {ratio} |")
    if "DiT-B/2" in pipes and "LightningDiT-B/2" in pipes:
        for on in (True, False):
            ratio = median[("DiT-B/2", on)] / median[("LightningDiT-B/2", on)]
            print(f"LightningDiT-B/2 / DiT-B/2 images/s, kernels {'on' if on else 'off'}: {ratio:.2f}x "
                  f"(FLOPs {flops['LightningDiT-B/2'] / flops['DiT-B/2']:.3f}x)")


if __name__ == "__main__":
    main()
