"""Throughput, latency, memory and FLOPs of a pipeline's full sampling call, measured in this process.

What each figure is:

- latency: wall time of one `pipeline(labels, batch_size=B, precision=...)` call (noise draw, every
  network evaluation, the solver, the copy of the images to the CPU), after `warmup` untimed calls;
  median, min and max over `repeats`. images/s = B / median latency.
- FLOPs per image: `torch.utils.flop_counter.FlopCounterMode` over one full sampling call, divided by
  B. It counts matrix multiplies and convolutions (2 FLOPs per multiply-add) and attention (the two
  batched products of SDPA; PyTorch has no formula for the CPU flash kernel, so `CPU_SDPA_FLOPS` adds
  one); element-wise work (norms, activations, the solver's axpy) is not counted, as is usual.
- achieved FLOP/s = FLOPs per image x images/s, and its fraction of `measure_matmul_peak` in the same
  precision on the same device, measured in the same run.
- peak memory, in a separate untimed call: on CUDA `torch.cuda.max_memory_allocated` (tensors only, not
  the caching allocator's reserve) minus what was allocated before the call. On CPU the increase of the
  process's resident set size (RSS) over its value at the start of the call: freed heap is first handed
  back to the OS (glibc `malloc_trim`), then the kernel's RSS high-water mark is reset (`/proc/self/
  clear_refs` = 5) and read back after the call (`VmHWM`), which misses no spike. Where that reset is
  refused, a thread polls `/proc/self/statm` every ~1 ms (it can miss spikes shorter than that). RSS
  counts every page the process touches: tensors, allocator slack, thread stacks, lazily loaded kernels.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import statistics
import threading
import time
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..nn import cpu_kernels
from ..config import config_to_dict
from ..runtime import cpu_allocator_tuned

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_precision(precision: str) -> torch.dtype:
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[precision]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ matmul peak
def measure_matmul_peak(precision: str = "fp32", device: str | torch.device = "cpu", size: int = 2048,
                        seconds: float = 1.0) -> float:
    """This machine's dense matrix-multiply rate in FLOP/s: `size` x `size` products in `precision`,
    repeated for about `seconds`, timed in chunks of ~0.1 s; the best chunk is returned (other jobs on
    the machine only ever slow a chunk down)."""
    dtype = _check_precision(precision)
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    flops_per_product = 2.0 * size**3
    _synchronize(device)
    started = time.perf_counter()
    torch.mm(a, b, out=out)  # warm-up: thread pool, kernel selection, packing buffers
    _synchronize(device)
    one = max(time.perf_counter() - started, 1e-6)
    per_chunk = max(1, min(1000, int(0.1 / one)))
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(per_chunk):
            torch.mm(a, b, out=out)
        _synchronize(device)
        elapsed = time.perf_counter() - started
        best = max(best, flops_per_product * per_chunk / max(elapsed, 1e-9))
        if time.perf_counter() >= deadline:
            return best


# ---------------------------------------------------------------------------------------------- memory
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _current_rss() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def _rss_high_water_mark() -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_rss_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RssPoller(threading.Thread):
    """Reads the RSS every `interval` seconds until stopped; `peak` is the largest value seen."""

    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = _current_rss() or 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _current_rss() or 0)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, _current_rss() or 0)
        return self.peak


def measure_peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu",
                        method: str = "auto") -> dict[str, Any]:
    """Run `fn()` once and return its peak memory (see the module docstring). `method` is "auto",
    or on CPU "hwm" (kernel high-water mark) or "poll" (1 ms polling thread)."""
    device = torch.device(device)
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_memory_bytes": peak - before, "peak_memory_total_bytes": peak,
                "memory_method": "cuda.max_memory_allocated minus allocated before the call"}
    _release_free_heap()
    before = _current_rss()
    if before is None:
        raise RuntimeError("peak CPU memory needs /proc/self/statm (Linux); it is not readable here")
    if method in ("auto", "hwm") and _reset_rss_high_water_mark():
        fn()
        peak = max(_rss_high_water_mark() or 0, _current_rss() or 0)
        description = "CPU RSS high-water mark (VmHWM after a clear_refs reset) minus RSS before the call"
    elif method in ("auto", "poll"):
        poller = _RssPoller()
        poller.start()
        try:
            fn()
        finally:
            peak = poller.stop()
        description = "CPU RSS polled every ~1 ms (/proc/self/statm) minus RSS before the call"
    else:
        raise ValueError(f"memory method {method!r} is unavailable here; use auto, hwm or poll")
    return {"peak_memory_bytes": max(peak - before, 0), "peak_memory_total_bytes": peak,
            "memory_method": description}


# ----------------------------------------------------------------------------------------------- FLOPs
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The two products of attention, q @ k^T and softmax(.) @ v, as PyTorch counts its other SDPA kernels."""
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * d_q + 2 * b * h * s_q * s_k * d_v


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    """Its backward as PyTorch counts its other SDPA backward kernels (`sdpa_backward_flop_count`): five products,
    the recomputed scores included."""
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """Integer matrix products (quantized linear layers, nn/quant.py) count like float ones: 2 M K N."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _linear_pointwise_flops(x_shape, second_shape, third_shape=None, *args, out_shape=None, **kwargs) -> int:
    """oneDNN's fused linear + activation (nn/layers.py `fused_dtype`): 2 M K N, as the plain linear it replaces.
    `_linear_pointwise(x, w, b, ...)` or `_linear_pointwise.binary(x, other, w, b, ...)` (w is then the third)."""
    binary = third_shape is not None and not isinstance(third_shape, str) and len(third_shape) == 2
    weight_shape = third_shape if binary else second_shape
    rows = 1
    for n in x_shape[:-1]:
        rows *= n
    return 2 * rows * x_shape[-1] * weight_shape[0]


CPU_SDPA_FLOPS = {}
if hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    CPU_SDPA_FLOPS[torch.ops.mkldnn._linear_pointwise] = _linear_pointwise_flops
if hasattr(torch.ops.aten, "_int_mm"):
    CPU_SDPA_FLOPS[torch.ops.aten._int_mm] = _int_mm_flops
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    CPU_SDPA_FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    CPU_SDPA_FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops


def parameter_count(network: torch.nn.Module) -> int:
    """Trainable-shaped parameters; a quantized network counts each packed weight as its logical element count."""
    logical = getattr(network, "logical_parameter_count", None)
    return int(logical()) if callable(logical) else sum(p.numel() for p in network.parameters())


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Total FLOPs of `fn()` and the split by operator."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


# ------------------------------------------------------------------------------------------ benchmarks
def benchmark_runs(runs: Sequence[tuple[Any, str]], batch_size: int = 16, repeats: int = 5, warmup: int = 1,
                   peak_flops_per_second: dict[str, float] | None = None, peak_size: int = 2048,
                   peak_seconds: float = 1.0, **sampler_overrides: Any) -> list[dict[str, Any]]:
    """Benchmark several (pipeline, precision) runs interleaved: every warm-up and timed repeat goes
    through the runs in turn (A, B, A, B, ...), so a slow spell on a shared machine hits them all alike.
    `peak_flops_per_second` maps a precision to a known peak; missing ones are measured here."""
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    peaks = dict(peak_flops_per_second or {})
    calls = []
    for pipeline, precision in runs:
        _check_precision(precision)
        settings = pipeline.sampler_settings(**sampler_overrides)  # fails on a bad override before any work
        labels = torch.arange(batch_size) % pipeline.num_classes

        def call(pipeline=pipeline, labels=labels, precision=precision):
            pipeline(labels, seed=0, batch_size=batch_size, precision=precision, **sampler_overrides)
            _synchronize(pipeline.device)

        calls.append((pipeline, precision, settings, call))
    for _, precision, _, _ in calls:
        if precision not in peaks:
            peaks[precision] = measure_matmul_peak(precision, calls[0][0].device, peak_size, peak_seconds)

    for _ in range(warmup):
        for *_, call in calls:
            call()
    latencies: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, (*_, call) in enumerate(calls):
            started = time.perf_counter()
            call()
            latencies[i].append(time.perf_counter() - started)

    results = []
    for (pipeline, precision, settings, call), times in zip(calls, latencies):
        memory = measure_peak_memory(call, pipeline.device)
        flops, by_op = count_flops(call)
        evaluations = pipeline.number_of_evaluations(**sampler_overrides)
        median = statistics.median(times)
        images_per_second = batch_size / median
        flops_per_image = flops / batch_size
        achieved = flops_per_image * images_per_second
        results.append({
            "method": pipeline.method.name,
            "network": type(pipeline.generator).__name__,
            "precision": precision,
            "device": str(pipeline.device),
            "batch_size": batch_size,
            "repeats": repeats,
            "warmup": warmup,
            "sampler": config_to_dict(settings),
            "sample_shape": list(pipeline.sample_shape),
            "parameters": parameter_count(pipeline.generator),
            "evaluations_per_image": evaluations,
            "latency_median_s": median,
            "latency_min_s": min(times),
            "latency_max_s": max(times),
            "latencies_s": list(times),
            "images_per_second": images_per_second,
            "images_per_second_best": batch_size / min(times),
            **memory,
            "flops_per_image": flops_per_image,
            "flops_per_evaluation": flops_per_image / evaluations,
            "flops_by_op_per_image": {op: n / batch_size for op, n in by_op.items()},
            "achieved_flops_per_second": achieved,
            "matmul_peak_flops_per_second": peaks[precision],
            "peak_fraction": achieved / peaks[precision],
        })
    return results


def benchmark_pipeline(pipeline, batch_size: int = 16, precision: str = "fp32", repeats: int = 5, warmup: int = 1,
                       **sampler_overrides: Any) -> dict[str, Any]:
    """One pipeline in one precision; the figures are those of `benchmark_runs`. Pass
    `peak_flops_per_second={precision: value}` to skip measuring the matmul peak."""
    return benchmark_runs([(pipeline, precision)], batch_size, repeats, warmup, **sampler_overrides)[0]


RATIO_KEYS = {
    "images_per_second": "images_per_second",
    "latency": "latency_median_s",
    "peak_memory": "peak_memory_bytes",
    "flops_per_image": "flops_per_image",
    "parameters": "parameters",
    "peak_fraction": "peak_fraction",
}


def compare(first: dict[str, Any], second: dict[str, Any]) -> dict[str, float | None]:
    """first / second for each headline figure (images/s > 1: `first` is faster). None where `second` is 0."""
    return {name: (first[key] / second[key] if second[key] else None) for name, key in RATIO_KEYS.items()}


def environment(device: str | torch.device) -> dict[str, Any]:
    import datetime
    import platform

    device = torch.device(device)
    info = {
        "device": str(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_allocator": "tuned (mallopt)" if cpu_allocator_tuned() else "default",
        "cpu_kernels": "fused C kernels" if cpu_kernels.available() else f"eager ({cpu_kernels.unavailable_reason()})",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        info["cpu_name"] = match.group(1).strip() if match else platform.processor()
    except OSError:
        info["cpu_name"] = platform.processor()
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
        info["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info
