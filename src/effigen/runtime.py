"""Process-wide CPU settings for fast sampling and training: the memory allocator.

Why: glibc's malloc serves every block above its mmap threshold with a fresh `mmap` and returns it with `munmap`
when freed. The threshold adapts up to 32 MiB, so larger tensors (DiT-B/2's (32, 256, 3072) MLP activation at batch
16 with guidance is 48 MiB in bf16; VAR-d16's last scale 64 MiB) are page-faulted in and zeroed by the kernel at
every use: on the 2-core AMX machine of docs/performance.md one (8192 x 768) x (768 x 3072) bf16 GEMM ran at 1.3
TFLOP/s with a fresh 48 MiB output, against 1.8-2.1 with the output recycled, and a DiT-B/2 sampling call took 1.28x
longer. PyTorch's CPU tuning guides reach the same result by preloading jemalloc or tcmalloc; `tune_cpu_allocator`
gets it from glibc itself, at run time, with `mallopt`: blocks below 2 GiB come from the heap and freed memory is kept
for reuse instead of being trimmed. The cost is that the process's resident memory stays at its high-water mark.

The `effigen` command line calls it for every command; Python users call `effigen.runtime.tune_cpu_allocator()`
once. `EFFIGEN_CPU_ALLOCATOR=default` (or `tune_cpu_allocator(False)`) leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 2**31 - 1  # bytes; blocks above this still get their own mapping (mallopt takes an int)
TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB of free memory at the top of the heap instead of trimming it

_STATE = {"tuned": False}


def tune_cpu_allocator(enable: bool | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds (module docstring) so that large tensors are recycled by malloc instead
    of being mapped and page-faulted at every allocation. `enable=None` follows `EFFIGEN_CPU_ALLOCATOR` (`tuned`, the
    default, or `default`). Returns whether the allocator is tuned after the call; a no-op (False) where the C library
    is not glibc (macOS, musl, Windows) or the tuning is switched off. Idempotent; it cannot be undone in-process."""
    if enable is None:
        setting = os.environ.get("EFFIGEN_CPU_ALLOCATOR", "tuned").strip().lower()
        if setting not in ("tuned", "default"):
            raise ValueError(f"EFFIGEN_CPU_ALLOCATOR={setting!r}: use 'tuned' (mallopt, the default) or 'default' "
                             "(glibc's own thresholds)")
        enable = setting == "tuned"
    if not enable or _STATE["tuned"]:
        return _STATE["tuned"]
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # glibc before 2.35 refuses mmap thresholds above 32 MiB (HEAP_MAX_SIZE / 2): fall back to that maximum
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 or mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    _STATE["tuned"] = ok
    return ok


def cpu_allocator_tuned() -> bool:
    """Whether `tune_cpu_allocator` has taken effect in this process (benchmarks print it beside their figures)."""
    return _STATE["tuned"]
