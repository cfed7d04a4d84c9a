"""effigen.runtime: the glibc allocator tuning that the CLI applies to every command."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from effigen.runtime import cpu_allocator_tuned, tune_cpu_allocator


def _minor_faults_of_reallocating(nbytes: int, times: int, warmup: int = 8) -> int:
    """Minor page faults of allocating, touching and freeing an `nbytes` tensor `times` times (after `warmup` times:
    the heap first grows to hold the block)."""
    for _ in range(warmup):
        x = torch.empty(nbytes, dtype=torch.uint8)
        x.fill_(1)
        del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        x = torch.empty(nbytes, dtype=torch.uint8)
        x.fill_(1)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_bad_setting_names_the_choices(monkeypatch):
    monkeypatch.setenv("EFFIGEN_CPU_ALLOCATOR", "jemalloc")
    with pytest.raises(ValueError, match="EFFIGEN_CPU_ALLOCATOR='jemalloc'.*'tuned'.*'default'"):
        tune_cpu_allocator()


def test_default_setting_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("EFFIGEN_CPU_ALLOCATOR", "default")
    assert tune_cpu_allocator() is cpu_allocator_tuned()


def test_tuned_allocator_recycles_large_tensors_instead_of_faulting_them_in():
    """64 MiB is above glibc's largest dynamic mmap threshold (32 MiB): untuned, each allocation is a fresh mapping
    whose 16,384 pages fault in when touched; tuned, the freed block is reused from the heap."""
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert tune_cpu_allocator(True) is glibc
    if not glibc:
        return
    pages = (64 << 20) // resource.getpagesize()
    faults = _minor_faults_of_reallocating(64 << 20, times=8)  # untuned: 8 x pages (every page of every mapping)
    assert faults < 8 * pages // 2, f"{faults} minor faults for 8 reallocations of {pages} pages"
    assert tune_cpu_allocator(True) is True  # idempotent
