"""Randomness that does not depend on how a global batch is split across processes.

The trainer hands each micro-batch a `BatchRandom` keyed by (seed, step, micro_step). Every draw is
made for the whole global batch from a generator seeded by that key and the draw's index, and each
process keeps its own slice. So noise, timesteps and label dropout of sample i are the same whether
one process or eight compute the batch (DDP equals single-process), and a resumed run redraws exactly
what an uninterrupted run drew (exact resume), with no RNG state to carry.
"""

from __future__ import annotations

import torch


class BatchRandom:
    def __init__(
        self,
        seed: int,
        step: int,
        micro_step: int = 0,
        global_size: int | None = None,
        offset: int = 0,
        local_size: int | None = None,
        device: torch.device | str = "cpu",
    ):
        if local_size is None:
            raise ValueError("local_size is required")
        self.key = (int(seed), int(step), int(micro_step))
        self.global_size = global_size if global_size is not None else local_size
        self.offset = offset
        self.local_size = local_size
        self.device = torch.device(device)
        self._draws = 0

    @classmethod
    def local(cls, seed: int, batch_size: int, device="cpu") -> "BatchRandom":
        """For single-process use outside the trainer (tests, scripts)."""
        return cls(seed, 0, 0, batch_size, 0, batch_size, device)

    def _generator(self) -> torch.Generator:
        seed, step, micro = self.key
        # A simple injective-enough mix of the key into 63 bits.
        mixed = (seed * 1_000_003 + step) * 1_000_033 + micro * 1009 + self._draws
        self._draws += 1
        return torch.Generator().manual_seed(mixed % (2**63 - 1))

    def _slice(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.offset : self.offset + self.local_size].to(self.device)

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal, (local_size, *shape)."""
        return self._slice(torch.randn(self.global_size, *shape, generator=self._generator()))

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform [0, 1), (local_size, *shape)."""
        return self._slice(torch.rand(self.global_size, *shape, generator=self._generator()))

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return self._slice(torch.randint(high, (self.global_size, *shape), generator=self._generator()))

    def shared_rand(self, *shape: int) -> torch.Tensor:
        """Uniform [0, 1) of `shape`, the same on every process: batch-wide decisions (DetailFlow's prefix length)."""
        return torch.rand(*shape, generator=self._generator()).to(self.device)
