"""Neon: Negative Extrapolation frOm self-traiNing (Alemohammad, Wang, Baraniuk; arXiv 2510.03597).

What the paper does. A generator sampled with its usual, mode-seeking inference settings (classifier-free guidance,
top-k/top-p, a few-step ODE solver) produces a synthetic set S that is sharper and less diverse than the data.
Fine-tuning the base weights theta_r briefly on S with the ordinary training loss gives theta_s, a model that moves
*towards* that collapse. The paper argues that, for mode-seeking samplers, the gradient of the loss on synthetic data
is anti-aligned with the gradient on real data, so stepping the other way improves the model. Neon therefore
extrapolates away from the fine-tune:

    theta_neon = theta_r + w * (theta_r - theta_s) = (1 + w) * theta_r - w * theta_s,   w > 0 small,

and grid-searches w (jointly with the guidance scale) on FID. Reported gains are large for little compute (e.g.
VAR-d16 ImageNet-256 FID 3.30 -> 2.01, xAR-L 1.28 -> 1.02 with 0.36% extra training compute).

Which choices this module follows (from the paper's code, see docs/neon.md):
1. Synthetic set: drawn with the pipeline's *saved* sampler settings (the model's own sampler), class-balanced labels
   0, 1, ..., K-1, 0, ... and a seed; chunk c of `chunk_size` images uses a generator seeded by (seed, c), so a
   resumed generation gives the same set. Written as a `folder` dataset (PNGs in class subfolders), so the fine-tune
   reads it through the shared data interface like any image folder.
2. Fine-tune: the experiment is rebuilt from the folder itself (model_index.json's method, objective and sampler,
   generator/config.json's network; token models use the tokenizer saved in the folder), started from the folder's
   (EMA) generator weights with `init_from`, and trained by the shared Trainer (`effigen.training.run.build_and_train`) on
   the synthetic folder. The learning rate ramps linearly from 0 to its target over the whole fine-tune (warm-up
   only: the schedule of the paper's VAR fork); weight decay 0. theta_s is the fine-tune's EMA (decay `ema_decay`
   with the trainer's EMA warm-up), so base and fine-tune are merged as the same kind of weights (both EMA);
   `ema_decay=0` merges the raw last weights.
3. Merge: per state-dict entry `base + w * (base - finetuned)`, computed in (at least) float32 and cast back; where the
   result is not finite (the base or the fine-tune holds +-inf/NaN there, e.g. attention-bias masks) the base value
   is kept, as are non-float buffers and keys the fine-tune lacks ("inf-safe", like the paper's VAR script).
   w = 0 returns the base weights exactly.
4. Selection: w (and the guidance scale when several are given) is chosen by FID against the *held-out* split of the
   dataset with a built-in feature net (or Inception), all settings scored on the same seeds and labels. Optionally
   the w sweep of a guidance scale stops once FID is worse than the best so far by more than `early_stop` (the paper
   uses 0.03 with FID-10k). w = 0 (the base model) is always scored, so the table shows the base at every guidance
   scale too. Caveat (as for the paper): w is tuned on the FID it is then reported with; use a fresh seed or
   a separate split to report the final number.

Every step is resumable: the synthetic set is complete or resumed chunk by chunk; the fine-tune resumes from the
trainer's checkpoints; scored sweep rows are reused. A stage that was run with other settings is an error (use
another output folder) rather than silently mixed.

    from effigen.post.neon import NeonConfig, run_neon
    result = run_neon("runs/mnist-var/final", "neon/mnist-var", NeonConfig(num_synthetic=2000, finetune_steps=100))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, apply_overrides, config_to_dict
from ..images import to_uint8
from ..io import load_weights, read_json, write_json
from ..pipeline import MODEL_INDEX, WEIGHTS_NAME, Pipeline
from ..registry import get_method


@dataclass
class NeonConfig:
    num_synthetic: int = 2000  # size of the synthetic set S
    seed: int = 0  # synthetic set and fine-tune seed
    finetune_steps: int = 100
    learning_rate: float = 1e-4  # reached at the end of the linear ramp
    batch_size: int = 32
    ema_decay: float = 0.999  # theta_s = the fine-tune's EMA (with warm-up); 0 = its raw last weights
    weights: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)  # the w grid; 0 is always added
    cfg_scales: tuple[float, ...] | None = None  # guidance scales swept jointly; None = the folder's saved one
    eval_samples: int = 1000
    eval_seed: int | None = None  # None: seed + 1 (never the synthetic set's seed)
    feature_net: str | None = None  # None: the dataset's built-in net (mnist-net, ...), else inception
    inception_weights: str | None = None
    reference_split: str = "test"  # the held-out split
    reference_dataset: str | None = None  # None: the dataset recorded in the folder
    reference_root: str | None = None  # root of a `folder` reference dataset
    early_stop: float | None = None  # stop a cfg's w sweep once FID > best + this
    precision: str = "bf16"  # training autocast and sampling precision
    sample_batch_size: int = 64
    chunk_size: int = 100  # synthetic images per seeded chunk
    device: str = "auto"
    finetune_overrides: tuple[str, ...] = ()  # extra --section.key=value of the fine-tune, e.g. --trainer.grad_clip=2
    progress: bool = True

    def check(self) -> None:
        if self.num_synthetic < 1 or self.finetune_steps < 1 or self.batch_size < 1 or self.eval_samples < 2:
            raise ConfigError("num_synthetic, finetune_steps and batch_size must be >= 1, eval_samples >= 2")
        if not all(math.isfinite(w) for w in self.weights):
            raise ConfigError(f"the w grid must be finite numbers, got {self.weights}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")


# ----------------------------------------------------------------------------------------------------- merge
def merge_state_dicts(base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], w: float,
                      skip_nonfinite: bool = True, stats: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """theta_base + w * (theta_base - theta_finetuned), entry by entry (see the module docstring).

    Keys missing from `finetuned` and non-float tensors are copied from `base`; with `skip_nonfinite`, every element
    where the merge is not finite keeps the base value. `stats` (optional) receives counts of merged tensors, copied
    tensors and elements kept for being non-finite."""
    counts = {"merged": 0, "copied": 0, "nonfinite_kept": 0}
    merged: dict[str, torch.Tensor] = {}
    for key, value in base.items():
        other = finetuned.get(key)
        if w == 0 or other is None or not value.is_floating_point():
            merged[key] = value.clone()
            counts["copied"] += 1
            continue
        if other.shape != value.shape:
            raise ValueError(f"{key}: base {tuple(value.shape)} vs fine-tuned {tuple(other.shape)}; merge weights of "
                             "the same network")
        dtype = torch.promote_types(value.dtype, torch.float32)  # fp16/bf16 are merged in fp32, fp64 stays fp64
        wide = value.to(dtype)
        out = wide + w * (wide - other.to(device=value.device, dtype=dtype))
        if skip_nonfinite:
            bad = ~torch.isfinite(out)
            counts["nonfinite_kept"] += int(bad.sum())
            out = torch.where(bad, wide, out)
        merged[key] = out.to(value.dtype)
        counts["merged"] += 1
    if stats is not None:
        stats.update(counts)
    return merged


# ----------------------------------------------------------------------------------------------------- helpers
def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _stage_record(path: Path, settings: dict[str, Any], what: str) -> dict[str, Any] | None:
    """The record of a stage run before with the same settings (None if never run); an error if run with others."""
    if not path.is_file():
        return None
    record = read_json(path)
    if record.get("settings") != json.loads(json.dumps(settings)):
        raise ConfigError(f"{path.parent} holds a {what} made with other settings ({path}); use another --out folder "
                          f"or delete {path.parent} to redo it")
    return record


def class_folder_name(label: int) -> str:
    """Zero-padded, so that the `folder` dataset (classes sorted by name) reads the labels back in order."""
    return f"{label:05d}"


def _write_png(image_chw_uint8: torch.Tensor, path: Path) -> None:
    from PIL import Image

    # a hidden temporary name: the folder dataset skips dot-files, so a killed run never leaves a half image
    tmp = path.parent / f".tmp-{uuid.uuid4().hex[:8]}.png"
    Image.fromarray(image_chw_uint8.permute(1, 2, 0).numpy()).save(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------- 1. synthetic set
def generate_synthetic_set(pipeline: Pipeline, root: str | Path, num: int, seed: int = 0, batch_size: int = 64,
                           precision: str = "fp32", chunk_size: int = 100, progress: bool = True,
                           settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """`num` class-balanced images from the pipeline's saved sampler, as root/<class>/<index>.png. Resumable: chunks
    whose images all exist are skipped. Returns the stage record (also written to root/neon_synthetic.json)."""
    from tqdm.auto import tqdm

    root = Path(root)
    settings = dict(settings or {}, num=num, seed=seed, precision=precision, chunk_size=chunk_size,
                    sampler=config_to_dict(pipeline.sampler_config))
    record_path = root / "neon_synthetic.json"
    record = _stage_record(record_path, settings, "synthetic set")
    if record is not None and record.get("complete"):
        return record
    if num < pipeline.num_classes:
        raise ConfigError(f"num_synthetic={num} is below the {pipeline.num_classes} classes: every class needs images")
    root.mkdir(parents=True, exist_ok=True)
    write_json(record_path, {"settings": settings, "complete": False})
    labels = torch.arange(num) % pipeline.num_classes
    paths = [root / class_folder_name(int(label)) / f"{index:07d}.png" for index, label in enumerate(labels)]
    for label in range(pipeline.num_classes):
        (root / class_folder_name(label)).mkdir(exist_ok=True)
    started, made = time.perf_counter(), 0
    bar = tqdm(total=num, desc="neon: synthetic set", unit="img", disable=not progress)
    for chunk, start in enumerate(range(0, num, chunk_size)):
        stop = min(start + chunk_size, num)
        if all(p.is_file() for p in paths[start:stop]):
            bar.update(stop - start)
            continue
        generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        images = to_uint8(pipeline(labels[start:stop].to(pipeline.device), generator=generator, batch_size=batch_size,
                                   precision=precision))
        for image, path in zip(images, paths[start:stop]):
            _write_png(image, path)
        made += stop - start
        bar.update(stop - start)
    bar.close()
    record = {"settings": settings, "complete": True, "images_generated_this_run": made,
              "seconds_this_run": time.perf_counter() - started,
              "seconds": (record or {}).get("seconds", 0.0) + time.perf_counter() - started}
    write_json(record_path, record)
    return record


# ----------------------------------------------------------------------------------------------------- 2. fine-tune
def finetune_experiment(base: str | Path, synthetic_root: str | Path, output_dir: str | Path,
                        config: NeonConfig) -> dict[str, Any]:
    """The experiment dict of the fine-tune: the base folder's own method, network, objective and sampler, trained on
    the synthetic folder from the base's generator weights (`init_from`); token models use the folder's tokenizer."""
    base = Path(base)
    index = read_json(base / MODEL_INDEX)
    method = get_method(index["method"])
    if method.kind != "generator":
        raise ConfigError(f"{base} holds a {method.name} tokenizer; Neon needs a generator folder")
    network = read_json(base / "generator" / "config.json")
    network.pop("_class_name", None)
    info = index.get("info") or {}
    resolution = info.get("resolution")
    if resolution is None:
        local = Path(base)  # a local pipeline folder; nothing is downloaded (from_pretrained fails if it is missing)
        resolution = Pipeline.from_pretrained(local).sample_shape[-1]
    experiment: dict[str, Any] = {
        "method": method.name,
        "data": {"name": "folder", "root": str(synthetic_root), "resolution": int(resolution), "holdout_fraction": 0.0},
        "network": network,
        "objective": index.get("objective", {}),
        "sampler": index.get("sampler", {}),
        "init_from": str(base),
        "trainer": {
            "output_dir": str(output_dir), "max_steps": config.finetune_steps, "batch_size": config.batch_size,
            "learning_rate": config.learning_rate, "warmup_steps": config.finetune_steps, "schedule": "constant",
            "weight_decay": 0.0, "ema_decay": config.ema_decay, "precision": config.precision, "device": config.device,
            "seed": config.seed, "checkpoint_every": max(1, config.finetune_steps // 4), "keep_checkpoints": 1,
            "sample_every": 0, "log_every": max(1, min(25, config.finetune_steps // 4)), "progress": config.progress,
            "resume": True,
        },
    }
    if (index.get("components") or {}).get("tokenizer"):  # token and latent models: the folder's own tokenizer
        experiment["tokenizer"] = str(base)  # (experiment.tokenizer_folder finds base/tokenizer)
    if config.finetune_overrides:
        experiment = apply_overrides(experiment, list(config.finetune_overrides))
    return experiment


def finetune(base: str | Path, synthetic_root: str | Path, output_dir: str | Path, config: NeonConfig,
             settings: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume, or skip when done) the fine-tune; returns its stage record with the final folder's path."""
    from ..training.run import build_and_train  # the one place that builds a run from an experiment dict

    output_dir = Path(output_dir)
    record_path = output_dir / "neon_finetune.json"
    record = _stage_record(record_path, settings, "fine-tune")
    final = output_dir / "final"
    if record is not None and record.get("complete") and (final / "generator" / WEIGHTS_NAME).is_file():
        return record
    experiment = finetune_experiment(base, synthetic_root, output_dir, config)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(record_path, {"settings": settings, "complete": False})
    started = time.perf_counter()
    summary = build_and_train(experiment, quiet=not config.progress)
    record = {"settings": settings, "complete": True, "pipeline": str(final), "steps": summary["steps"],
              "images_seen": summary["images_seen"], "seconds_this_run": time.perf_counter() - started,
              "training_seconds": (record or {}).get("training_seconds", 0.0) + summary["seconds"],
              "final_loss": summary.get("final_loss")}
    write_json(record_path, record)
    return record


# ----------------------------------------------------------------------------------------------------- 3-4. sweep
def _reference(pipeline: Pipeline, config: NeonConfig):
    from ..eval.evaluate import Reference, default_extractor_for, load_extractor

    dataset = config.reference_dataset or pipeline.info.get("dataset")
    if dataset is None:
        raise ConfigError("the folder records no dataset: pass the reference dataset (--ref-dataset)")
    if dataset == "folder" and not config.reference_root:
        raise ConfigError("a `folder` reference needs its root (--ref-root)")
    reference = Reference(dataset=dataset, split=config.reference_split, resolution=pipeline.sample_shape[-1],
                          root=config.reference_root)
    extractor = load_extractor(config.feature_net or default_extractor_for(dataset), config.inception_weights,
                               device=pipeline.device)
    return reference, extractor


def score(pipeline: Pipeline, extractor, reference_feats, num: int, seed: int, precision: str, batch_size: int,
          **sampler_overrides) -> dict[str, float]:
    """FID, IS, precision and recall of `num` class-balanced samples (seeded) against reference features."""
    from ..eval.evaluate import compute_metrics, generate_for_evaluation

    images = generate_for_evaluation(pipeline, num, seed=seed, batch_size=batch_size, precision=precision,
                                     progress=False, **sampler_overrides)
    feats = extractor.features(images, progress=False)
    return compute_metrics(feats, extractor, reference_feats, metrics=("fid", "is", "precision_recall"))


def sweep(pipeline: Pipeline, base_state: dict[str, torch.Tensor], finetuned_state: dict[str, torch.Tensor],
          config: NeonConfig, path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Score every (cfg, w), reusing rows already in `path` (same settings); returns {settings, rows, best}."""
    from ..eval.evaluate import reference_features

    record = _stage_record(path, settings, "sweep table") or {"settings": settings, "rows": []}
    done = {(r["cfg_scale"], r["w"]): r for r in record["rows"]}
    reference, extractor = _reference(pipeline, config)
    reference_feats = reference_features(reference, extractor, progress=False)
    saved_cfg = getattr(pipeline.sampler_config, "cfg_scale", None)
    cfgs = list(config.cfg_scales) if config.cfg_scales else [saved_cfg]
    ws = sorted(set([0.0] + [float(w) for w in config.weights]))
    eval_seed = config.eval_seed if config.eval_seed is not None else config.seed + 1
    rows = []
    for cfg in cfgs:
        best_fid = math.inf
        for w in ws:
            row = done.get((cfg, w))
            if row is None:
                started = time.perf_counter()
                pipeline.generator.load_state_dict(merge_state_dicts(base_state, finetuned_state, w))
                overrides = {} if cfg is None else {"cfg_scale": cfg}
                metrics = score(pipeline, extractor, reference_feats, config.eval_samples, eval_seed, config.precision,
                                config.sample_batch_size, **overrides)
                row = {"cfg_scale": cfg, "w": w, **metrics, "seconds": time.perf_counter() - started}
                record["rows"] = [r for r in record["rows"] if (r["cfg_scale"], r["w"]) != (cfg, w)] + [row]
                write_json(path, record)
            rows.append(row)
            if config.progress:
                print(f"neon: cfg {cfg} w {w:<5} FID {row['fid']:.3f}  precision {row.get('precision', math.nan):.3f}  "
                      f"recall {row.get('recall', math.nan):.3f}", flush=True)
            best_fid = min(best_fid, row["fid"])
            if config.early_stop is not None and row["fid"] > best_fid + config.early_stop:
                break
    pipeline.generator.load_state_dict(base_state)
    best = min(rows, key=lambda r: r["fid"])
    base_rows = [r for r in rows if r["w"] == 0.0]
    return {"settings": settings, "rows": rows, "best": best,
            "base_saved_cfg": next((r for r in base_rows if r["cfg_scale"] == saved_cfg), None),
            "base_best": min(base_rows, key=lambda r: r["fid"]), "feature_extractor": extractor.name,
            "reference": reference.describe(), "num_reference": len(reference_feats[extractor.fid_tap])}


def markdown_table(result: dict[str, Any]) -> str:
    name = result["feature_extractor"]
    lines = [f"| cfg | w | FID ({name}) | precision | recall | IS |", "|---|---|---|---|---|---|"]
    best = result["best"]
    for r in result["rows"]:
        mark = " **best**" if (r["cfg_scale"], r["w"]) == (best["cfg_scale"], best["w"]) else ""
        lines.append(f"| {r['cfg_scale']} | {r['w']:g} | {r['fid']:.3f}{mark} | {r.get('precision', math.nan):.3f} | "
                     f"{r.get('recall', math.nan):.3f} | {r.get('is', math.nan):.3f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- all of it
def run_neon(base: str | Path, out: str | Path, config: NeonConfig | None = None) -> dict[str, Any]:
    """Synthetic set -> fine-tune -> merge and sweep -> out/final (the merged pipeline at the best (w, cfg)) plus
    out/sweep.json and out/sweep.md. Returns the summary (also out/neon.json)."""
    from ..training.distributed import select_device

    config = config or NeonConfig()
    config.check()
    base, out = Path(base), Path(out)
    if base.resolve() == out.resolve() or out.resolve() in base.resolve().parents:
        raise ConfigError(f"--out {out} must not be the base folder {base} or hold it")
    device = select_device(config.device)
    local = Path(base)  # a local pipeline folder; nothing is downloaded (from_pretrained fails if it is missing)
    pipeline = Pipeline.from_pretrained(local, device=device)
    if pipeline.generator is None:
        raise ConfigError(f"{base} holds a tokenizer, not a generator")
    base_digest = _file_digest(base / "generator" / WEIGHTS_NAME)
    synthetic_settings = {"base": base_digest}
    synthetic = generate_synthetic_set(pipeline, out / "synthetic", config.num_synthetic, config.seed,
                                       config.sample_batch_size, config.precision, config.chunk_size, config.progress,
                                       settings=synthetic_settings)
    finetune_settings = {"synthetic": synthetic["settings"], "steps": config.finetune_steps, "lr": config.learning_rate,
                         "batch_size": config.batch_size, "ema_decay": config.ema_decay, "seed": config.seed,
                         "precision": config.precision, "overrides": list(config.finetune_overrides)}
    tuned = finetune(base, out / "synthetic", out / "finetune", config, finetune_settings)

    base_state = load_weights(base / "generator" / WEIGHTS_NAME)
    finetuned_state = load_weights(Path(tuned["pipeline"]) / "generator" / WEIGHTS_NAME)
    sweep_settings = {"finetune": finetune_settings, "eval_samples": config.eval_samples,
                      "eval_seed": config.eval_seed if config.eval_seed is not None else config.seed + 1,
                      "feature_net": config.feature_net, "reference_split": config.reference_split,
                      "reference_dataset": config.reference_dataset, "reference_root": config.reference_root,
                      "precision": config.precision}
    started = time.perf_counter()
    result = sweep(pipeline, base_state, finetuned_state, config, out / "sweep.json", sweep_settings)
    sweep_seconds = time.perf_counter() - started
    best = result["best"]
    write_json(out / "sweep.json", result)
    (out / "sweep.md").write_text(markdown_table(result))

    stats: dict[str, int] = {}
    merged = merge_state_dicts(base_state, finetuned_state, best["w"], stats=stats)
    overrides = {} if best["cfg_scale"] is None else {"cfg_scale": best["cfg_scale"]}
    info = dict(pipeline.info)
    info["neon"] = {"base": str(base), "w": best["w"], "cfg_scale": best["cfg_scale"], "fid": best["fid"],
                    "base_fid": result["base_best"]["fid"], "feature_extractor": result["feature_extractor"],
                    "num_synthetic": config.num_synthetic, "finetune_steps": config.finetune_steps,
                    "learning_rate": config.learning_rate, "arxiv": "2510.03597"}
    merged_pipeline = Pipeline(pipeline.method.name, pipeline.generator, pipeline.objective_config,
                               pipeline.sampler_settings(**overrides), info, pipeline.tokenizer)
    merged_pipeline.save_pretrained(out / "final", generator_state=merged)

    summary = {
        "base": str(base), "pipeline": str(out / "final"), "w": best["w"], "cfg_scale": best["cfg_scale"],
        "fid": best["fid"], "base_fid_saved_cfg": (result["base_saved_cfg"] or {}).get("fid"),
        "base_fid_best_cfg": result["base_best"]["fid"], "base_best_cfg": result["base_best"]["cfg_scale"],
        "feature_extractor": result["feature_extractor"], "merge": stats,
        "cost": {"synthetic_images": config.num_synthetic, "synthetic_seconds": synthetic.get("seconds"),
                 "finetune_steps": tuned["steps"], "finetune_images": tuned["images_seen"],
                 "finetune_seconds": tuned.get("training_seconds"),
                 "sweep_images": config.eval_samples * len(result["rows"]), "sweep_seconds_this_run": sweep_seconds},
        "config": dataclasses.asdict(config),
    }
    write_json(out / "neon.json", summary)
    return summary
