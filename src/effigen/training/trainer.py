"""The one Trainer: generic over an objective with `loss(model, batch, random) -> dict(loss=..., **logs)`.

AdamW with warm-up and a constant or cosine schedule, gradient clipping and accumulation, an EMA of the
weights, autocast (bf16 on CPU and GPU; fp16 with a gradient scaler on GPU), optional `torch.compile`,
DDP or FSDP under torchrun, atomic keep-last-N checkpoints with an exact resume, a progress bar, a JSONL
metrics file, optional TensorBoard, and sample grids every N steps.

Exact resume: the data order is a function of the step (`StepBatchSampler`) and every random draw of the
objective is a function of (seed, step, micro-step) (`effigen.rng.BatchRandom`), so a checkpoint only
needs the weights, the EMA, the optimizer and scheduler states and the step; training 10 steps equals
training 5, stopping, and resuming for 5, bit for bit on CPU.
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

from ..io import CheckpointError, atomic_write_text, load_state_dict_strict, load_torch_file, load_weights, save_weights
from ..rng import BatchRandom
from .distributed import DistributedContext, StepBatchSampler, all_reduce_mean, barrier, init_distributed


@dataclass
class TrainerConfig:
    output_dir: str = "runs/experiment"
    max_steps: int = 1000
    max_minutes: float | None = None  # stop early (and checkpoint) once this wall time is spent
    batch_size: int = 64  # global batch per optimizer step (all processes x accumulation)
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_learning_rate_ratio: float = 0.0  # cosine decays to learning_rate * this
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


def learning_rate_factor(step: int, config: TrainerConfig) -> float:
    """Multiplier of the base learning rate at `step` (0-based): linear warm-up, then constant or cosine."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
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
    with torch.no_grad():
        for key, value in own.items():
            if isinstance(value, DTensor):
                value.copy_(distribute_tensor(state[key].to(value.dtype), value.device_mesh, value.placements))
            else:
                value.copy_(state[key])


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
    ):
        self.config = config
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
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate,
            betas=config.betas,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: learning_rate_factor(step, config))
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
        self.step = 0
        self.images_seen = 0

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
    def _write_train_state(self, folder: Path) -> None:
        state_folder = folder / "train_state"
        state_folder.mkdir()
        network_state = _full_state_dict(self.network)
        if self.context.is_main:
            save_weights(network_state, state_folder / "model.safetensors")
            if self.auxiliary is not None:
                save_weights({k: v.detach().cpu() for k, v in self.auxiliary.state_dict().items()},
                             state_folder / "auxiliary.safetensors")
        if self.context.enabled and self.config.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optimizer_state = get_optimizer_state_dict(
                self.network, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            optimizer_state = self.optimizer.state_dict()
        if self.context.is_main:
            torch.save(
                {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "torch_rng": torch.get_rng_state()},
                state_folder / "optimizer.pt",
            )
            (state_folder / "state.json").write_text(
                json.dumps({"step": self.step, "images_seen": self.images_seen, "world_size": self.context.world_size,
                            "batch_size": self.config.batch_size, "seed": self.config.seed}, indent=2)
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

    def save_checkpoint(self) -> Path:
        folder = self.output_dir / "checkpoints" / f"step_{self.step:07d}"
        ema_state = self.ema_state_dict()
        if self.context.is_main:
            self.save_folder(folder, ema_state, self._write_train_state)
            atomic_write_text(self.output_dir / "checkpoints" / "latest", folder.name + "\n")
            for old in list_checkpoints(self.output_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        else:
            # Other ranks take part in the collective gathers of FSDP and write nothing.
            self._write_train_state_collectives_only()
        barrier()
        return folder

    def _write_train_state_collectives_only(self) -> None:
        _full_state_dict(self.network)
        if self.context.enabled and self.config.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            get_optimizer_state_dict(self.network, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_checkpoint(self, folder: Path) -> None:
        """Restore weights, EMA, optimizer, scheduler and step from a trainer checkpoint folder."""
        folder = Path(folder)
        state_folder = folder / "train_state"
        if not (state_folder / "state.json").is_file():
            raise CheckpointError(f"{folder} has no train_state/state.json: it is not a trainer checkpoint or it is incomplete")
        info = json.loads((state_folder / "state.json").read_text())
        if info.get("batch_size") != self.config.batch_size:
            raise CheckpointError(
                f"{folder} was trained with batch_size={info.get('batch_size')}, this run has {self.config.batch_size}: "
                "an exact resume needs the same global batch (or start a new output_dir)"
            )
        _load_full_state_dict(self.network, load_weights(state_folder / "model.safetensors"), str(state_folder / "model.safetensors"))
        ema_folder = folder / self.component
        _load_full_state_dict(self.ema.network, load_weights(ema_folder / "model.safetensors"), str(ema_folder))
        if self.auxiliary is not None:
            load_state_dict_strict(self.auxiliary, load_weights(state_folder / "auxiliary.safetensors"),
                                   str(state_folder / "auxiliary.safetensors"))
        saved = load_torch_file(state_folder / "optimizer.pt")
        try:
            if self.context.enabled and self.config.parallel == "fsdp":
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(self.network, self.optimizer, saved["optimizer"],
                                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
            else:
                self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{state_folder / 'optimizer.pt'} does not match this model/optimizer: {e}") from e
        torch.set_rng_state(saved["torch_rng"])
        self.step = int(info["step"])
        self.images_seen = int(info["images_seen"])

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
        self.scheduler.step()
        self.step += 1
        if hasattr(self.objective, "after_step"):  # e.g. dead-code restarts of a VQ tokenizer
            for key, value in self.objective.after_step(self.network, self.step, config.seed).items():
                logs[key] = torch.tensor(float(value), device=self.device)
        self.ema.update(self.network, self.step - 1)
        self.images_seen += config.batch_size
        return logs

    def train(self) -> dict[str, Any]:
        config, is_main = self.config, self.context.is_main
        resumed_from = self.maybe_resume()
        if is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = open(self.output_dir / "metrics.jsonl", "a") if is_main else None
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
        start_time = time.perf_counter()
        start_step = self.step
        window_time, window_images = time.perf_counter(), 0
        last_checkpoint_step = self.step if resumed_from is not None else -1
        stopped_early = False
        logs: dict[str, Any] = {}
        try:
            while self.step < config.max_steps:
                logs = self.train_step(batches)
                window_images += config.batch_size
                if self.step % config.log_every == 0 or self.step == config.max_steps:
                    now = time.perf_counter()
                    values = {k: all_reduce_mean(v).item() for k, v in logs.items()}
                    record = {"step": self.step, "images_seen": self.images_seen, **values,
                              "learning_rate": self.scheduler.get_last_lr()[0],
                              "images_per_second": window_images / max(now - window_time, 1e-9),
                              "elapsed_seconds": now - start_time}
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
                if config.max_minutes is not None and time.perf_counter() - start_time > 60 * config.max_minutes:
                    stopped_early = True
                    break
        finally:
            bar.close()
        if last_checkpoint_step != self.step:
            self.save_checkpoint()
        elapsed = time.perf_counter() - start_time
        summary = {
            "steps": self.step, "steps_this_run": self.step - start_step, "images_seen": self.images_seen,
            "seconds": elapsed, "images_per_second": (self.step - start_step) * config.batch_size / max(elapsed, 1e-9),
            "stopped_early": stopped_early, "final_loss": float(logs["loss"]) if logs else None,
            "checkpoint": str(list_checkpoints(self.output_dir)[-1]) if list_checkpoints(self.output_dir) else None,
        }
        if is_main:
            metrics_file.close()
            if writer is not None:
                writer.close()
        return summary


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
