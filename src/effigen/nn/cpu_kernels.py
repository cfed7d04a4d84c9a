"""Fused bf16 CPU inference kernels in C (`cpu_kernels.c` beside this file), compiled on first use and loaded with ctypes.

Why: after the GEMMs, what bounds bf16 sampling on a CPU are chains of eager element-wise passes, each reading and
writing the whole activation (docs/performance.md, "roofline"): the 2-D RoPE of LightningDiT (a pair swap and three
passes), the tanh-GELU of every DiT/VAR MLP (oneDNN's GELU epilogue costs as much as the GEMM it follows), and GroupNorm
then SiLU in the VQ/VAE decoders. Each kernel here is one pass that reads once, computes in fp32 and rounds to bf16
once: at least as accurate as the eager bf16 chain (tests compare both with an fp32 reference), not bit-identical.
`attention` replaces torch's CPU flash kernel, which runs at 15-30% of the bf16 matmul peak, by softmax attention
on AMX tiles or AVX-512 BF16 dot products (`attention_kernels()`); `attention_backward` is its gradient for bf16
training (torch's CPU flash backward is slower in bf16 than in fp32), from the forward's log-sum-exp. `sample_tokens` is the token generators' draw
(guidance, top-k, top-p, Gumbel-max) in one pass per row of fp32 logits, in any precision: the eager chain's arithmetic,
so its tokens equal the eager ones except where a sum or log rounding by an ulp decides a cut or an argmax.

How: the C source is compiled with the system compiler (`$CC`, else `cc`) as `-O3 -march=native -fopenmp` into
`$EFFIGEN_KERNEL_CACHE` (default `~/.cache/effigen/kernels`), named by a hash of the source, the flags, the compiler
and the CPU's flags, written to a temporary file and renamed into place (concurrent processes never load a half-written
library). It links libgomp.so.1, the OpenMP runtime torch's CPU wheel has already loaded, so the kernels share torch's
threads. The vector code needs AVX-512 F/BW/VL (AMX Xeons, AMD Zen 4); elsewhere, without a compiler, or with
`EFFIGEN_CPU_KERNELS=off`, `available()` is False and every caller keeps its eager ops. The kernels run only where the
oneDNN fast paths of `nn.layers.fused_dtype` do: bf16 inference on a CPU (no gradients, modules in eval mode), never in
fp32, never under torch.compile; `set_fused_inference(False)` switches both off. The one exception is attention in
bf16 training (`nn.attention`) and the MLPs' tanh-GELU and SwiGLU activations in bf16 training (`nn.layers`), which
`set_enabled(False)` switches off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch.utils import _python_dispatch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")

_STATE: dict = {"library": None, "tried": False, "error": None, "enabled": True, "amx": False, "attention": ()}
_LOCK = threading.Lock()
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "eg_vector_width": ([], ctypes.c_int),
    "eg_rope_qk": ([_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, ctypes.c_int], None),
    "eg_gelu_tanh": ([_P, _I64, ctypes.c_int], None),
    "eg_silu": ([_P, _I64, ctypes.c_int], None),
    "eg_gelu_tanh_forward": ([_P, _P, _I64, ctypes.c_int], None),
    "eg_gelu_tanh_backward": ([_P, _P, _P, _I64, ctypes.c_int], None),
    "eg_group_norm": ([_P, _P, _P, _P, _I64, _I64, _I64, _I64, ctypes.c_float, ctypes.c_int, _P, _P, _I64,
                       ctypes.c_int], None),
    "eg_silu_mul": ([_P, _P, _I64, _I64, ctypes.c_int], None),
    "eg_silu_mul_backward": ([_P, _P, _P, _I64, _I64, ctypes.c_int], None),
    "eg_cross_entropy": ([_P, ctypes.c_int, _P, _I64, _I64, ctypes.c_float, _P, _P, ctypes.c_int], None),
    "eg_cross_entropy_backward": ([_P, ctypes.c_int, _P, _P, _P, _I64, _I64, ctypes.c_float, _P, ctypes.c_int], None),
    "eg_l2norm_qk": ([_P, _P, _P, _I64, _I64, _I64, _I64, _I64, ctypes.c_int], None),
    "eg_norm_modulate": ([_P, _P, _P, _P, _P, _I64, _I64, _I64, ctypes.c_float, ctypes.c_int, ctypes.c_int], None),
    "eg_amx_init": ([], ctypes.c_int),
    "eg_attention": ([_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _P, ctypes.c_float, _P, _P, ctypes.c_int], None),
    "eg_attention_dp": ([_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _P, ctypes.c_float, _P, _P, ctypes.c_int],
                        None),
    "eg_attention_kernels": ([], ctypes.c_int),
    "eg_attention_backward_dp": ([_P] * 10 + [_I64] * 5 + [_P, ctypes.c_float, ctypes.c_int], None),
    "eg_sample_tokens": ([_P, _P, ctypes.c_double, _I64, _I64, _P, _I64, ctypes.c_double, ctypes.c_double, ctypes.c_int,
                          _P, _P, ctypes.c_int], None),
}


def _setting() -> str:
    setting = os.environ.get("EFFIGEN_CPU_KERNELS", "auto").strip().lower()
    if setting not in ("auto", "off"):
        raise ValueError(f"EFFIGEN_CPU_KERNELS={setting!r}: use 'auto' (compile and use the fused C kernels where the "
                         "CPU has AVX-512, the default) or 'off' (eager PyTorch ops only)")
    return setting


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def cache_dir() -> Path:
    return Path(os.environ.get("EFFIGEN_KERNEL_CACHE") or Path.home() / ".cache" / "effigen" / "kernels")


def _compile(compiler: str) -> Path:
    """Build (or find) the shared library for this source, compiler and CPU; returns its path."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags()]).encode()).hexdigest()
    target = cache_dir() / f"effigen_cpu_kernels_{key[:20]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(handle)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", temporary, "-lm"], capture_output=True,
                                text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(temporary, target)  # atomic: a concurrent process sees the old state or the whole library
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def library():
    """The loaded kernel library, or None (switched off, no compiler, a failed build, or no AVX-512 vector path).
    The first call compiles (a few seconds; once per machine and source version); a failure warns once."""
    if _STATE["tried"]:
        return _STATE["library"]
    with _LOCK:
        if _STATE["tried"]:
            return _STATE["library"]
        try:
            if _setting() == "off":
                _STATE["error"] = "switched off by EFFIGEN_CPU_KERNELS=off"
            elif os.name != "posix":
                _STATE["error"] = "the C kernels are built for POSIX systems only"
            else:
                compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
                if compiler is None:
                    _STATE["error"] = "no C compiler (install gcc, or set CC)"
                else:
                    lib = ctypes.CDLL(str(_compile(compiler)))
                    lib.eg_vector_width.argtypes, lib.eg_vector_width.restype = [], ctypes.c_int
                    if lib.eg_vector_width() == 0:  # built without the vector kernels (whose symbols are absent)
                        _STATE["error"] = "this CPU has no AVX-512 F/BW/VL: the eager ops are faster than scalar C"
                    else:
                        for name, (arguments, result) in _SIGNATURES.items():
                            function = getattr(lib, name)
                            function.argtypes, function.restype = arguments, result
                        _STATE["library"] = lib
                        # AMX tiles: compiled in where the compiler targets them, granted by the kernel per process
                        _STATE["amx"] = bool(lib.eg_amx_init())
                        built = lib.eg_attention_kernels()  # bit 0: AVX-512 BF16, bit 1: AMX
                        _STATE["attention"] = tuple(name for name, present in (
                            ("amx", _STATE["amx"] and built & 2), ("avx512_bf16", built & 1)) if present)
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            _STATE["error"] = str(error)
            warnings.warn(f"effigen: the fused CPU kernels could not be built, sampling uses the eager ops instead "
                          f"({error}); set EFFIGEN_CPU_KERNELS=off to silence this", RuntimeWarning, stacklevel=2)
        _STATE["tried"] = True
        return _STATE["library"]


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False (after it was called), or None."""
    return _STATE["error"]


def attention_kernels() -> tuple[str, ...]:
    """The attention kernels this machine runs, fastest first: "amx" (AMX tiles), "avx512_bf16" (`vdpbf16ps`, e.g.
    AMD Zen 4); empty where the CPU or compiler has neither (then `attention` returns None and callers run SDPA)."""
    return _STATE["attention"] if available() else ()


def set_enabled(enabled: bool) -> None:
    """Switch the C kernels on or off in this process (off = the eager ops, or oneDNN's fused epilogues where a caller
    has one); for A/B timing (`benchmarks/kernels_ab.py`) and tests. `set_fused_inference(False)` switches off both
    these kernels and the oneDNN fast paths."""
    _STATE["enabled"] = bool(enabled)


def active() -> bool:
    """Whether the kernels are built and switched on and no dispatch mode is active (callers check before work that
    only the kernel path needs)."""
    return _STATE["enabled"] and _python_dispatch._get_current_dispatch_mode() is None and available()


def _usable(*tensors: torch.Tensor) -> bool:
    """bf16 CPU tensors, and `active()`: no dispatch mode (FlopCounterMode, FakeTensorMode, a tracer) is active, since
    a mode must see the aten ops, which a ctypes call would hide (the FLOP count would lose attention) or break (fake
    tensors have no data)."""
    return all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors) and active()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def rope_qk(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor | None:
    """q and k of a fused qkv projection (B, L, S >= 2, heads, head_dim) in bf16, rotated by the (L, head_dim) tables
    (sin with the pair rotation's sign folded in: (-s, +s) per pair), returned as (2, B, heads, L, head_dim)
    contiguous; None where the kernel does not apply (the caller then runs the eager RoPE)."""
    if qkv.dim() != 5 or qkv.shape[2] < 2 or qkv.shape[-1] % 16 or not _usable(qkv):
        return None
    B, L, S, H, D = qkv.shape
    if tuple(cos.shape) != (L, D) or tuple(signed_sin.shape) != (L, D):
        return None
    qkv = qkv.contiguous()
    cos = cos.to(torch.float32).contiguous()
    signed_sin = signed_sin.to(torch.float32).contiguous()
    out = torch.empty((2, B, H, L, D), dtype=torch.bfloat16)
    with torch.profiler.record_function("effigen::rope_qk"):
        library().eg_rope_qk(qkv.data_ptr(), out.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), B, L, S, H, D,
                             _threads())
    return out


def _elementwise_(name: str, x: torch.Tensor) -> bool:
    if not x.is_contiguous() or not _usable(x):
        return False
    with torch.profiler.record_function(f"effigen::{name}"):
        getattr(library(), f"eg_{name}")(x.data_ptr(), x.numel(), _threads())
    return True


def gelu_tanh_(x: torch.Tensor) -> bool:
    """GELU (tanh form) of a contiguous bf16 tensor in place; False (x untouched) where the kernel does not apply."""
    return _elementwise_("gelu_tanh", x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor | None:
    """GELU (tanh form) of a bf16 tensor into a new contiguous tensor (x untouched, for training, where autograd keeps
    x); None where the kernel does not apply."""
    if not _usable(x):
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    with torch.profiler.record_function("effigen::gelu_tanh"):
        library().eg_gelu_tanh_forward(x.data_ptr(), out.data_ptr(), x.numel(), _threads())
    return out


def gelu_tanh_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """The gradient of GELU (tanh form) at the bf16 input x for the bf16 output gradient `grad` (same shape), computed
    in fp32 and rounded once; None where the kernel does not apply."""
    if grad.shape != x.shape or not _usable(grad, x):
        return None
    grad, x = grad.contiguous(), x.contiguous()
    out = torch.empty_like(x)
    with torch.profiler.record_function("effigen::gelu_tanh_backward"):
        library().eg_gelu_tanh_backward(grad.data_ptr(), x.data_ptr(), out.data_ptr(), x.numel(), _threads())
    return out


def silu_(x: torch.Tensor) -> bool:
    """SiLU of a contiguous bf16 tensor in place; False (x untouched) where the kernel does not apply."""
    return _elementwise_("silu", x)


def group_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, silu: bool) -> torch.Tensor | None:
    """`norm(x)` (then SiLU if `silu`) for a channels-last bf16 activation (N, C, H, W) in one statistics pass and
    one normalising pass; the output is channels-last bf16. None where the kernel does not apply."""
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last) or not _usable(x):
        return None
    N, C, H, W = x.shape
    if C % 16 or C != norm.num_channels:
        return None
    gamma = (norm.weight.detach() if norm.affine else torch.ones(C)).to(torch.float32).contiguous()
    beta = (norm.bias.detach() if norm.affine else torch.zeros(C)).to(torch.float32).contiguous()
    chunks = max(1, min(H * W, -(-4 * _threads() // N)))  # enough row blocks per image for every thread
    partial = torch.empty((N, chunks, 2, C), dtype=torch.float64)
    affine = torch.empty((2, N, C), dtype=torch.float32)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    with torch.profiler.record_function("effigen::group_norm"):
        library().eg_group_norm(x.data_ptr(), out.data_ptr(), gamma.data_ptr(), beta.data_ptr(), N, H * W, C,
                                norm.num_groups, float(norm.eps), int(silu), partial.data_ptr(), affine.data_ptr(),
                                chunks, _threads())
    return out


def silu_mul(x: torch.Tensor) -> torch.Tensor | None:
    """SwiGLU's `silu(gate) * value` for the output (..., 2h) of one fused projection [gate | value], as (..., h) in
    one pass; None where the kernel does not apply."""
    if not x.is_contiguous() or x.shape[-1] % 2 or not _usable(x):
        return None
    h = x.shape[-1] // 2
    out = x.new_empty(x.shape[:-1] + (h,))
    with torch.profiler.record_function("effigen::silu_mul"):
        library().eg_silu_mul(x.data_ptr(), out.data_ptr(), x.numel() // (2 * h), h, _threads())
    return out


def silu_mul_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """The gradient (..., 2h) [d gate | d value] of `silu_mul` at the projection output x (..., 2h) for the bf16
    output gradient (..., h), computed in fp32 and rounded once; None where the kernel does not apply."""
    if x.shape[-1] % 2 or grad.shape != x.shape[:-1] + (x.shape[-1] // 2,) or not _usable(grad, x):
        return None
    grad, x = grad.contiguous(), x.contiguous()
    h = grad.shape[-1]
    out = torch.empty_like(x)
    with torch.profiler.record_function("effigen::silu_mul_backward"):
        library().eg_silu_mul_backward(grad.data_ptr(), x.data_ptr(), out.data_ptr(), x.numel() // (2 * h), h,
                                       _threads())
    return out


def _logits_usable(logits: torch.Tensor) -> bool:
    return logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float32) and active()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-row cross-entropy (N,) fp32 of bf16 or fp32 logits (N, V) against int64 targets in [0, V) (as
    `F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=...)`), and the rows' log-sum-exp
    (N,) that `cross_entropy_backward` needs; one pass over the logits, fp32 inside. None where the kernel does not
    apply. The caller checks the targets' range."""
    if logits.dim() != 2 or target.shape != logits.shape[:1] or not _logits_usable(logits):
        return None
    logits, target = logits.contiguous(), target.to(torch.int64).contiguous()
    N, V = logits.shape
    loss, lse = torch.empty(N, dtype=torch.float32), torch.empty(N, dtype=torch.float32)
    with torch.profiler.record_function("effigen::cross_entropy"):
        library().eg_cross_entropy(logits.data_ptr(), int(logits.dtype == torch.float32), target.data_ptr(), N, V,
                                   float(label_smoothing), loss.data_ptr(), lse.data_ptr(), _threads())
    return loss, lse


def cross_entropy_backward(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
                           label_smoothing: float = 0.0) -> torch.Tensor | None:
    """The gradient (N, V), in the logits' dtype, of `cross_entropy`'s per-row losses weighted by `grad` (N,):
    grad_i (softmax(x_i) - eps / V - (1 - eps) onehot(t_i)), in one pass; None where the kernel does not apply."""
    if not _logits_usable(logits):
        return None
    logits, target = logits.contiguous(), target.to(torch.int64).contiguous()
    lse, grad = lse.float().contiguous(), grad.float().contiguous()
    out = torch.empty_like(logits)
    N, V = logits.shape
    with torch.profiler.record_function("effigen::cross_entropy_backward"):
        library().eg_cross_entropy_backward(logits.data_ptr(), int(logits.dtype == torch.float32), target.data_ptr(),
                                            lse.data_ptr(), grad.data_ptr(), N, V, float(label_smoothing),
                                            out.data_ptr(), _threads())
    return out


def norm_modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor, kind: str, eps: float,
                  gain: torch.Tensor | None = None) -> torch.Tensor | None:
    """adaLN's `norm(x) * (1 + scale) (* gain) + shift` for x (B, L, D) and per-sample shift/scale (B, 1, D), with
    `kind` "layernorm" (no affine) or "rmsnorm" (its gain passed as `gain`), in one pass over x (statistics from the
    row held in cache); None where the kernel does not apply (per-token modulation, D % 16, dtypes)."""
    if x.dim() != 3 or x.shape[-1] % 16 or not x.is_contiguous() or not _usable(x, scale):
        return None
    B, L, D = x.shape
    if tuple(scale.shape) != (B, 1, D) or (shift is not None and (tuple(shift.shape) != (B, 1, D)
                                                                  or shift.dtype != torch.bfloat16)):
        return None
    scale = scale.contiguous()
    shift = None if shift is None else shift.contiguous()
    gain = None if gain is None else gain.detach().to(torch.float32).contiguous()
    out = torch.empty_like(x)
    with torch.profiler.record_function("effigen::norm_modulate"):
        library().eg_norm_modulate(x.data_ptr(), out.data_ptr(), None if shift is None else shift.data_ptr(),
                                   scale.data_ptr(), None if gain is None else gain.data_ptr(), B, L, D, float(eps),
                                   int(kind == "rmsnorm"), _threads())
    return out


def l2norm_qk(qkv: torch.Tensor, q_scale: torch.Tensor) -> torch.Tensor | None:
    """VAR's attention inputs from a bf16 qkv projection (B, L, S >= 2, heads, head_dim): q / max(||q||, 1e-12) *
    q_scale[head] and k / max(||k||, 1e-12), as (2, B, heads, L, head_dim) in one pass; None where the kernel does
    not apply."""
    if qkv.dim() != 5 or qkv.shape[2] < 2 or qkv.shape[-1] % 16 or not _usable(qkv):
        return None
    B, L, S, H, D = qkv.shape
    q_scale = q_scale.detach().to(torch.float32).reshape(-1).contiguous()
    if q_scale.numel() != H:
        return None
    qkv = qkv.contiguous()
    out = torch.empty((2, B, H, L, D), dtype=torch.bfloat16)
    with torch.profiler.record_function("effigen::l2norm_qk"):
        library().eg_l2norm_qk(qkv.data_ptr(), out.data_ptr(), q_scale.data_ptr(), B, L, S, H, D, _threads())
    return out


def _mask_bytes(mask: torch.Tensor | None, Lq: int, Lk: int, transpose: bool = False) -> torch.Tensor | None | bool:
    """A boolean mask broadcastable to (..., Lq, Lk) with every leading size 1, as contiguous (Lq, Lk) bytes (or (Lk,
    Lq) with `transpose`); None without a mask, False where the kernels cannot take it (per-batch or per-head)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() < 2 or any(n != 1 for n in mask.shape[:-2]):
        return False
    try:
        mask = mask.reshape(mask.shape[-2:]).expand(Lq, Lk)
    except RuntimeError:
        return False
    return (mask.t() if transpose else mask).contiguous().view(torch.uint8)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              kernel: str | None = None, mask: torch.Tensor | None = None, return_lse: bool = False
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """softmax(q k^T * scale) v for bf16 q (B, heads, L_q, D), k and v (B, heads, L_k, D): exact softmax over the
    allowed keys in fp32, the weights rounded to bf16 before the product with v (as flash attention does), both
    products on AMX tiles or, without AMX, on AVX-512 BF16 dot products (`kernel`: "amx" or "avx512_bf16", default the
    first of `attention_kernels()`). `mask`: optional boolean (L_q, L_k) (leading sizes 1), True where allowed; a row
    without an allowed key gives zeros. Any strides with a contiguous last dimension (the qkv projection's views, a KV
    cache's filled part). The result (B, heads, L_q, D) is a view of a (B, L_q, heads, D) buffer, so the caller's
    `out.transpose(1, 2).reshape(B, L_q, heads * D)` copies nothing. With `return_lse`, also the rows' log-sum-exp
    (B, heads, L_q) fp32 (natural log, scale included), what `attention_backward` needs. None where no kernel applies
    (neither instruction set, shapes, dtypes, a per-batch or per-head mask, D odd or > 256); the caller then runs
    SDPA."""
    kernels = attention_kernels() if _usable(q, k, v) else ()
    if not kernels or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return None
    kernel = kernels[0] if kernel is None else kernel
    if kernel not in kernels:
        raise ValueError(f"attention kernel {kernel!r} does not run here; this machine has {kernels}")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if (tuple(k.shape) != (B, H, Lk, D) or tuple(v.shape) != (B, H, Lk, D) or D % 2 or D > 256 or Lk < 1 or Lq < 1
            or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1):
        return None
    mask_bytes = _mask_bytes(mask, Lq, Lk)
    if mask_bytes is False:
        return None
    out = torch.empty((B, Lq, H, D), dtype=torch.bfloat16)
    view = out.transpose(1, 2)
    lse = torch.empty((B, H, Lq), dtype=torch.float32) if return_lse else None
    strides = [s for t in (q, k, v, view) for s in t.stride()[:3]] + (list(lse.stride()) if return_lse else [0] * 3)
    strides = torch.tensor(strides, dtype=torch.int64)
    scale = 1.0 / D**0.5 if scale is None else float(scale)
    function = library().eg_attention if kernel == "amx" else library().eg_attention_dp
    with torch.profiler.record_function("effigen::attention"):
        function(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, H, Lq, Lk, D, strides.data_ptr(), scale,
                 None if mask_bytes is None else mask_bytes.data_ptr(), None if lse is None else lse.data_ptr(),
                 _threads())
    return (view, lse) if return_lse else view


_BACKWARD_SCORES_LIMIT = 2**25  # elements of one thread's (Lq x Lk) bf16 dS in `attention_backward`


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
                       lse: torch.Tensor, mask: torch.Tensor | None = None, scale: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Gradients (dq, dk, dv) of softmax attention for bf16 q (B, heads, L_q, D), k and v (B, heads, L_k, D), from
    the forward's output `out`, its log-sum-exp `lse` (B, heads, L_q) in fp32 (natural log, scale included: what
    `torch.ops.aten._scaled_dot_product_flash_attention_for_cpu` returns), the output's gradient and an optional
    boolean (L_q, L_k) mask, True where attention is allowed. P is recomputed from lse, every product runs on AVX-512
    BF16 dot products with fp32 accumulation, and P and dS are rounded to bf16 before their products (as flash
    attention's backward does on a GPU). Any strides with a contiguous last dimension; the gradients are (B, heads, L,
    D) views of (B, L, heads, D) buffers, the layout of the qkv projection's gradient. None where the kernel does not
    apply (no AVX-512 BF16 build, switched off, a dispatch mode, other dtypes or shapes, or sequences so long that a
    thread's (L_q x L_k) bf16 dS would pass 64 MB, e.g. 4096 x 8192); the caller then runs torch's backward."""
    tensors = (q, k, v, out, grad_out)
    if "avx512_bf16" not in attention_kernels() or not _usable(*tensors) or any(t.dim() != 4 for t in tensors):
        return None
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if (tuple(k.shape) != (B, H, Lk, D) or tuple(v.shape) != (B, H, Lk, D) or tuple(out.shape) != (B, H, Lq, D)
            or tuple(grad_out.shape) != (B, H, Lq, D) or tuple(lse.shape) != (B, H, Lq) or lse.dtype != torch.float32
            or D % 2 or D > 256 or Lk < 1 or Lq < 1 or any(t.stride(-1) != 1 for t in tensors)):
        return None
    if -(-Lq // 64) * -(-Lk // 64) * 64 * 64 > _BACKWARD_SCORES_LIMIT:
        return None  # each thread holds dS (Lq x Lk, bf16): beyond 64 MB per thread torch's tiled backward runs
    mask_t = _mask_bytes(mask, Lq, Lk, transpose=True)
    if mask_t is False:
        return None
    grads = [torch.empty((B, L, H, D), dtype=torch.bfloat16).transpose(1, 2) for L in (Lq, Lk, Lk)]
    strides = torch.tensor([s for t in (q, k, v, out, grad_out, *grads, lse) for s in t.stride()[:3]], dtype=torch.int64)
    scale = 1.0 / D**0.5 if scale is None else float(scale)
    with torch.profiler.record_function("effigen::attention_backward"):
        library().eg_attention_backward_dp(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), grad_out.data_ptr(),
                                           lse.data_ptr(), None if mask_t is None else mask_t.data_ptr(),
                                           grads[0].data_ptr(), grads[1].data_ptr(), grads[2].data_ptr(), B, H, Lq, Lk,
                                           D, strides.data_ptr(), scale, _threads())
    return tuple(grads)


def sample_tokens(logits: torch.Tensor, uniform: torch.Tensor | None, top_k: int, top_p: float, temperature: float,
                  greedy: bool, uncond: torch.Tensor | None = None, weight: float = 0.0,
                  confidence: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Tokens (...,) drawn from fp32 CPU logits (..., V) as `samplers.tokens` does eagerly: with `uncond`, guidance
    (1 + weight) * logits - weight * uncond first; then top-k, top-p, and Gumbel-max with `uniform` (..., V), the raw
    noise (clamped here; unused and may be None when `greedy`). With `confidence`, also the drawn token's probability
    under softmax(kept logits / temperature). None where the kernel does not apply (not built or switched off, a
    dispatch mode or torch.compile active, not fp32 on a CPU, shapes disagree); the caller then runs the eager ops.
    Raises ValueError where a row of the (guided) logits holds a NaN."""
    tensors = [t for t in (logits, uniform, uncond) if t is not None]
    if (not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) or not active()
            or torch.compiler.is_compiling() or logits.dim() < 1 or logits.shape[-1] < 1):
        return None
    if any(t.shape != logits.shape for t in tensors) or (uniform is None and not greedy):
        return None
    V = logits.shape[-1]
    rows = logits.numel() // V
    logits = logits.contiguous()
    uncond = uncond.contiguous() if uncond is not None else None
    uniform = uniform.contiguous() if uniform is not None else None
    tokens = torch.empty(logits.shape[:-1], dtype=torch.int64)
    probability = torch.empty(logits.shape[:-1], dtype=torch.float32) if confidence else None
    with torch.profiler.record_function("effigen::sample_tokens"):
        library().eg_sample_tokens(logits.data_ptr(), uncond.data_ptr() if uncond is not None else None, float(weight),
                                   rows, V, uniform.data_ptr() if uniform is not None else None, int(top_k),
                                   float(top_p), float(temperature), int(bool(greedy)), tokens.data_ptr(),
                                   probability.data_ptr() if confidence else None, _threads())
    if rows and bool((tokens < 0).any()):
        raise ValueError("the logits to sample tokens from contain NaN: the network's output diverged (check the "
                         "weights, the precision, or lower the guidance scale)")
    return tokens, probability
