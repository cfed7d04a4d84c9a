"""torchrun integration: process group set-up, device choice and the step-indexed batch sampler.

Multi-process training uses PyTorch's own engine only: `torchrun --nproc_per_node=N -m effigen train ...`
sets RANK / WORLD_SIZE / LOCAL_RANK, and we initialise the default process group (NCCL on GPUs, gloo
on CPU) and wrap the network in DDP or FSDP.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ..config import ConfigError


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was requested but CUDA is not available on this machine; use the CPU "
                          "(--device cpu, or --trainer.device=cpu for effigen train)")
    return device


def init_distributed(device_name: str = "auto") -> DistributedContext:
    """Initialise the process group when launched by torchrun; a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # Tear the group down before the interpreter exits: left to static destructors, gloo's threads can abort
        # the process after its work is done ("terminate called without an active exception", exit -6).
        atexit.register(_destroy_process_group)
    return DistributedContext(rank, world_size, local_rank, device)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def all_processes_ok(ok: bool, device: torch.device | str = "cpu") -> bool:
    """True when `ok` holds on every process (a collective: every process must call it; `ok` itself alone).

    Lets one process's failure (a write only the main process does, a non-finite shard) stop every process
    together instead of leaving the others waiting in the next collective."""
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return ok


def main_process_value(value: float, device: torch.device | str = "cpu") -> float:
    """The main process's `value` on every process (a collective). Decisions made from each process's own clock
    (a time budget, a time-based learning rate) must be the same everywhere, or the processes diverge or hang."""
    if dist.is_available() and dist.is_initialized():
        shared = torch.tensor([value], dtype=torch.float64, device=device)
        dist.broadcast(shared, src=0)
        return float(shared.item())
    return value


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class StepBatchSampler(Sampler[list[int]]):
    """Yields this process's indices for micro-batch after micro-batch, from `start_micro_batch` on.

    The data is an endless stream of epochs, each a permutation seeded by (seed, epoch). Micro-batch m
    covers stream positions [m * G, (m + 1) * G) with G = world_size * local_batch_size, and process r
    takes the contiguous slice [r * B, (r + 1) * B) of it. So the global batch is the same for any number
    of processes, and resuming at step s only needs s (no sampler state to save).
    """

    def __init__(self, dataset_size: int, local_batch_size: int, rank: int, world_size: int, seed: int, start_micro_batch: int = 0):
        if dataset_size <= 0:
            raise ValueError("the dataset is empty")
        self.dataset_size = dataset_size
        self.local_batch_size = local_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_micro_batch = start_micro_batch
        self._epoch = -1
        self._permutation: list[int] = []

    def _index_at(self, position: int) -> int:
        epoch, within = divmod(position, self.dataset_size)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            # a plain list: per-index tensor ops are slow when threads contend for the cores
            self._permutation = torch.randperm(self.dataset_size, generator=generator).tolist()
            self._epoch = epoch
        return self._permutation[within]

    def __iter__(self):
        micro = self.start_micro_batch
        global_size = self.world_size * self.local_batch_size
        while True:
            first = micro * global_size + self.rank * self.local_batch_size
            yield [self._index_at(p) for p in range(first, first + self.local_batch_size)]
            micro += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for its own bookkeeping
        return 2**62
