"""What `effigen serve` serves, without the page: the pipelines loaded from the given folders, the checks on every
request field and upload, and generate / edit / compare under the per-request limits (`Limits`). Gradio-free, so it
is testable and importable without the `serve` extra; the page is `effigen.cli.serve_app`, the command
`effigen.cli.serve`.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import ConfigError, UserError, config_to_dict
from ..images import image_to_tensor, make_grid, mask_to_tensor, to_pil
from ..io import CheckpointError
from ..pipeline import MODEL_INDEX, Pipeline

UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
DISPLAY_SIDE = 128  # generated images are shown (and returned) scaled up by an integer factor to at least this side


class RequestError(ValueError):
    """A request field is invalid; the message names the field and the valid range. Shown in the page."""


@dataclasses.dataclass(frozen=True)
class Limits:
    max_images: int = 16  # per request: images generated, edits made, per pipeline in a comparison
    max_steps: int = 250  # per request: sampling steps (methods with a step count)
    max_guidance: float = 50.0
    max_upload_bytes: int = 5 * 2**20
    max_upload_side: int = 2048  # px, each side of an uploaded image or mask
    concurrency: int = 1  # requests computing at once (all tabs together)
    max_queue: int = 16  # requests waiting; more are refused with "queue is full"


@dataclasses.dataclass
class Entry:
    name: str
    folder: Path
    pipeline: Pipeline
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def can_edit(self) -> bool:
        return hasattr(self.pipeline.objective, "edit_spec")

    @property
    def settings(self) -> dict[str, Any]:
        return config_to_dict(self.pipeline.sampler_config)

    @property
    def guidance_key(self) -> str | None:
        settings = self.settings
        return "cfg_scale" if "cfg_scale" in settings else ("guidance_w" if "guidance_w" in settings else None)

    @property
    def steps_key(self) -> str | None:
        return "num_steps" if "num_steps" in self.settings else None

    def class_names(self) -> list[str]:
        names = list(self.pipeline.info.get("class_names") or [])
        if len(names) == self.pipeline.num_classes:
            return [str(n) for n in names]
        return [str(i) for i in range(self.pipeline.num_classes)]

    def summary(self) -> dict[str, Any]:
        """What the Pipelines tab and the /list endpoint show: the folder's configuration, from the loaded pipeline."""
        p = self.pipeline
        components = {}
        for name, module in p.components.items():
            components[name] = {"class": type(module).__name__,
                                "parameters": sum(t.numel() for t in module.parameters()),
                                "config": config_to_dict(module.config) if hasattr(module, "config") else {}}
        settings = self.settings
        return {
            "name": self.name,
            "method": p.method.name,
            "resolution": p.sample_shape[-1],
            "channels": p.sample_shape[0],
            "num_classes": p.num_classes,
            "class_names": self.class_names(),
            "can_edit": self.can_edit,
            "guidance": None if self.guidance_key is None else {"setting": self.guidance_key,
                                                                "saved": settings[self.guidance_key]},
            "steps": None if self.steps_key is None else settings[self.steps_key],
            "sampler": settings,
            "objective": config_to_dict(p.objective_config),
            "components": components,
            "info": p.info,
        }


# ------------------------------------------------------------------------------------------------ folders
def find_pipeline_folders(paths: list[str | Path]) -> list[tuple[Path, bool]]:
    """Each path is a pipeline folder (it holds model_index.json) or a folder of them: its subfolders that are
    pipeline folders, or hold one named `final` (what `effigen train` writes under runs/<name>/). Returns
    (folder, named): `named` is False for the folders found inside a given one."""
    found: list[tuple[Path, bool]] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise UserError(f"--pipelines {given}: no such folder; give pipeline folders (with {MODEL_INDEX}) or a "
                            "folder holding them, such as runs/")
        if (path / MODEL_INDEX).is_file():
            found.append((path, True))
            continue
        inside = []
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            if (sub / MODEL_INDEX).is_file():
                inside.append(sub)
            elif (sub / "final" / MODEL_INDEX).is_file():
                inside.append(sub / "final")
        if not inside:
            raise UserError(f"--pipelines {given}: neither a pipeline folder (no {MODEL_INDEX}) nor a folder of them "
                            f"(no subfolder with {MODEL_INDEX} or final/{MODEL_INDEX}); train one with "
                            "`effigen train --preset mnist-dit` and pass runs/")
        found.extend((folder, False) for folder in inside)
    return found


def pipeline_name(folder: Path) -> str:
    folder = folder.resolve()
    return folder.parent.name if folder.name == "final" and folder.parent.name else folder.name


def load_pipeline(folder: Path, device) -> Pipeline:
    """A pipeline that can make images, or a UserError / CheckpointError saying why this folder cannot be served."""
    try:
        pipeline = Pipeline.from_pretrained(folder, device=device)
    except CheckpointError as e:
        raise CheckpointError(f"--pipelines {folder}: {e}") from None
    if pipeline.generator is None:
        raise UserError(f"--pipelines {folder}: this folder holds a {type(pipeline.tokenizer).__name__} tokenizer, "
                        "not a generator; pass the generator trained on it")
    if pipeline.tokenizer is None and pipeline.sample_shape[0] != 3:
        raise UserError(f"--pipelines {folder}: this pipeline generates {pipeline.sample_shape[0]}-channel latents "
                        "and has no decoder (tokenizer), so it cannot make images; convert it with its VAE")
    return pipeline


def load_entries(folders: list[tuple[Path, bool]], device, log=print) -> dict[str, Entry]:
    """Load every folder. One named on the command line must load; one found inside a given folder (runs/) that
    cannot be served (a tokenizer's own run, an unknown method) is skipped with a line saying why."""
    entries: dict[str, Entry] = {}
    seen: set[Path] = set()
    for folder, named in folders:
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        try:
            pipeline = load_pipeline(folder, device)
        except (UserError, CheckpointError) as e:
            if named:
                raise
            log(f"skipping {folder}: {str(e).removeprefix(f'--pipelines {folder}: ')}")
            continue
        base = name = pipeline_name(folder)
        n = 2
        while name in entries:
            name, n = f"{base}-{n}", n + 1
        entries[name] = Entry(name, folder, pipeline)
    return entries


# ------------------------------------------------------------------------------------------------ fields
def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise RequestError(f"{field}: expected a number, got {value!r}") from None
        else:
            raise RequestError(f"{field}: expected a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise RequestError(f"{field}: must be a finite number, got {value}")
    return value


def check_int(value: Any, field: str, low: int, high: int) -> int:
    number = _number(value, field)
    if number != int(number):
        raise RequestError(f"{field}: must be a whole number, got {number:g}")
    if not low <= number <= high:
        raise RequestError(f"{field}: must be between {low} and {high}, got {number:.0f}")
    return int(number)


def check_float(value: Any, field: str, low: float, high: float) -> float:
    number = _number(value, field)
    if not low <= number <= high:
        raise RequestError(f"{field}: must be between {low:g} and {high:g}, got {number:g}")
    return number


def is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def display_images(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images scaled up (nearest) by the integer factor that reaches DISPLAY_SIDE."""
    pil = to_pil(images)
    factor = max(1, math.ceil(DISPLAY_SIDE / max(images.shape[-1], 1)))
    return [im.resize((im.width * factor, im.height * factor), Image.NEAREST) for im in pil] if factor > 1 else pil


def read_upload(path: Any, field: str, limits: Limits) -> Image.Image:
    """An uploaded file (a path Gradio stored it at) -> a decoded PIL image, after checking its size and type."""
    if is_empty(path):
        raise RequestError(f"{field}: no image given; upload a PNG or JPEG image")
    if isinstance(path, dict):  # Gradio FileData
        path = path.get("path")
    file = Path(str(path))
    try:
        size = file.stat().st_size
    except OSError:
        raise RequestError(f"{field}: the upload could not be read; upload the image again") from None
    if size > limits.max_upload_bytes:
        raise RequestError(f"{field}: the file is {size / 2**20:.1f} MB, the limit is "
                           f"{limits.max_upload_bytes / 2**20:g} MB; upload a smaller image")
    try:
        with Image.open(file) as opened:
            kind = opened.format
            width, height = opened.size
            if kind not in UPLOAD_FORMATS:
                raise RequestError(f"{field}: a {kind} file is not accepted; upload a "
                                   f"{', '.join(UPLOAD_FORMATS)} image")
            if max(width, height) > limits.max_upload_side:
                raise RequestError(f"{field}: the image is {width}x{height} px, the limit is "
                                   f"{limits.max_upload_side} px a side; upload a smaller image")
            opened.seek(0)
            image = opened.convert("RGBA")
    except RequestError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RequestError(f"{field}: not a readable image ({type(e).__name__}); upload a PNG or JPEG image") from None
    return image


def mask_from_image(image: Image.Image) -> np.ndarray:
    """A mask image -> (H, W) float in [0, 1]: its alpha where it has transparent pixels (a painted layer), else its
    brightness (white = regenerate)."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    alpha = rgba[..., 3]
    if alpha.min() < 1.0:
        return alpha
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


# ------------------------------------------------------------------------------------------------ the service
class ServeService:
    """The pipelines being served and the checked requests on them; Gradio-free (the page calls these)."""

    def __init__(self, entries: dict[str, Entry], limits: Limits = Limits()):
        if not entries:
            raise UserError("--pipelines: no servable pipeline folder was found (see the lines above); give the "
                            "folder of a trained generator, such as runs/mnist-dit/final")
        self.entries = entries
        self.limits = limits

    @classmethod
    def from_folders(cls, paths: list[str | Path], device="cpu", limits: Limits = Limits()) -> "ServeService":
        return cls(load_entries(find_pipeline_folders(paths), torch.device(device)), limits)

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    @property
    def edit_names(self) -> list[str]:
        return [name for name, entry in self.entries.items() if entry.can_edit]

    def entry(self, name: Any, field: str = "pipeline") -> Entry:
        if not isinstance(name, str) or name not in self.entries:
            shown = repr(name) if len(repr(name)) < 80 else repr(name)[:77] + "..."
            raise RequestError(f"{field}: unknown pipeline {shown}; choose one of {', '.join(self.entries)}")
        return self.entries[name]

    def list(self) -> list[dict[str, Any]]:
        return [entry.summary() for entry in self.entries.values()]

    # ---------------------------------------------------------------- fields shared by the requests
    def overrides(self, entry: Entry, guidance: Any, steps: Any, strict: bool = True) -> dict[str, Any]:
        """Sampler overrides from the page's guidance and steps (empty = the saved value). `strict`: a setting the
        method does not have is an error (Generate); otherwise it is skipped (Compare, across methods)."""
        out: dict[str, Any] = {}
        if not is_empty(guidance):
            value = check_float(guidance, "guidance", 0.0, self.limits.max_guidance)
            key = entry.guidance_key
            if key is None:
                if strict:
                    raise RequestError(f"guidance: {entry.name} ({entry.pipeline.method.name}) has no guidance "
                                       "setting; leave guidance empty")
            else:  # a distilled student's guidance is its w input, the teacher's cfg_scale = 1 + w
                out[key] = value if key == "cfg_scale" else value - 1.0
        if not is_empty(steps):
            value = check_int(steps, "steps", 1, self.limits.max_steps)
            if entry.steps_key is None:
                if strict:
                    raise RequestError(f"steps: {entry.name} ({entry.pipeline.method.name}) has no step count (its "
                                       "number of steps is set by its scales); leave steps empty")
            else:
                out[entry.steps_key] = value
        try:
            entry.pipeline.sampler_settings(**out)
        except ConfigError as e:
            field = "guidance" if any(k in str(e) for k in ("cfg_scale", "guidance")) else "steps"
            raise RequestError(f"{field} for {entry.name}: {e}") from None
        return out

    def labels(self, entry: Entry, label: Any, count: int) -> list[int]:
        n = entry.pipeline.num_classes
        if is_empty(label):
            return [i % n for i in range(count)] if n else [0] * count
        return [self.label(entry, label)] * count

    def label(self, entry: Entry, label: Any) -> int:
        """A class id, or a class name of the pipeline's."""
        names = entry.class_names()
        if isinstance(label, str) and label.strip() in names and not label.strip().lstrip("-").isdigit():
            return names.index(label.strip())
        return check_int(label, "class", 0, max(entry.pipeline.num_classes - 1, 0))

    # ---------------------------------------------------------------- requests
    def generate(self, name: Any, label: Any = None, seed: Any = 0, guidance: Any = None, steps: Any = None,
                 batch: Any = 4) -> tuple[torch.Tensor, dict[str, Any]]:
        """Check every field, then sample. Returns the images (B, 3, H, W) in [-1, 1] and what was done."""
        entry = self.entry(name)
        count = check_int(batch, "batch", 1, self.limits.max_images)
        seed = check_int(seed, "seed", 0, 2**63 - 1)
        overrides = self.overrides(entry, guidance, steps)
        labels = self.labels(entry, label, count)
        return self._sample(entry, labels, seed, overrides)

    def _sample(self, entry: Entry, labels: list[int], seed: int, overrides: dict) -> tuple[torch.Tensor, dict]:
        with entry.lock:
            start = time.perf_counter()
            images = entry.pipeline(labels, seed=seed, batch_size=len(labels), **overrides)
            seconds = time.perf_counter() - start
        if not torch.isfinite(images).all():
            raise RuntimeError(f"{entry.name} produced non-finite pixels with these settings")
        names = entry.class_names()
        return images, {"pipeline": entry.name, "method": entry.pipeline.method.name, "images": len(labels),
                        "labels": labels, "classes": [names[i] for i in labels], "seed": seed,
                        "settings": overrides, "seconds": seconds,
                        "images_per_second": len(labels) / max(seconds, 1e-9)}

    def compare(self, names: Any, label: Any = None, seed: Any = 0, guidance: Any = None, steps: Any = None,
                batch: Any = 4) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """The same request on several pipelines, one after the other; guidance and steps apply where the method has
        them. Every field is checked before any sampling."""
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, (list, tuple)) or not names:
            raise RequestError(f"pipelines: choose at least one of {', '.join(self.entries)}")
        if len(names) > len(self.entries):
            raise RequestError(f"pipelines: at most {len(self.entries)} (each served pipeline once)")
        entries = [self.entry(name, "pipelines") for name in names]
        if len({e.name for e in entries}) != len(entries):
            raise RequestError("pipelines: each pipeline may be chosen once")
        count = check_int(batch, "batch", 1, self.limits.max_images)
        seed = check_int(seed, "seed", 0, 2**63 - 1)
        plans = []
        for entry in entries:
            labels = self.labels(entry, label, count)
            plans.append((entry, labels, self.overrides(entry, guidance, steps, strict=False)))
        return [self._sample(entry, labels, seed, overrides) for entry, labels, overrides in plans]

    def edit(self, name: Any, image: Image.Image, mask: np.ndarray, mode: Any = "inpaint", label: Any = None,
             seed: Any = 0, guidance: Any = None, num: Any = 4) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Regenerate the masked region of `image` (inpaint) or everything outside it (outpaint). `mask`: (H, W) in
        [0, 1] the size of the image, 1 = painted. Returns (input and masked input, edits, what was done)."""
        entry = self.entry(name)
        if not entry.can_edit:
            raise RequestError(f"pipeline: {entry.name} ({entry.pipeline.method.name}) cannot edit; choose one of "
                               f"{', '.join(self.edit_names) or 'none (no VAR or HMAR pipeline is served)'}")
        if mode not in ("inpaint", "outpaint"):
            raise RequestError(f"mode: must be 'inpaint' or 'outpaint', got {mode!r}")
        count = check_int(num, "number of edits", 1, self.limits.max_images)
        seed = check_int(seed, "seed", 0, 2**63 - 1)
        overrides = self.overrides(entry, guidance, None)
        if is_empty(label):
            target = entry.pipeline.num_classes  # the null class: unconditional
        else:
            target = self.label(entry, label)
        mask = np.asarray(mask, dtype=np.float32)
        if mask.ndim != 2 or mask.shape != (image.height, image.width):
            size = f"{mask.shape[1]}x{mask.shape[0]}" if mask.ndim == 2 else f"of shape {mask.shape}"
            raise RequestError(f"mask: it is {size} px but the image "
                               f"is {image.width}x{image.height} px; paint the mask on the image itself or give one of "
                               "the same size")
        if not np.isfinite(mask).all():
            raise RequestError("mask: holds non-finite values")
        mask = np.clip(mask, 0.0, 1.0)
        if mask.max() <= 0.0:
            raise RequestError("mask: nothing is painted; paint the region to regenerate (inpaint) or to keep "
                               "(outpaint) on the image")
        channels, resolution, _ = entry.pipeline.sample_shape
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        x = image_to_tensor(Image.alpha_composite(background, image.convert("RGBA")), resolution, channels)
        m = mask_to_tensor(mask, resolution)
        if mode == "outpaint":
            m = 1.0 - m
        with entry.lock:
            start = time.perf_counter()
            edits = entry.pipeline.edit(x.expand(count, -1, -1, -1), m, [target] * count, seed=seed, **overrides)
            seconds = time.perf_counter() - start
        if not torch.isfinite(edits).all():
            raise RuntimeError(f"{entry.name} produced non-finite pixels with these settings")
        shown = torch.cat((x, x * (1 - m) + m * -0.5))  # grey where the model regenerates
        names = entry.class_names()
        return shown, edits, {"pipeline": entry.name, "method": entry.pipeline.method.name, "mode": mode,
                              "edits": count, "class": None if target == entry.pipeline.num_classes else names[target],
                              "seed": seed, "settings": overrides, "seconds": seconds,
                              "images_per_second": count / max(seconds, 1e-9)}


def grid_image(images: torch.Tensor, nrow: int | None = None) -> Image.Image:
    """One PIL grid of (B, 3, H, W) images, scaled up like `display_images`."""
    grid = Image.fromarray(make_grid(images, nrow))
    factor = max(1, math.ceil(DISPLAY_SIDE / max(images.shape[-1], 1)))
    return grid.resize((grid.width * factor, grid.height * factor), Image.NEAREST) if factor > 1 else grid
