"""Build a training run from an experiment dict and train it: what `effigen train` does, callable from Python.

    from effigen.training.experiment import build_experiment_dict
    from effigen.training.run import build_and_train
    summary = build_and_train(build_experiment_dict("mnist-dit", None, ["--trainer.max_steps=50"]))

One place turns an experiment (method, data, network, objective, sampler, trainer, tokenizer, init_from) into a
dataset, a network, an objective and a `Trainer`, and writes the run folder: config.yaml, metrics.jsonl,
samples/*.png, checkpoints/step_N/, final/ (the EMA pipeline) and summary.json. `effigen train`, `effigen neon`,
`effigen distill` and the tests all go through `build_and_train`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import yaml

from ..config import ConfigError, config_to_dict
from ..data import build_dataset, check_resolution
from ..images import save_image_grid
from ..io import DirectoryLock, atomic_write_text, check_finite
from ..pipeline import Pipeline, load_network
from ..registry import build_objective
from .distributed import finish_together, init_distributed
from .experiment import ExperimentConfig, check_init_from, parse_experiment, tokenizer_folder
from .trainer import Trainer


def preview_labels(num_classes: int, per_class: int = 8, max_classes: int = 10) -> torch.Tensor:
    """One row per class (up to `max_classes`), for the preview grids."""
    classes = torch.arange(min(num_classes, max_classes))
    return classes.repeat_interleave(per_class)


def make_pipeline(config: ExperimentConfig, network, info: dict, tokenizer=None) -> Pipeline:
    if config.method_spec.kind == "tokenizer":
        return Pipeline(config.method_spec, None, config.objective, config.sampler, info, tokenizer=network)
    return Pipeline(config.method_spec, network, config.objective, config.sampler, info, tokenizer=tokenizer)


def load_tokenizer(config: ExperimentConfig, device) -> torch.nn.Module | None:
    """The experiment's frozen tokenizer (any tokenizer class, by the name its folder records), or None."""
    if config.tokenizer is None:
        return None
    tokenizer = load_network(tokenizer_folder(config.tokenizer)).to(device).eval().requires_grad_(False)
    if config.tokenizer_output is not None and tokenizer.output != config.tokenizer_output:
        raise ConfigError(f"the tokenizer in {config.tokenizer} changed while the run was being set up")
    return tokenizer


def is_latent_space(tokenizer) -> bool:
    """A continuous latent space (KL-VAE, RAE, ...): the generator trains on cached latents instead of images."""
    return tokenizer is not None and tokenizer.output.kind == "continuous"


def latent_training_set(tokenizer, dataset, cache: str | Path, resolution: int, flip: bool = False, context=None,
                        progress: bool = False, quiet: bool = False, kind: str = "latents"):
    """The latents (`kind="tokens"`: a VQ tokenizer's token ids) a generator trains on: `dataset` itself when it is
    a cache (checked against the tokenizer, the kind and the flips), else a cache of it built once in `cache` (by
    the main process; reused on resume). `flip` also stores the latents of mirrored images. `context` is the run's
    distributed context (None: one process)."""
    from ..data.latents import LatentDataset, cache_latents, tokenizer_fingerprint

    fingerprint = tokenizer_fingerprint(tokenizer)
    if isinstance(dataset, LatentDataset):
        given = LatentDataset(dataset.root, resolution, fingerprint)
        if given.kind != kind:
            raise ConfigError(f"{dataset.root} caches {given.kind}, but this generator trains on {kind} of its "
                              f"tokenizer; build the cache with `effigen cache-latents{' --tokens' if kind == 'tokens' else ''}`")
        if flip and not given.stores_flipped:  # flipping a latent or a token map is not encoding the flipped image
            raise ConfigError(f"data.horizontal_flip=true needs the {kind} of mirrored images, which {dataset.root} "
                              "does not store; rebuild it with `effigen cache-latents --flip`, or set "
                              "data.horizontal_flip=false")
        return given
    cache = Path(cache)
    if context is None or context.is_main:
        started = time.perf_counter()
        cache_latents(tokenizer, dataset, cache, flip=flip, progress=progress and not quiet, kind=kind)
        if not quiet:
            print(f"{kind} of {dataset.name}/{dataset.split} ({len(dataset)} images) cached in {cache} "
                  f"({time.perf_counter() - started:.1f}s)")
    if context is not None and context.enabled:
        torch.distributed.barrier()
    return LatentDataset(cache, resolution, fingerprint)


def calibration_batches(dataset, batch_size: int = 128, limit: int = 20000):
    for start in range(0, min(len(dataset), limit), batch_size):
        yield torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset), limit))])


def initialize_from(config: ExperimentConfig, network, objective, tokenizer=None) -> str:
    """Load the generator weights of the pipeline folder `config.init_from` into `network` (before the trainer copies
    it into its EMA and builds the optimizer); the objective may map them (`init_from_state`, e.g. HMAR's stage 2
    starts its mask branch from the next-scale branch). Returns a note for the log."""
    from ..io import CheckpointError, load_state_dict_strict, load_weights

    folder = Path(config.init_from)
    index = check_init_from(config.init_from, config.method_spec)
    source_tokenizer = folder / "tokenizer" / "model.safetensors"
    if tokenizer is not None and source_tokenizer.is_file():
        theirs, ours = load_weights(source_tokenizer), tokenizer.state_dict()
        if theirs.keys() != ours.keys() or any(not torch.equal(theirs[k].cpu(), ours[k].cpu()) for k in theirs):
            raise ConfigError(f"init_from={config.init_from!r} was trained with another tokenizer than "
                              f"tokenizer={config.tokenizer!r}: use the tokenizer of that run")
    where = str(folder / "generator" / "model.safetensors")
    state = load_weights(folder / "generator" / "model.safetensors")
    try:
        if hasattr(objective, "init_from_state"):
            return objective.init_from_state(network, state, index, where)
        load_state_dict_strict(network, state, where)
    except CheckpointError as e:
        raise ConfigError(f"init_from={config.init_from!r}: its generator does not fit this experiment's network "
                          f"(use the same network_preset / network settings as that run):\n{e}") from None
    return "weights loaded"


def reconstruction_grid_fn(dataset_test, output_dir: Path, device, count: int = 16):
    """Preview for tokenizer runs: held-out images (odd rows) above their reconstructions (even rows)."""
    picks = torch.linspace(0, len(dataset_test) - 1, min(count, len(dataset_test))).long().tolist()  # across classes
    images = torch.stack([dataset_test[i][0] for i in picks]).to(device)

    def sample_fn(ema_network, step: int) -> Path:
        with torch.no_grad():
            recon = ema_network.reconstruct(images)
        rows = torch.stack((images.view(2, -1, *images.shape[1:]), recon.view(2, -1, *images.shape[1:])), 1)
        return save_image_grid(rows.flatten(0, 2).cpu(), output_dir / "samples" / f"step_{step:07d}.png",
                               nrow=images.shape[0] // 2, upscale=2)

    return sample_fn


def aligned(objective, config: ExperimentConfig, network, tokenizer=None):
    """`objective` wrapped with the experiment's REPA / HASTE alignment (objectives.alignment)."""
    from ..objectives.alignment import AlignedObjective
    from ..teachers import TeacherError, load_teacher

    try:
        return AlignedObjective(objective, config.align, load_teacher(config.align.teacher), network, tokenizer)
    except (TeacherError, ValueError) as e:
        raise ConfigError(f"align: {e}") from None


def check_resume(config: ExperimentConfig, context, quiet: bool = False) -> list[str]:
    """Refuse to continue a run in `output_dir` whose training settings changed (resume.check_resume_compatible);
    returns the safe changes (more steps, another budget, intervals, sampler settings). Every process checks, so
    all of them fail together. A stored config.yaml of an older effigen is normalised through the parser first, so
    settings added since then compare as their defaults."""
    from .resume import check_resume_compatible, read_stored_config

    stored = read_stored_config(config.trainer.output_dir) if config.trainer.resume else None
    if stored is None:
        return []
    try:
        stored = parse_experiment(stored, num_classes=getattr(config.network, "num_classes", None)).to_dict()
    except ConfigError:
        pass  # compared as written (e.g. its tokenizer folder moved): every difference is then listed
    changes = check_resume_compatible(stored, config.to_dict(), where=config.trainer.output_dir)
    if context.is_main and not quiet:
        for change in changes:
            print(f"resuming {config.trainer.output_dir} with {change}")
    return changes


def build_and_train(config_dict: dict, quiet: bool = False) -> dict:
    """Everything `effigen train` does, callable from Python. Returns the trainer's summary plus paths.

    Before anything is written into `trainer.output_dir`: the experiment is validated and resolved, a run being
    resumed is checked for changed settings, and the main process locks the folder for the run's lifetime (a second
    run into it is refused)."""
    config = parse_experiment(config_dict)  # fail on bad keys before any work
    context = init_distributed(config.trainer.device)
    dataset = build_dataset(config.data, "train")
    config = parse_experiment(config_dict, num_classes=dataset.num_classes)
    check_resume(config, context, quiet)
    lock = DirectoryLock(config.trainer.output_dir).acquire() if context.is_main else None
    try:
        return _build_and_train(config, context, dataset, quiet)
    finally:
        if lock is not None:
            lock.release()


def _build_and_train(config: ExperimentConfig, context, dataset, quiet: bool) -> dict:
    method = config.method_spec
    tokenizer = load_tokenizer(config, context.device)
    patch = getattr(config.network, "patch_size", 1)
    if is_latent_space(tokenizer):
        side = tokenizer.output.size[0]
        if side % patch:
            raise ConfigError(f"the {side}x{side} latents of the tokenizer in {config.tokenizer} do not split into "
                              f"{patch}x{patch} patches; use a patch size that divides {side}")
        dataset = latent_training_set(tokenizer, dataset, Path(config.trainer.output_dir) / "latents",
                                      config.data.resolution, config.data.horizontal_flip, context,
                                      config.trainer.progress, quiet)
    elif tokenizer is not None and tokenizer.output.kind == "tokens" and (
            config.data.token_cache or config.data.name == "latents"):
        if config.align.enabled:
            raise ConfigError("alignment to a teacher (align.enabled) feeds it the training images, which a token "
                              "cache does not hold; train from images (data.token_cache=false)")
        dataset = latent_training_set(tokenizer, dataset, Path(config.trainer.output_dir) / "tokens",
                                      config.data.resolution, config.data.horizontal_flip, context,
                                      config.trainer.progress, quiet, kind="tokens")
    else:
        check_resolution(config.data.resolution, patch, f"{method.network_class.__name__} with patch size {patch}")

    torch.manual_seed(config.trainer.seed)
    network = method.network_class(config.network)
    objective = build_objective(method, config.objective, dataset.num_classes, tokenizer)
    init_note = initialize_from(config, network, objective, tokenizer) if config.init_from is not None else None
    if hasattr(objective, "prepare_network"):  # e.g. freeze what a training stage does not train
        objective.prepare_network(network)
    if config.align.enabled:  # REPA / HASTE: the objective's loss plus alignment to a frozen teacher
        objective = aligned(objective, config, network, tokenizer if is_latent_space(tokenizer) else None)
    # the image dataset (a latent cache records its source), which evaluation compares samples against
    info = {"dataset": getattr(dataset, "name", config.data.name), "resolution": config.data.resolution, "class_names": list(dataset.class_names)}
    if config.align.enabled:
        info["align"] = config_to_dict(config.align)  # how it was trained (the projector is not in the folder)
    output_dir = Path(config.trainer.output_dir)
    if context.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))

    def save_folder(path: Path, ema_state: dict, extra) -> None:
        make_pipeline(config, network, info, tokenizer).save_pretrained(path, generator_state=ema_state, extra=extra)

    labels = preview_labels(dataset.num_classes)

    def sample_fn(ema_network, step: int) -> Path:
        pipeline = make_pipeline(config, ema_network, info, tokenizer)
        # previews follow the training precision (bf16 autocast makes CPU sampling several times faster)
        precision = "bf16" if config.trainer.precision == "bf16" else "fp32"
        images = pipeline(labels.to(context.device), seed=0, precision=precision)
        return save_image_grid(images, output_dir / "samples" / f"step_{step:07d}.png", nrow=8, upscale=2)

    if method.kind == "tokenizer":
        sample_fn = reconstruction_grid_fn(build_dataset(config.data, "test"), output_dir, context.device)
    trainer = Trainer(config.trainer, network, objective, dataset, save_folder, sample_fn,
                      horizontal_flip=config.data.horizontal_flip, context=context, run_config=config.to_dict(),
                      component="tokenizer" if method.kind == "tokenizer" else "generator")
    num_params = sum(p.numel() for p in network.parameters())
    num_trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    if context.is_main and not quiet:
        trainable = f" ({num_trainable / 1e6:.2f}M trained)" if num_trainable != num_params else ""
        print(f"effigen train: {config.method} ({method.paper}), {num_params / 1e6:.2f}M parameters{trainable}, "
              f"{config.data.name} {len(dataset)} images at {config.data.resolution}px, "
              f"{context.world_size} process(es) on {context.device}, output {output_dir}")
        if init_note is not None:
            print(f"initialised from {config.init_from}: {init_note}")
    summary = trainer.train()
    summary["parameters"] = num_params
    summary["trained_parameters"] = num_trainable
    ema_state = trainer.ema_state_dict()  # collective under FSDP: every process takes part
    ema_network = trainer.ema_network_for_sampling()
    if context.is_main and hasattr(ema_network, "calibrate_latents"):  # KL-VAE, RAE: latent statistics
        stats = ema_network.calibrate_latents(calibration_batches(dataset))
        for key in ("channel_mean", "channel_std", "scaling_factor", "shift_factor"):  # KL-VAE: in the config
            if hasattr(network.config, key):
                setattr(network.config, key, getattr(ema_network.config, key))
        for name, buffer in ema_network.named_buffers():  # RAE: per-element statistics as buffers of the weights
            if name in ema_state and "latent_" in name:
                ema_state[name] = buffer.detach().to(ema_state[name].device, ema_state[name].dtype).clone()
        summary["latent_channel_std"] = [round(x, 4) for x in stats["channel_std"]]
    if context.is_main:
        final = output_dir / "final"
        check_finite(ema_state, f"the final EMA weights (not written to {final})")
        make_pipeline(config, network, info, tokenizer).save_pretrained(final, generator_state=ema_state)
        started = time.perf_counter()
        grid = sample_fn(ema_network, trainer.step)
        grid_final = output_dir / "samples" / "final.png"
        grid_final.write_bytes(grid.read_bytes())
        summary.update(pipeline=str(final), grid=str(grid_final), sampling_seconds=time.perf_counter() - started)
        if method.kind == "tokenizer" and hasattr(ema_network, "quantize"):
            summary["codebook_usage_per_scale"] = [round(u, 1) for u in ema_network.quantize.usage()]
        write_summary(output_dir / "summary.json", summary)
    finish_together(context)
    return summary


def write_summary(path: Path, summary: dict) -> None:
    """The run's summary as JSON (steps, images seen, seconds, images/s, final loss, parameters, paths), written
    atomically: a crash leaves the previous summary or none, never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, path)
