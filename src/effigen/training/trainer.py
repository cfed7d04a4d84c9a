"""The one Trainer: generic over an objective with `loss(model, batch, random) -> dict(loss=..., **logs)`.

AdamW with warm-up and a constant or cosine schedule, gradient clipping and accumulation, an EMA of the
weights, autocast (bf16 on CPU and GPU; fp16 with a gradient scaler on GPU), optional `torch.compile`,
DDP or FSDP under torchrun, atomic keep-last-N checkpoints with an exact resume, a progress bar, a JSONL
metrics file, optional TensorBoard, and sample grids every N steps.

Exact resume: the data order is a function of the step (`StepBatchSampler`) and every random draw of the
objective is a function of (seed, step, micro-step) (`effigen.rng.BatchRandom`), so a checkpoint only
needs the weights, the EMA, the optimizer and scheduler states, the step and the training clock; training
10 steps equals training 5, stopping, and resuming for 5, bit for bit on CPU.

Learning-rate clock: `schedule_clock="steps"` runs the cosine over `max_steps`; `schedule_clock="time"` runs it
over the `max_minutes` budget (elapsed training seconds, counted across resumes and stored in the checkpoint),
so that runs compared at an equal time budget each end exactly at the floor. Warm-up is in steps either way.

The run folder: the main process holds an exclusive lock on `output_dir` while training (a second run into
it fails at once), checks that it can write there before the first step, removes the leftovers of interrupted
atomic writes, trims `metrics.jsonl` to the resumed step, never writes a checkpoint whose weights hold NaN or
inf, and turns a failed checkpoint write (a full disk) into an error naming the last good checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..config import ConfigError
from ..io import (
    CheckpointError, CheckpointWriteError, DirectoryLock, NonFiniteWeightsError, OutputDirectoryError,
    atomic_write_text, check_finite, check_writable_dir, clean_stale_temporaries, describe_os_error,
    load_state_dict_strict, load_torch_file, load_weights, non_finite_keys, read_json, save_weights,
)
from ..rng import BatchRandom
from .distributed import (
    DistributedContext, StepBatchSampler, all_processes_ok, all_reduce_mean, init_distributed, main_process_value,
)


@dataclass
class TrainerConfig:
    output_dir: str = "runs/experiment"
    max_steps: int = 1000
    max_minutes: float | None = None  # stop early (and checkpoint) once this much training time is spent
    # what max_minutes (and the "time" schedule) count: "wall" seconds, or "cpu" seconds of this process
    # (time.process_time, all its threads): with a fixed thread count, equal CPU budgets are equal work on a machine
    # whose cores are shared with other jobs, where equal wall time is not (effigen report uses it)
    budget_clock: Literal["wall", "cpu"] = "wall"
    batch_size: int = 64  # global batch per optimizer step (all processes x accumulation)
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_learning_rate_ratio: float = 0.0  # cosine decays to learning_rate * this
    # "steps": the cosine spans max_steps; "time": it spans the max_minutes budget of training time (warm-up stays
    # in steps), so a run stopped by its time budget ends exactly at the floor; the clock survives resumes
    schedule_clock: Literal["steps", "time"] = "steps"
    grad_clip: float | None = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay = min(ema_decay, (1 + step) / (10 + step)): useful EMA on short runs
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    compile: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    sample_every: int = 0  # 0 disables intermediate grids
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest checkpoint in output_dir if there is one
    tensorboard: bool = False
    progress: bool = True


def learning_rate_factor(step: int, config: TrainerConfig, seconds: float | None = None,
                         warmup_seconds: float = 0.0) -> float:
    """Multiplier of the base learning rate at `step` (0-based): linear warm-up, then constant or cosine.

    With `config.schedule_clock == "time"` the cosine's progress is the training time spent after warm-up,
    `(seconds - warmup_seconds) / (60 * max_minutes - warmup_seconds)`: `seconds` is the training time elapsed
    when the step starts and `warmup_seconds` the time at which warm-up ended."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    if config.schedule_clock == "time":
        if seconds is None or config.max_minutes is None:
            raise ValueError("schedule_clock='time' needs the elapsed training seconds and trainer.max_minutes")
        span = 60.0 * config.max_minutes - warmup_seconds
        progress = 1.0 if span <= 0 else min(1.0, max(0.0, (seconds - warmup_seconds) / span))
    else:
        decay_steps = max(1, config.max_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.min_learning_rate_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a network's parameters (buffers are copied)."""

    def __init__(self, network: nn.Module, decay: float, warmup: bool):
        self.network = copy.deepcopy(network).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, network: nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        ema_params = list(self.network.parameters())
        params = [p.detach() for p in network.parameters()]
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        for ema_buffer, buffer in zip(self.network.buffers(), network.buffers()):
            ema_buffer.copy_(buffer)


def _full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A full, unsharded CPU state dict (gathers FSDP shards; a plain copy otherwise)."""
    from torch.distributed.tensor import DTensor

    state = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        state[key] = value.detach().cpu()
    return state


def _load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = module.state_dict()
    if not any(isinstance(v, DTensor) for v in own.values()):
        load_state_dict_strict(module, state, source)
        return
    # FSDP: check against the full shapes, then scatter each tensor to the parameter's placement.
    shapes = {k: tuple(v.shape) for k, v in own.items()}
    bad = [k for k in shapes if k not in state or tuple(state[k].shape) != shapes[k]] + [k for k in state if k not in shapes]
    if bad:
        raise CheckpointError(f"{source} does not match the network: keys {bad[:8]}")
    check_finite(state, source)
    with torch.no_grad():
        for key, value in own.items():
            if isinstance(value, DTensor):
                value.copy_(distribute_tensor(state[key].to(value.dtype), value.device_mesh, value.placements))
            else:
                value.copy_(state[key])


def _tensors_of(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors in nested dicts/lists (an optimizer state), keyed by their path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(_tensors_of(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir/checkpoints`, oldest first (temporary folders are ignored)."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


class Trainer:
    """Train `network` with `objective` on `dataset`.

    save_folder(path, ema_state_dict, extra_writer) writes a complete (pipeline) folder atomically; the
    trainer adds its `train_state/` through `extra_writer`. sample_fn(ema_network, step) -> path of a grid.
    """

    def __init__(
        self,
        config: TrainerConfig,
        network: nn.Module,
        objective: Any,
        dataset: Dataset,
        save_folder: Callable[[Path, dict, Callable[[Path], None]], None],
        sample_fn: Callable[[nn.Module, int], Path] | None = None,
        horizontal_flip: bool = False,
        context: DistributedContext | None = None,
        run_config: dict | None = None,
        component: str = "generator",
        clock: Callable[[], float] | None = None,
    ):
        if config.schedule_clock == "time" and config.max_minutes is None:
            raise ConfigError("trainer.schedule_clock=time runs the learning-rate schedule over the time budget, and "
                              "trainer.max_minutes is not set: set --trainer.max_minutes or use schedule_clock=steps")
        if config.max_minutes is not None and not config.max_minutes > 0:
            raise ConfigError(f"trainer.max_minutes={config.max_minutes} must be a positive number of minutes (or null)")
        self.config = config
        # the budget's clock, injectable: tests drive the time schedule with a fake clock; logs keep wall time
        self.clock = clock or (time.process_time if config.budget_clock == "cpu" else time.perf_counter)
        self.wall_clock = clock or time.perf_counter
        self.context = context or init_distributed(config.device)
        self.device = self.context.device
        self.objective = objective
        self.dataset = dataset
        self.save_folder = save_folder
        self.sample_fn = sample_fn
        self.horizontal_flip = horizontal_flip
        self.run_config = run_config or {}
        self.output_dir = Path(config.output_dir)
        self.component = component  # the folder of the saved (EMA) network inside a checkpoint
        world, accumulation = self.context.world_size, config.grad_accumulation
        if config.batch_size % (world * accumulation):
            raise ValueError(
                f"trainer.batch_size={config.batch_size} is not divisible by processes x grad_accumulation "
                f"= {world} x {accumulation}; choose a multiple of {world * accumulation}"
            )
        self.local_batch_size = config.batch_size // (world * accumulation)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("trainer.precision=fp16 needs a GPU (fp16 has no fast path on CPU); use bf16 or fp32")

        torch.manual_seed(config.seed)
        self.network = network.to(self.device)
        self.ema = EMA(self.network, config.ema_decay, config.ema_warmup)
        self.model = self._wrap(self.network)
        # Objectives may own trainable modules that are not part of the saved network (a GAN discriminator):
        # optimised and checkpointed (train_state/auxiliary.safetensors) with it, wrapped in DDP like it.
        self.auxiliary = objective.trainable_modules() if hasattr(objective, "trainable_modules") else None
        if self.auxiliary is not None:
            self.auxiliary.to(self.device)
            wrapped = self.auxiliary
            if self.context.enabled:
                from torch.nn.parallel import DistributedDataParallel

                device_ids = [self.device.index] if self.device.type == "cuda" else None
                wrapped = DistributedDataParallel(self.auxiliary, device_ids=device_ids)
            objective.bind_trainable(wrapped)
        decay, no_decay = [], []
        for param in self._trainable_parameters():
            if param.requires_grad:
                (decay if param.dim() >= 2 else no_decay).append(param)
        # On CPU torch's default AdamW is its per-tensor for-loop (~10 passes over every parameter); the fused kernel
        # makes one (3x faster on a 48 M-parameter model, one core). Not under FSDP (DTensor parameters) nor on GPUs,
        # where torch's default (foreach) stays.
        self._fused_adamw = self.device.type == "cpu" and not (self.context.enabled and config.parallel == "fsdp")
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate,
            betas=config.betas,
            fused=self._fused_adamw or None,
        )
        self.step = 0
        self.images_seen = 0
        self.train_seconds = 0.0  # training time elapsed at self.step, over every run (resumes continue it)
        self.warmup_seconds = 0.0  # training time at which warm-up ended (schedule_clock="time")
        self._clock_origin: float | None = None  # clock() - train_seconds while train() runs
        # a lambda (not a bound method): LambdaLR's state dict then stays the plain {last_epoch, base_lrs, ...}
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step, config, self.train_seconds, self.warmup_seconds))
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")

    # ------------------------------------------------------------------ set-up
    def _trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.network.parameters())
        if self.auxiliary is not None:
            params += list(self.auxiliary.parameters())
        return params

    def _wrap(self, network: nn.Module) -> nn.Module:
        model = network
        if self.context.enabled:
            if self.config.parallel == "fsdp":
                from torch.distributed.fsdp import fully_shard

                for module in (network, self.ema.network):
                    for block in getattr(module, "blocks", []):
                        fully_shard(block)
                    fully_shard(module)
                model = network
            else:
                from torch.nn.parallel import DistributedDataParallel

                device_ids = [self.device.index] if self.device.type == "cuda" else None
                model = DistributedDataParallel(network, device_ids=device_ids)
        if self.config.compile:
            model = torch.compile(model)
        return model

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    # ------------------------------------------------------------------ checkpoints
    def _gather_train_state(self) -> dict[str, Any]:
        """The network and optimizer states as full CPU copies: collectives under FSDP, so every process calls this
        before the main process writes anything (a failed write then cannot leave the others in a gather)."""
        network_state = _full_state_dict(self.network)
        if self.context.enabled and self.config.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optimizer_state = get_optimizer_state_dict(
                self.network, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            optimizer_state = self.optimizer.state_dict()
        auxiliary_state = None
        if self.auxiliary is not None:
            auxiliary_state = {k: v.detach().cpu() for k, v in self.auxiliary.state_dict().items()}
        return {"network": network_state, "optimizer": optimizer_state, "auxiliary": auxiliary_state}

    def _write_train_state(self, folder: Path, gathered: dict[str, Any]) -> None:
        state_folder = folder / "train_state"
        state_folder.mkdir()
        save_weights(gathered["network"], state_folder / "model.safetensors")
        if gathered["auxiliary"] is not None:
            save_weights(gathered["auxiliary"], state_folder / "auxiliary.safetensors")
        torch.save(
            {"optimizer": gathered["optimizer"], "scheduler": self.scheduler.state_dict(),
             "scaler": self.scaler.state_dict(), "torch_rng": torch.get_rng_state()},
            state_folder / "optimizer.pt",
        )
        (state_folder / "state.json").write_text(
            json.dumps({"step": self.step, "images_seen": self.images_seen, "world_size": self.context.world_size,
                        "batch_size": self.config.batch_size, "seed": self.config.seed,
                        "schedule_clock": self.config.schedule_clock, "train_seconds": self.train_seconds,
                        "warmup_seconds": self.warmup_seconds}, indent=2)
        )

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights as a full CPU state dict (a collective under FSDP: call it on every process)."""
        return _full_state_dict(self.ema.network)

    def ema_network_for_sampling(self) -> nn.Module:
        """The EMA network as a plain module that one process can run alone (unsharded under FSDP)."""
        if not (self.context.enabled and self.config.parallel == "fsdp"):
            return self.ema.network
        state = self.ema_state_dict()
        network = type(self.network)(self.network.config).to(self.device).eval()
        network.load_state_dict(state)
        return network

    def _last_checkpoint_note(self) -> str:
        checkpoints = list_checkpoints(self.output_dir)
        if not checkpoints:
            return "no checkpoint of this run was written yet"
        return f"the last good checkpoint is {checkpoints[-1]}"

    def check_finite_weights(self, ema_state: dict[str, torch.Tensor] | None = None,
                             gathered: dict[str, Any] | None = None, writing: str | Path = "a checkpoint") -> None:
        """Raise NonFiniteWeightsError (on every process) if the network, its EMA or the objective's trainable
        modules hold NaN or inf, before `writing` is written. Call it on every process."""
        network_state = gathered["network"] if gathered is not None else self.network.state_dict()
        auxiliary_state = gathered["auxiliary"] if gathered is not None else (
            self.auxiliary.state_dict() if self.auxiliary is not None else None)
        ema_state = ema_state if ema_state is not None else self.ema.network.state_dict()
        bad = [f"network {k}" for k in non_finite_keys(network_state)]
        bad += [f"EMA {k}" for k in non_finite_keys(ema_state)]
        if auxiliary_state is not None:
            bad += [f"auxiliary {k}" for k in non_finite_keys(auxiliary_state)]
        if all_processes_ok(not bad, self.device):
            return
        where = f" ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})" if bad else " (on another process)"
        raise NonFiniteWeightsError(
            f"at step {self.step} the weights hold NaN or inf{where}, so {writing} was not written and "
            f"{self._last_checkpoint_note()}. Training diverged: start a new trainer.output_dir with a lower "
            "trainer.learning_rate, trainer.grad_clip set, or trainer.precision=fp32"
        )

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step_N atomically (every process calls it; the main process writes). Refuses weights
        with NaN/inf; a failed write raises CheckpointWriteError naming the cause and the last good checkpoint."""
        folder = self.output_dir / "checkpoints" / f"step_{self.step:07d}"
        ema_state = self.ema_state_dict()
        gathered = self._gather_train_state()
        self.check_finite_weights(ema_state, gathered, folder)
        error: BaseException | None = None
        if self.context.is_main:
            try:
                self.save_folder(folder, ema_state, lambda path: self._write_train_state(path, gathered))
                atomic_write_text(self.output_dir / "checkpoints" / "latest", folder.name + "\n")
                for old in list_checkpoints(self.output_dir)[: -self.config.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
            except Exception as e:  # noqa: BLE001 - shared with the other processes below, then raised
                error = e
        if all_processes_ok(error is None, self.device):  # also the barrier after the write
            return folder
        if error is not None and not isinstance(error, OSError):
            raise error
        cause = describe_os_error(error) if error is not None else "the main process failed to write it (see its error)"
        raise CheckpointWriteError(
            f"could not write checkpoint {folder} at step {self.step}: {cause}; {self._last_checkpoint_note()}. "
            f"Fix {self.output_dir / 'checkpoints'} and run the same command again to continue from there"
        ) from error

    def load_checkpoint(self, folder: Path) -> None:
        """Restore weights, EMA, optimizer, scheduler, step and training clock from a trainer checkpoint folder."""
        folder = Path(folder)
        state_folder = folder / "train_state"
        state_file = state_folder / "state.json"
        if not state_file.is_file():
            raise CheckpointError(f"{folder} has no train_state/state.json: it is not a trainer checkpoint or it is incomplete")
        try:
            info = read_json(state_file)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; delete {folder} to resume from the checkpoint before it") from None
        if not (isinstance(info, dict) and isinstance(info.get("step"), int) and isinstance(info.get("images_seen"), int)):
            raise CheckpointError(f"{state_file} is corrupt: it does not record the step and images_seen of the "
                                  f"checkpoint; delete {folder} to resume from the one before it")
        if info.get("batch_size") != self.config.batch_size:
            raise CheckpointError(
                f"{folder} was trained with batch_size={info.get('batch_size')}, this run has {self.config.batch_size}: "
                "an exact resume needs the same global batch (or start a new output_dir)"
            )
        if self.config.schedule_clock == "time" and info.get("schedule_clock", "steps") != "time":
            raise CheckpointError(
                f"{folder} was trained with trainer.schedule_clock=steps and this run asks for time: its learning-rate "
                "schedule cannot switch clocks mid-run; resume with schedule_clock=steps or start a new output_dir"
            )
        weights = state_folder / "model.safetensors"
        _load_full_state_dict(self.network, load_weights(weights), str(weights))
        ema_weights = folder / self.component / "model.safetensors"
        _load_full_state_dict(self.ema.network, load_weights(ema_weights), str(ema_weights))
        if self.auxiliary is not None:
            load_state_dict_strict(self.auxiliary, load_weights(state_folder / "auxiliary.safetensors"),
                                   str(state_folder / "auxiliary.safetensors"))
        saved = load_torch_file(state_folder / "optimizer.pt")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{state_folder / 'optimizer.pt'} is corrupt: it does not hold the optimizer state")
        try:
            check_finite(_tensors_of(saved["optimizer"]["state"]), str(state_folder / "optimizer.pt"))
            if self.context.enabled and self.config.parallel == "fsdp":
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(self.network, self.optimizer, saved["optimizer"],
                                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
            else:
                self.optimizer.load_state_dict(saved["optimizer"])
                if self._fused_adamw:  # the saved groups carry the writer's kernel choice
                    for group in self.optimizer.param_groups:
                        group["fused"], group["foreach"] = True, False
            self.scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{state_folder / 'optimizer.pt'} does not match this model/optimizer: {e}") from e
        if not isinstance(saved.get("torch_rng"), torch.Tensor):
            raise CheckpointError(f"{state_folder / 'optimizer.pt'} is corrupt: it holds no random-number state")
        torch.set_rng_state(saved["torch_rng"])
        self.step = int(info["step"])
        self.images_seen = int(info["images_seen"])
        self.train_seconds = float(info.get("train_seconds", 0.0))  # older checkpoints: no clock (steps schedule)
        self.warmup_seconds = float(info.get("warmup_seconds", 0.0))

    def maybe_resume(self) -> Path | None:
        checkpoints = list_checkpoints(self.output_dir)
        if not self.config.resume or not checkpoints:
            return None
        self.load_checkpoint(checkpoints[-1])
        return checkpoints[-1]

    # ------------------------------------------------------------------ loop
    def _loader(self):
        sampler = StepBatchSampler(
            len(self.dataset), self.local_batch_size, self.context.rank, self.context.world_size, self.config.seed,
            start_micro_batch=self.step * self.config.grad_accumulation,
        )
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.config.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=self.config.num_workers > 0)
        return iter(loader)

    def _random(self, micro: int) -> BatchRandom:
        global_size = self.local_batch_size * self.context.world_size
        return BatchRandom(self.config.seed, self.step, micro, global_size, self.context.rank * self.local_batch_size,
                           self.local_batch_size, self.device)

    def train_step(self, batches) -> dict[str, float]:
        config = self.config
        self.model.train()
        logs: dict[str, torch.Tensor] = {}
        accumulation = config.grad_accumulation
        for micro in range(accumulation):
            images, labels = next(batches)
            random = self._random(micro)
            images = images.to(self.device, non_blocking=True)
            if getattr(self.dataset, "stores_flipped", False):  # latent caches: (latent, mirror's latent) pairs
                from ..data.latents import pick_views

                images = pick_views(images, (random.rand() < 0.5) if self.horizontal_flip else None)
            elif self.horizontal_flip:
                flip = (random.rand() < 0.5).view(-1, 1, 1, 1)
                images = torch.where(flip, images.flip(-1), images)
            batch = {"images": images, "labels": labels.to(self.device)}
            sync = micro == accumulation - 1
            context = self.model.no_sync() if (not sync and hasattr(self.model, "no_sync")) else _null_context()
            with context:
                with self._autocast():
                    out = self.objective.loss(self.model, batch, random)
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss.item()} at step {self.step}; lower trainer.learning_rate, enable "
                        "trainer.grad_clip, or use trainer.precision=fp32"
                    )
                self.scaler.scale(loss / accumulation).backward()
            for key, value in out.items():
                logs[key] = logs.get(key, 0) + value.detach().float() / accumulation
        self.scaler.unscale_(self.optimizer)
        if config.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable_parameters(), config.grad_clip)
            logs["grad_norm"] = grad_norm.detach().float().full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm.detach().float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self._clock_origin is not None:  # the training time at the end of this step sets the next step's rate
            self.train_seconds = self.clock() - self._clock_origin
            if config.schedule_clock == "time":  # the rate follows the main process's clock on every process
                self.train_seconds = main_process_value(self.train_seconds, self.device)
        if self.step + 1 == config.warmup_steps:
            self.warmup_seconds = self.train_seconds
        self.scheduler.step()
        self.step += 1
        if hasattr(self.objective, "after_step"):  # e.g. dead-code restarts of a VQ tokenizer
            for key, value in self.objective.after_step(self.network, self.step, config.seed).items():
                logs[key] = torch.tensor(float(value), device=self.device)
        self.ema.update(self.network, self.step - 1)
        self.images_seen += config.batch_size
        return logs

    # ------------------------------------------------------------------ run folder
    def _prepare_output_dir(self) -> DirectoryLock | None:
        """Main process: lock output_dir for this run, check that it and checkpoints/ can be written, and remove the
        leftovers of interrupted atomic writes. Every process learns whether that worked (and raises if not)."""
        lock, error = None, None
        if self.context.is_main:
            try:
                lock = DirectoryLock(self.output_dir).acquire()
                check_writable_dir(self.output_dir / "checkpoints", "checkpoint directory")
                cleaned = clean_stale_temporaries(self.output_dir / "checkpoints") + clean_stale_temporaries(self.output_dir)
                if cleaned:
                    print(f"cleaned up after an interrupted write in {self.output_dir}: " + "; ".join(cleaned))
            except Exception as e:  # noqa: BLE001 - shared with the other processes below, then raised
                error = e
        if all_processes_ok(error is None, self.device):
            return lock
        if lock is not None:
            lock.release()
        raise error or OutputDirectoryError(f"the main process could not prepare {self.output_dir} (see its error)")

    def _trim_metrics(self, path: Path) -> None:
        """Drop the records of steps after the one this run starts from (a resume replays them) and torn lines."""
        if not path.is_file():
            return
        keep, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)) or record["step"] > self.step:
                dropped += 1
                continue
            keep.append(line + "\n")
        if dropped:
            atomic_write_text(path, "".join(keep))

    # ------------------------------------------------------------------ train
    def train(self) -> dict[str, Any]:
        lock = self._prepare_output_dir()
        try:
            return self._train()
        finally:
            self._clock_origin = None
            if lock is not None:
                lock.release()

    def _train(self) -> dict[str, Any]:
        config, is_main = self.config, self.context.is_main
        resumed_from = self.maybe_resume()
        metrics_file = None
        if is_main:
            self._trim_metrics(self.output_dir / "metrics.jsonl")
            metrics_file = open(self.output_dir / "metrics.jsonl", "a")
        writer = None
        if config.tensorboard and is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("trainer.tensorboard=true needs the tensorboard package: pip install 'effigen[tensorboard]'") from e
            writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        if is_main and resumed_from is not None:
            print(f"resumed from {resumed_from} at step {self.step}")
        batches = self._loader()
        bar = tqdm(total=config.max_steps, initial=self.step, desc="training", unit="step",
                   disable=not (is_main and config.progress), dynamic_ncols=True)
        start_time = self.clock()
        wall_start = self.wall_clock()
        self._clock_origin = start_time - self.train_seconds
        start_step = self.step
        window_time, window_images = wall_start, 0
        last_checkpoint_step = self.step if resumed_from is not None else -1
        stopped_early = False
        logs: dict[str, Any] = {}
        try:
            while self.step < config.max_steps:
                if config.schedule_clock == "time" and self.train_seconds >= 60 * config.max_minutes:
                    stopped_early = True  # a resumed run whose budget is already spent
                    break
                logs = self.train_step(batches)
                window_images += config.batch_size
                if self.step % config.log_every == 0 or self.step == config.max_steps:
                    now = self.wall_clock()
                    values = {k: all_reduce_mean(v).item() for k, v in logs.items()}
                    record = {"step": self.step, "images_seen": self.images_seen, **values,
                              "learning_rate": self.scheduler.get_last_lr()[0],
                              "images_per_second": window_images / max(now - window_time, 1e-9),
                              "elapsed_seconds": now - wall_start, "train_seconds": self.train_seconds}
                    window_time, window_images = now, 0
                    if is_main:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        if writer is not None:
                            for key, value in record.items():
                                writer.add_scalar(f"train/{key}", value, self.step)
                        bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{record['images_per_second']:.0f}")
                bar.update(1)
                if self.sample_fn is not None and config.sample_every and self.step % config.sample_every == 0:
                    network = self.ema_network_for_sampling()  # a collective under FSDP
                    if is_main:
                        self.sample_fn(network, self.step)
                if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_checkpoint_step = self.step
                if config.max_minutes is not None:
                    # time clock: the budget counts every run's training time, the schedule reaching its floor at it;
                    # steps clock: the budget of this invocation
                    spent = self.train_seconds if config.schedule_clock == "time" else \
                        main_process_value(self.clock() - start_time, self.device)  # every process stops together
                    if spent >= 60 * config.max_minutes:
                        stopped_early = self.step < config.max_steps
                        if stopped_early:
                            break
        finally:
            bar.close()
            if metrics_file is not None:
                metrics_file.close()
        if last_checkpoint_step != self.step:
            self.save_checkpoint()
        elapsed = self.wall_clock() - wall_start
        checkpoints = list_checkpoints(self.output_dir)
        summary = {
            "steps": self.step, "steps_this_run": self.step - start_step, "images_seen": self.images_seen,
            "seconds": elapsed, "images_per_second": (self.step - start_step) * config.batch_size / max(elapsed, 1e-9),
            "train_seconds": self.train_seconds, "budget_clock": config.budget_clock,
            "budget_seconds_this_run": self.clock() - start_time,
            "stopped_early": stopped_early, "final_loss": float(logs["loss"]) if logs else None,
            "checkpoint": str(checkpoints[-1]) if checkpoints else None,
        }
        if is_main and writer is not None:
            writer.close()
        return summary


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
