"""Pipeline = generator network + objective (what its outputs mean and how to sample it) + sampler
settings + any further named components (a tokenizer for latent or token models; a guidance model, a teacher,
a low-resolution stage or quantization parameters for the methods that need them). Saved as a diffusers-like
folder:

    model_index.json          method, component names -> class names, objective and sampler settings, data info
    generator/config.json     the network's constructor arguments ("_class_name" + its config dataclass)
    generator/model.safetensors   weights (the EMA weights when saved by the trainer)
    tokenizer/config.json, tokenizer/model.safetensors   (token and latent models) the frozen tokenizer
    <name>/config.json, <name>/model.safetensors         any other component, the same way
    train_state/              (trainer checkpoints only) raw weights, optimizer, scheduler, step

`model_index.json` names any number of components, `{"generator": "DiT", "tokenizer": "KLVAE", ...}`; each is
rebuilt by class name through one table (`registry.COMPONENTS`) from its config.json, and its weights are loaded
strictly. A component listed as null is absent (a tokenizer's own run writes `"generator": null`). A tokenizer's
training run (methods of kind "tokenizer", e.g. `msvq`) writes the same folder with a `tokenizer/` and no
`generator/`; a generator run points its experiment's `tokenizer` key at that folder. Objectives that need a
further component at sampling time name it (`extra_components = ("guidance_model",)`) and receive it.

No pickled code: every class is rebuilt from the registry and the JSON configs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .config import ConfigError, config_from_dict, config_to_dict
from .images import to_pil
from .io import CheckpointError, atomic_directory, load_state_dict_strict, load_weights, read_json, save_weights, write_json
from .registry import Method, build_objective, component_class, generates_as, get_method

MODEL_INDEX = "model_index.json"
WEIGHTS_NAME = "model.safetensors"
RESERVED = ("train_state", "samples", "checkpoints")  # folder names a component may not take
_COMPONENT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The autocast context of a sampling precision ("fp32" = none)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def check_component_name(name: str) -> str:
    if not isinstance(name, str) or not _COMPONENT_NAME.match(name) or name in RESERVED:
        raise ValueError(f"component name {name!r} must be a lower-case identifier (letters, digits, _) and not one "
                         f"of {', '.join(RESERVED)}: it names the component's subfolder")
    return name


def save_network(network: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", {"_class_name": type(network).__name__, **config_to_dict(network.config)})
    save_weights(state_dict if state_dict is not None else network.state_dict(), folder / WEIGHTS_NAME)


def load_network(folder: Path, network_class: type | None = None, weights_file: str = WEIGHTS_NAME) -> nn.Module:
    """Build the network described by `folder/config.json` and load its weights strictly. `network_class`: the class
    it must be (None: any registered component class, by the config's `_class_name`)."""
    folder = Path(folder)
    config_data = read_json(folder / "config.json")
    if not isinstance(config_data, dict):
        raise CheckpointError(f"{folder}/config.json must hold a JSON object")
    class_name = config_data.pop("_class_name", None if network_class is None else network_class.__name__)
    if network_class is None:
        try:
            network_class = component_class(str(class_name))
        except KeyError as e:
            raise CheckpointError(f"{folder}/config.json: {e.args[0]}") from None
    if class_name != network_class.__name__:
        raise CheckpointError(f"{folder}/config.json describes a {class_name}, expected {network_class.__name__}")
    try:
        config = config_from_dict(network_class.config_class, config_data, f"{folder.name}/config.json")
    except ConfigError as e:
        raise CheckpointError(f"{folder}/config.json is invalid: {e}") from e
    network = network_class(config)
    load_state_dict_strict(network, load_weights(folder / weights_file), str(folder / weights_file))
    return network


class Pipeline:
    def __init__(
        self,
        method: str | Method,
        generator: nn.Module | None,
        objective_config: Any,
        sampler_config: Any,
        info: dict[str, Any] | None = None,
        tokenizer: nn.Module | None = None,
        components: dict[str, nn.Module] | None = None,
    ):
        self.method = get_method(method)
        if generator is None and self.method.kind == "generator":
            raise ValueError(f"a {self.method.name} pipeline needs a generator network")
        if self.method.uses_tokenizer and self.method.tokenizer_required and tokenizer is None:
            raise ValueError(f"a {self.method.name} pipeline needs a tokenizer (producing {' or '.join(self.method.accepts)})")
        self.components: dict[str, nn.Module] = {}
        for name, module in {"generator": generator, "tokenizer": tokenizer, **(components or {})}.items():
            if module is not None:
                self.components[check_component_name(name)] = module
        self.objective_config = objective_config
        self.sampler_config = sampler_config
        self.info = dict(info or {})
        self.objective = build_objective(self.method, objective_config, self.num_classes, tokenizer, self.components)

    @property
    def generator(self) -> nn.Module | None:
        return self.components.get("generator")

    @property
    def tokenizer(self) -> nn.Module | None:
        return self.components.get("tokenizer")

    def _modules(self) -> list[nn.Module]:
        return list(self.components.values())

    @property
    def device(self) -> torch.device:
        return next(self._modules()[0].parameters()).device

    @property
    def num_classes(self) -> int:
        if self.generator is None:
            return len(self.info.get("class_names", []))
        return self.generator.config.num_classes

    @property
    def latent_shape(self) -> tuple[int, ...] | None:
        """Shape of what the sampler draws, for generators that denoise a fixed-size grid (None for tokens)."""
        config = getattr(self.generator, "config", None)
        if config is None or not hasattr(config, "input_size"):
            return None
        return (config.in_channels, config.input_size, config.input_size)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one output image (or latent, for a latent model without a decoder)."""
        if self.tokenizer is not None:
            output = self.tokenizer.output
            return (output.image_channels, output.resolution, output.resolution)
        return self.latent_shape

    def to(self, device: str | torch.device) -> "Pipeline":
        for module in self._modules():
            module.to(device)
        return self

    # ---------------------------------------------------------------- folders
    def save_pretrained(self, path: str | Path, generator_state: dict[str, torch.Tensor] | None = None, extra=None) -> Path:
        """Write the folder atomically. `generator_state` replaces the weights of the trained component (the
        generator; the tokenizer in a tokenizer's own run), e.g. with the trainer's EMA. `extra(tmp_folder)` may add
        files (the trainer's train_state/)."""
        path = Path(path)
        trained = "generator" if self.generator is not None else "tokenizer"
        names = {"generator": None, "tokenizer": None}  # always listed, null when absent (older readers expect both)
        names.update({name: type(module).__name__ for name, module in self.components.items()})
        with atomic_directory(path) as tmp:
            write_json(
                tmp / MODEL_INDEX,
                {
                    "_effigen_version": __version__,
                    "method": self.method.name,
                    "components": names,
                    "objective": config_to_dict(self.objective_config),
                    "sampler": config_to_dict(self.sampler_config),
                    "info": self.info,
                },
            )
            for name, module in self.components.items():
                save_network(module, tmp / name, generator_state if name == trained else None)
            if extra is not None:
                extra(tmp)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "Pipeline":
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"pipeline folder {path} does not exist (expected a folder with {MODEL_INDEX})")
        index = read_json(path / MODEL_INDEX)
        if not isinstance(index, dict):
            raise CheckpointError(f"{path / MODEL_INDEX} must hold a JSON object")
        try:
            method = get_method(index["method"])
        except KeyError as e:
            raise CheckpointError(f"{path / MODEL_INDEX}: {e}") from e
        components: dict[str, nn.Module] = {}
        for name, class_name in (index.get("components") or {}).items():
            if not class_name:
                continue
            try:
                check_component_name(name)
                network_class = component_class(class_name)
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"{path / MODEL_INDEX}: component {name!r}: {e.args[0]}") from None
            wrong = (f"{path / MODEL_INDEX}: method {method.name} generates with a {method.network_class.__name__}, "
                     "the folder's generator is a {}")
            # a wrapper (a QuantizedNetwork) names the class it stands in for only in its config: checked once loaded
            is_wrapper = isinstance(getattr(network_class, "base_network_class", None), property)
            if name == "generator" and network_class is not method.network_class and not is_wrapper:
                raise CheckpointError(wrong.format(class_name))
            components[name] = load_network(path / name, network_class).eval()
            if name == "generator" and generates_as(components[name]) is not method.network_class:
                raise CheckpointError(wrong.format(f"{class_name} of a {generates_as(components[name]).__name__}"))
        if method.kind == "generator" and "generator" not in components:
            raise CheckpointError(f"{path / MODEL_INDEX} lists no generator for method {method.name}")
        try:
            objective_config = config_from_dict(method.objective_class.config_class, index.get("objective", {}), "objective")
            sampler_config = config_from_dict(method.objective_class.sampler_config_class, index.get("sampler", {}), "sampler")
        except ConfigError as e:
            raise CheckpointError(f"{path / MODEL_INDEX} is invalid: {e}") from e
        generator, tokenizer = components.pop("generator", None), components.pop("tokenizer", None)
        pipeline = cls(method, generator, objective_config, sampler_config, index.get("info"), tokenizer, components)
        return pipeline.to(device)

    # ---------------------------------------------------------------- sampling
    def sampler_settings(self, **overrides: Any) -> Any:
        """The saved sampler settings with `overrides` (None values ignored), type-checked."""
        data = config_to_dict(self.sampler_config)
        for key, value in overrides.items():
            if value is None:
                continue
            if key not in data:
                valid = ", ".join(data)
                hint = getattr(type(self.sampler_config), "setting_hints", {}).get(key)
                raise ConfigError(f"unknown sampler setting {key!r} for {self.method.name}"
                                  + (f": {hint}" if hint else f"; valid: {valid}"))
            data[key] = value
        return config_from_dict(type(self.sampler_config), data, "sampler")

    def number_of_evaluations(self, **overrides: Any) -> int:
        settings = self.sampler_settings(**overrides)
        if getattr(self.objective, "evaluations_need_model", False):  # e.g. a cascade whose stages the network defines
            return self.objective.evaluations_per_sample(settings, self.generator)
        return self.objective.evaluations_per_sample(settings)

    @torch.no_grad()
    def __call__(
        self,
        labels: list[int] | torch.Tensor,
        *,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        batch_size: int = 64,
        output_type: str = "pt",
        precision: str = "fp32",
        progress: bool = False,
        **sampler_overrides: Any,
    ) -> torch.Tensor | list:
        """Generate one image per label. Returns float (N, 3, H, W) in [-1, 1] (`output_type="pt"`),
        PIL images (`"pil"`), or the sampler's raw output (`"latent"`). The same seed gives the same images
        on the same machine, whatever the batch size, because the noise comes from one generator in order."""
        if self.generator is None:
            raise ValueError(f"this folder holds a {type(self.tokenizer).__name__} tokenizer, not a generator: train a "
                             "generator on it (set `tokenizer` in the experiment) or use pipeline.tokenizer to reconstruct")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must be in [0, {self.num_classes - 1}], got {labels.tolist()}")
        if output_type not in ("pt", "pil", "latent"):
            raise ValueError(f"output_type must be 'pt', 'pil' or 'latent', got {output_type!r}")
        if output_type != "latent" and self.tokenizer is None and self.sample_shape[0] != 3:
            raise ValueError(
                f"this pipeline generates {self.sample_shape[0]}-channel latents and has no decoder (tokenizer); "
                "use output_type='latent', or convert the checkpoint with its VAE to get images"
            )
        settings = self.sampler_settings(**sampler_overrides)
        if generator is None:
            generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        device = self.device
        self.generator.eval()
        chunks = []
        bar = tqdm(total=len(labels), desc="sampling", unit="img", disable=not progress)
        for start in range(0, len(labels), batch_size):
            batch_labels = labels[start : start + batch_size].to(device)
            with autocast(device, precision):
                out = self.objective.sample(self.generator, batch_labels, self.latent_shape, settings, generator)
                if self.tokenizer is not None and output_type != "latent":
                    out = self.tokenizer.decode(out)
            chunks.append(out.float().cpu())
            bar.update(len(batch_labels))
        bar.close()
        output = torch.cat(chunks) if chunks else torch.empty(0, *(self.sample_shape or ()))
        if output_type == "latent":
            return output
        images = output.clamp(-1, 1)
        return to_pil(images) if output_type == "pil" else images

    @torch.no_grad()
    def edit(
        self,
        images: torch.Tensor,
        mask: torch.Tensor,
        labels: list[int] | torch.Tensor | None = None,
        *,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
        precision: str = "fp32",
        **sampler_overrides: Any,
    ) -> torch.Tensor | list:
        """Zero-shot editing (token generators): regenerate the region where `mask` is 1, keep the image elsewhere.

        images: (B, 3, H, W) in [-1, 1] at the pipeline's resolution; mask: (B or 1, 1, H, W) in [0, 1], 1 = regenerate
        (inpainting: a box; outpainting: everything outside a box). labels: class per image (the target class for
        class-conditional editing); None or `num_classes` = unconditional (the null class)."""
        if not hasattr(self.objective, "edit_spec"):
            why = getattr(self.objective, "no_edit_reason", "")
            raise ValueError(f"method {self.method.name} does not support zero-shot editing{': ' + why if why else ''} "
                             "(token generators do: var, hmar, resgen)")
        device = self.device
        images = torch.as_tensor(images, dtype=torch.float32).to(device)
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.sample_shape):
            raise ValueError(f"images must be (B, {', '.join(map(str, self.sample_shape))}) in [-1, 1], got {tuple(images.shape)}")
        B = images.shape[0]
        if B == 0:
            raise ValueError("edit needs at least one image")
        if labels is None:
            labels = torch.full((B,), self.num_classes, dtype=torch.long)
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if labels.numel() == 1 and B > 1:
            labels = labels.expand(B)
        if labels.numel() != B or labels.min() < 0 or labels.max() > self.num_classes:
            raise ValueError(f"labels must be {B} class ids in [0, {self.num_classes}] ({self.num_classes} = unconditional)")
        mask = torch.as_tensor(mask, dtype=torch.float32).to(device)
        spec = self.objective.edit_spec(images, 1.0 - mask)
        settings = self.sampler_settings(**sampler_overrides)
        if generator is None:
            generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        self.generator.eval()
        with autocast(device, precision):
            out = self.objective.sample(self.generator, labels.to(device), self.latent_shape, settings, generator, edit=spec)
            if output_type != "latent":
                out = self.tokenizer.decode(out)
        out = out.float().cpu()
        if output_type == "latent":
            return out
        images = out.clamp(-1, 1)
        return to_pil(images) if output_type == "pil" else images
