"""EfficientDM: low-bit quantization-aware fine-tuning of a trained diffusion model without training data (He, Liu,
Wu, Zhou, Zhuang; ICLR 2024, arXiv 2310.03270; code ThisisBillhe/EfficientDM for LDM-4 ImageNet), for any effigen
diffusion or flow pipeline folder (DiT, SiT, LightningDiT, DiCo; pixel or latent space).

What the paper does. Post-training quantization (PTQ) of a diffusion model to 4-bit weights and activations loses
much quality; quantization-aware training (QAT) recovers it but needs data and long training. EfficientDM fine-tunes
only LoRA adapters and the quantizers' step sizes, with the full-precision (FP) model as the teacher on its own
sampling trajectories (no data):

- QALoRA: W = quantize(deq(W_int) + B A) at every forward, so after training the LoRA update merges into the
  low-bit weights (QLoRA keeps B A in float; here the deployed model is fully low-bit).
- Data-free distillation: run the FP model's sampler (its guidance included); at every sampling step feed the same
  x_t to the FP and the quantized model, take the MSE between their outputs, and make one optimizer update; the
  trajectory continues with the FP prediction.
- Scale-aware LoRA optimisation: each layer's LoRA learning rate is mean(weight step size) / 2500, so that updates
  are not rounded away in layers with coarse weight steps; weight step sizes learn at 1e-6, activation step sizes
  and zero points at 5e-4 (AdamW, linear decay, no warm-up).
- Temporal activation LSQ (TALSQ): one activation step size and zero point per sampling step, initialised from one
  calibrated value and learned per step.
- First and last layers at 8 bits.

What this module follows and what it chose:

1. Calibration: the folder's saved sampler (guidance included) is run on `calib_images` class-balanced labels with a
   fixed seed; every nn.Linear / nn.Conv2d input is subsampled per sampling step. Weights: per output channel,
   MSE-searched clipping. Activations: per tensor, MSE-searched clipping over all steps together, copied to every
   step ("shared", the official initialisation), or searched per step ("per_step", our option). The time grid is
   the set of t values the sampler passed; the sampler's t selects the row at sampling time
   (models/quantized.py: explicit, with interpolation between grid points for other step counts).
2. `mode="ptq"`: the calibrated model as it is (the baseline). `mode="efficientdm"`: QALoRA + TALSQ fine-tuning as
   above, `epochs` trajectories of `batch_size` random labels, one update per network call of the sampler (a
   guided call evaluates the conditional and unconditional halves in one batch; the loss matches both halves'
   raw outputs, which implies matching the guided combination the paper uses, and is defined outside the guidance
   interval too). Loss: mean squared error over all output channels (the official sums; under Adam only the
   epsilon scale differs). LoRA rank 32 by default (clipped to the layer's size), A Kaiming-uniform, B zero,
   AdamW without weight decay.
3. The result is a pipeline folder of the same method whose generator is a `QuantizedNetwork` (packed integer
   weights, step sizes, per-step activation tables): `effigen sample`, `eval`, `bench` and `report` use it like any
   folder. Linear layers run as integer GEMMs (`torch._int_mm`) at inference; convolutions (DiT's patch
   embedding, DiCo's layers) run simulated (dequantized weights in float).

    from effigen.post.quantize import QuantizeSettings, quantize
    quantize("runs/mnist-dit/final", "runs/mnist-dit-w4a8", QuantizeSettings(bits="w4a8", mode="efficientdm"))
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import ConfigError, config_to_dict
from ..models.quantized import POLICIES, QuantizedNetwork, boundary_layers, quantizable_layers
from ..nn.quant import mse_activation_params
from ..pipeline import Pipeline

_BITS = re.compile(r"^w(\d+)a(\d+)$")


@dataclass
class QuantizeSettings:
    bits: str = "w4a8"  # wNaM: N-bit weights (2, 4, 8), M-bit activations (4 ... 16)
    mode: str = "efficientdm"  # "ptq" (calibration only) or "efficientdm" (QALoRA + TALSQ distillation)
    boundary_bits: int = 8  # first and last layer: W and A bits (EfficientDM: 8)
    calib_images: int = 64
    calib_batch: int = 32
    calib_values: int = 4096  # activation values kept per layer and sampling step for the MSE search
    act_init: str = "shared"  # "shared" (one calibrated step for all timesteps, as the paper) or "per_step"
    timestep_policy: str = "interpolate"  # models/quantized.py: interpolate | nearest | strict
    epochs: int = 32  # sampling trajectories of the FP model; one update per network call on each
    batch_size: int = 8  # labels per trajectory (the official script: 2)
    lora_rank: int = 32
    # LoRA lr = lora_lr_scale * mean(weight step) / 2500 per layer. The paper's is 1; at effigen's MNIST sizes and 8
    # trajectories that leaves LoRA where it started and 1000 diverges, 100 halves the distillation loss (docs/quantize.md)
    lora_lr_scale: float = 100.0
    weight_step_lr: float = 1e-6
    act_lr: float = 5e-4
    seed: int = 0

    def __post_init__(self):
        self.w_bits, self.a_bits = parse_bits(self.bits)
        if self.mode not in ("ptq", "efficientdm"):
            raise ConfigError(f"mode must be 'ptq' or 'efficientdm', got {self.mode!r}")
        if self.act_init not in ("shared", "per_step"):
            raise ConfigError(f"act_init must be 'shared' or 'per_step', got {self.act_init!r}")
        if self.timestep_policy not in POLICIES:
            raise ConfigError(f"timestep_policy must be one of {', '.join(POLICIES)}, got {self.timestep_policy!r}")
        for name in ("calib_images", "calib_batch", "calib_values", "batch_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if self.boundary_bits not in (2, 4, 8):
            raise ConfigError(f"boundary_bits must be 2, 4 or 8, got {self.boundary_bits}")


def parse_bits(text: str) -> tuple[int, int]:
    m = _BITS.match(str(text).lower())
    if not m:
        raise ConfigError(f"bits must look like w4a8 (weight bits, activation bits), got {text!r}")
    w, a = int(m.group(1)), int(m.group(2))
    if w not in (2, 4, 8):
        raise ConfigError(f"weight bits must be 2, 4 or 8 (packed {8 // 4} or more per byte), got {w} in {text!r}")
    if not 4 <= a <= 16:
        raise ConfigError(f"activation bits must be in 4 ... 16, got {a} in {text!r}")
    return w, a


# ------------------------------------------------------------------------------------------------ calibration
class _Recorder(nn.Module):
    """Stands in for the FP network inside the sampler: records each call's t and, through forward pre-hooks, a
    subsample of every quantizable layer's input per sampling step."""

    def __init__(self, network: nn.Module, layers: list[str], values: int, seed: int):
        super().__init__()
        self.network, self.config = network, network.config
        self.values = values
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: dict[str, dict[float, list[torch.Tensor]]] = {name: {} for name in layers}
        self.calls = 0
        self._key: float | None = None
        modules = dict(network.named_modules())
        self._handles = [modules[name].register_forward_pre_hook(self._hook(name)) for name in layers]

    def _hook(self, name: str):
        def hook(module, inputs):
            x = inputs[0].detach().float().flatten()
            if x.numel() > self.values:
                keep = torch.randint(0, x.numel(), (self.values - 2,), generator=self.generator).to(x.device)
                x = torch.cat([x[keep], x.min().view(1), x.max().view(1)])  # the extremes are always candidates
            self.samples[name].setdefault(self._key, []).append(x.cpu())
        return hook

    def forward(self, x, t, *args, **kwargs):
        tt = t.reshape(-1)
        if tt.numel() and not bool((tt == tt[0]).all()):
            raise ValueError("calibration needs every sample of a network call at the same t (the samplers of "
                             "dit-flow / dit-ddpm / dico do this)")
        self._key = round(float(tt[0]), 9) if tt.numel() else 0.0
        self.calls += 1
        return self.network(x, t, *args, **kwargs)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _labels(count: int, num_classes: int, offset: int = 0) -> torch.Tensor:
    return (torch.arange(count) + offset) % num_classes


def calibrate(pipeline: Pipeline, settings: QuantizeSettings, log=print) -> tuple[QuantizedNetwork, dict[str, Any]]:
    """The PTQ model of `pipeline`'s generator (module docstring, step 1) and calibration facts."""
    network = pipeline.generator
    layers = quantizable_layers(network)
    if not layers:
        raise ConfigError(f"{type(network).__name__} has no nn.Linear / nn.Conv2d layer to quantize")
    first, last = boundary_layers(network)
    bits = {name: ((settings.boundary_bits, settings.boundary_bits) if name in (first, last)
                   else (settings.w_bits, settings.a_bits)) for name in layers}
    recorder = _Recorder(network, layers, settings.calib_values, settings.seed)
    sampler = pipeline.sampler_settings()
    generator = torch.Generator().manual_seed(settings.seed)
    labels = _labels(settings.calib_images, pipeline.num_classes)
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(labels), settings.calib_batch):
            batch = labels[start:start + settings.calib_batch].to(pipeline.device)
            pipeline.objective.sample(recorder, batch, pipeline.latent_shape, sampler, generator)
    recorder.remove()
    batches = math.ceil(len(labels) / settings.calib_batch)
    grid = sorted({key for per_layer in recorder.samples.values() for key in per_layer})
    if not grid:
        raise ConfigError("the sampler never called the network during calibration")
    class_name = type(network).__name__
    quantized = QuantizedNetwork.from_float(network, class_name, config_to_dict(network.config), bits, grid,
                                            settings.timestep_policy)
    qlayers = quantized.quant_layers()
    for name in layers:
        per_step = recorder.samples[name]
        layer = qlayers[name]
        if settings.act_init == "shared":
            delta, zp = mse_activation_params(torch.cat([torch.cat(v) for v in per_step.values()]), layer.a_bits)
            layer.set_activation_params(torch.tensor(delta), torch.tensor(zp))
        else:
            params = [mse_activation_params(torch.cat(per_step[key]), layer.a_bits) if key in per_step else None
                      for key in grid]
            fallback = next(p for p in params if p is not None)
            params = [p or fallback for p in params]
            layer.set_activation_params(torch.tensor([p[0] for p in params]), torch.tensor([p[1] for p in params]))
    facts = {"time_grid_size": len(grid), "calls_per_trajectory": recorder.calls / batches, "layers": len(layers),
             "boundary_layers": [first, last], "calibration_seconds": round(time.perf_counter() - started, 2)}
    log(f"[quantize] calibrated {len(layers)} layers on {len(grid)} timesteps ({settings.calib_images} images) "
        f"in {facts['calibration_seconds']}s")
    return quantized, facts


# ------------------------------------------------------------------------------------------------ EfficientDM
class _Distiller(nn.Module):
    """Stands in for the FP network inside the sampler: at each call, the quantized network sees the same inputs and
    takes one optimizer step towards the FP output; the sampler continues with the FP output."""

    def __init__(self, teacher: nn.Module, student: QuantizedNetwork, optimizer, scheduler):
        super().__init__()
        self.teacher, self.student, self.config = teacher, student, teacher.config
        self.optimizer, self.scheduler = optimizer, scheduler
        self.losses: list[float] = []

    def forward(self, x, t, *args, **kwargs):
        with torch.no_grad():
            target = self.teacher(x, t, *args, **kwargs)
        with torch.enable_grad():
            prediction = self.student(x.detach(), t.detach(), *args, **kwargs)
            loss = F.mse_loss(prediction.float(), target.float())
            loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # step sizes stay positive
            for layer in self.student.quant_layers().values():
                layer.a_delta.clamp_(min=1e-8)
                layer.w_delta.clamp_(min=1e-8)
        self.losses.append(float(loss))
        return target


def lora_param_groups(quantized: QuantizedNetwork, settings: QuantizeSettings) -> list[dict]:
    """Scale-aware learning rates: per layer, LoRA at lora_lr_scale * mean(weight step) / 2500; weight steps at
    `weight_step_lr`; activation steps and zero points at `act_lr`."""
    groups, weight_steps, act = [], [], []
    for layer in quantized.quant_layers().values():
        lr = settings.lora_lr_scale * float(layer.w_delta.detach().mean()) / 2500
        groups.append({"params": [layer.lora_A, layer.lora_B], "lr": lr, "name": "lora"})
        weight_steps.append(layer.w_delta)
        act += [layer.a_delta, layer.a_zp]
    groups.append({"params": weight_steps, "lr": settings.weight_step_lr, "name": "weight_steps"})
    groups.append({"params": act, "lr": settings.act_lr, "name": "activation_steps"})
    return groups


def efficientdm(pipeline: Pipeline, quantized: QuantizedNetwork, settings: QuantizeSettings, calls_per_trajectory: float,
                progress: bool = True, log=print) -> dict[str, Any]:
    """QALoRA + TALSQ data-free distillation (module docstring, step 2), in place; LoRA merged at the end."""
    for p in quantized.parameters():
        p.requires_grad_(False)
    layers = quantized.quant_layers()
    for layer in layers.values():
        layer.add_lora(settings.lora_rank)
    groups = lora_param_groups(quantized, settings)
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    total = max(1, int(round(settings.epochs * calls_per_trajectory)))
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
    teacher = pipeline.generator.eval()
    distiller = _Distiller(teacher, quantized, optimizer, scheduler)
    quantized.eval()  # eval-mode network (no dropout); the LoRA layers take the differentiable fake-quant path
    sampler = pipeline.sampler_settings()
    generator = torch.Generator().manual_seed(settings.seed + 1)
    started = time.perf_counter()
    bar = tqdm(range(settings.epochs), desc="efficientdm", unit="trajectory", disable=not progress)
    for epoch in bar:
        labels = torch.randint(0, pipeline.num_classes, (settings.batch_size,), generator=generator)
        with torch.no_grad():
            pipeline.objective.sample(distiller, labels.to(pipeline.device), pipeline.latent_shape, sampler, generator)
        recent = distiller.losses[-int(max(1, calls_per_trajectory)):]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4g}")
    bar.close()
    for layer in layers.values():
        layer.merge_lora()
    quantized.eval()
    for p in quantized.parameters():
        p.requires_grad_(False)
    n = int(max(1, calls_per_trajectory))
    first = distiller.losses[:n]
    last = distiller.losses[-n:]
    facts = {"updates": len(distiller.losses), "seconds": round(time.perf_counter() - started, 1),
             "loss_first_trajectory": sum(first) / max(1, len(first)), "loss_last_trajectory": sum(last) / max(1, len(last))}
    log(f"[quantize] efficientdm: {facts['updates']} updates in {facts['seconds']}s, distillation loss "
        f"{facts['loss_first_trajectory']:.4g} (first trajectory) -> {facts['loss_last_trajectory']:.4g} (last)")
    return facts


# ------------------------------------------------------------------------------------------------ the command
def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def quantize(source: str | Path, out: str | Path, settings: QuantizeSettings, device: str = "cpu",
             progress: bool = True, log=print) -> dict[str, Any]:
    """Quantize the pipeline folder `source` into the pipeline folder `out` (written atomically)."""
    pipeline = Pipeline.from_pretrained(source, device=device)
    if pipeline.generator is None:
        raise ConfigError(f"{source} holds no generator (a tokenizer folder?): quantize a generator pipeline")
    if isinstance(pipeline.generator, QuantizedNetwork):
        raise ConfigError(f"{source} is already quantized; quantize its full-precision source folder instead")
    if not hasattr(pipeline.generator.config, "input_size"):
        raise ConfigError(f"method {pipeline.method.name} is not a diffusion / flow network on a fixed grid: EfficientDM "
                          "here quantizes dit-flow, dit-ddpm, dico-* and their latent variants")
    torch.manual_seed(settings.seed)
    quantized, facts = calibrate(pipeline, settings, log)
    if settings.mode == "efficientdm" and settings.epochs > 0:
        facts["efficientdm"] = efficientdm(pipeline, quantized, settings, facts["calls_per_trajectory"], progress, log)
    quantized.eval()
    info = dict(pipeline.info)
    info["quantization"] = {"source": str(source), "settings": asdict(settings), **facts}
    extra = {name: module for name, module in pipeline.components.items() if name not in ("generator", "tokenizer")}
    result = Pipeline(pipeline.method, quantized, pipeline.objective_config, pipeline.sampler_config, info,
                      pipeline.tokenizer, extra)
    path = result.save_pretrained(out)
    sizes = {"source_bytes": folder_bytes(source), "quantized_bytes": folder_bytes(path),
             "source_generator_bytes": folder_bytes(Path(source) / "generator"),
             "quantized_generator_bytes": folder_bytes(path / "generator")}
    log(f"[quantize] {settings.bits} {settings.mode}: generator {sizes['source_generator_bytes'] / 1e6:.2f} MB -> "
        f"{sizes['quantized_generator_bytes'] / 1e6:.2f} MB; folder {path}")
    return {"out": str(path), **facts, **sizes}
