"""effigen's results table from one command: train every generator on built-in MNIST at 32 px under one budget, evaluate
them all with one protocol, benchmark their sampling in one process, and write `results.md` with grids and a plot.

    python -m effigen.cli.report --budget full --docs docs            # the published table (docs/results.md)
    python -m effigen.cli.report --budget smoke --out /tmp/rs         # minutes: checks that every recipe runs
    python -m effigen.cli.report --budget full --docs docs --resume --methods var,hmar   # continue / add methods

Each method is an exact shell script in `benchmarks/results/` (its prerequisite tokenizer recipe is run first, with its
own smaller budget). Training runs two recipes at a time, each with OMP_NUM_THREADS=1 (one core each on a 2-core
machine), for the same budget of CPU time of its process (`trainer.budget_clock=cpu`: on a machine shared with other
jobs, equal wall time is unequal work; `--clock wall` for wall time). Then, in this process and one thread:

- quality: `generate_for_evaluation` (class-balanced labels, fixed seed) + `evaluate_images` against the same reference
  for every method (the built-in MNIST training split at 32 px through `mnist-net`: what `effigen eval` and
  `benchmarks/compare.py` use by default): FID, precision, recall, IS;
- speed: `effigen.bench.throughput.benchmark_runs` over all finished pipelines together, interleaved (images/s,
  latency, peak memory, FLOPs and network evaluations per image);
- a grid per method (classes 0-9, 8 seeds each, one row per class) and FID against sampling time per image.

Results are cached as JSON per method under `<out>/results/` (`--resume` reuses finished ones), the speed of all
methods in `<out>/results/speed.json` (re-measured whenever the set of methods changes), and the page is regenerated
from all of them. A method that fails, diverges or is unavailable stays in the table with its status.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIR = REPO_ROOT / "benchmarks" / "results"
PARAMETER_TARGET = 5.05e6  # VAR-d4 on mnist-msvq; GPT-S 5.09M, HMAR-d4 5.12M, ResGen-d4 4.93M, DetailFlow-GPT-S 5.09M
PARAMETER_TOLERANCE = 0.10
MAIN_SEED = 0


@dataclass(frozen=True)
class Recipe:
    name: str
    script: str
    paper: str = ""
    kind: str = "generator"  # or "tokenizer"
    tokenizer: str | None = None  # name of the prerequisite tokenizer recipe
    seed: int = MAIN_SEED
    replicate_of: str | None = None  # a second training seed of another recipe (the spread statement)
    base: str | None = None  # a generator recipe whose final pipeline this one post-processes (env BASE), e.g. quantizes
    settings: tuple[tuple[str, str], ...] = ()  # further environment variables of the script (BITS, MODE, ...)
    # this recipe's budget in units of the budget's minutes for its kind (a tokenizer that cannot learn the data in the
    # common tokenizer budget gets more, and the page says so; generators always get the common budget)
    minutes_scale: float = 1.0

    @property
    def prerequisite(self) -> str | None:
        return self.tokenizer or self.base


RECIPES: list[Recipe] = [
    Recipe("tokenizer-msvq", "tokenizer-msvq.sh", "VAR's multi-scale VQ-VAE", kind="tokenizer"),
    Recipe("tokenizer-vq", "tokenizer-vq.sh", "single-scale VQ-VAE", kind="tokenizer"),
    Recipe("tokenizer-klvae", "tokenizer-klvae.sh", "KL-VAE (SD-VAE architecture)", kind="tokenizer"),
    Recipe("tokenizer-rae", "tokenizer-rae.sh", "RAE (frozen mnist-vit + ViT decoder)", kind="tokenizer"),
    Recipe("tokenizer-rvq", "tokenizer-rvq.sh", "residual-VQ VAE, depth 4", kind="tokenizer", settings=(("DEPTH", "4"),)),
    Recipe("tokenizer-rvq8", "tokenizer-rvq.sh", "residual-VQ VAE, depth 8", kind="tokenizer", settings=(("DEPTH", "8"),)),
    # DetailFlow's 1D ViT tokenizer, from scratch, still decodes the mean digit after 6 CPU minutes (docs/detailflow.md)
    Recipe("tokenizer-detailflow", "tokenizer-detailflow.sh", "DetailFlow 1D coarse-to-fine tokenizer, 32 tokens",
           kind="tokenizer", settings=(("TOKENS", "32"),), minutes_scale=3.0),
    Recipe("tokenizer-detailflow-64", "tokenizer-detailflow.sh", "DetailFlow 1D coarse-to-fine tokenizer, 64 tokens",
           kind="tokenizer", settings=(("TOKENS", "64"),), minutes_scale=3.0),
    Recipe("dit-flow", "dit-flow.sh", "DiT 2212.09748 + rectified flow 2209.03003"),
    Recipe("dit-ddpm", "dit-ddpm.sh", "DiT 2212.09748 (DDPM, learned variance)"),
    Recipe("sit", "sit.sh", "SiT 2401.08740"),
    Recipe("sit-repa", "sit-repa.sh", "SiT 2401.08740 + REPA 2410.06940"),
    Recipe("sit-haste", "sit-haste.sh", "SiT 2401.08740 + HASTE 2505.16792"),
    Recipe("lightningdit", "lightningdit.sh", "LightningDiT 2501.01423 (pixels)"),
    Recipe("dico", "dico.sh", "DiCo 2505.11196 (DDPM, learned variance)"),
    Recipe("lightningdit-latent", "lightningdit-latent.sh", "LightningDiT 2501.01423 + KL-VAE", tokenizer="tokenizer-klvae"),
    Recipe("dit-ddpm-latent", "dit-ddpm-latent.sh", "DiT 2212.09748 (DDPM) + KL-VAE", tokenizer="tokenizer-klvae"),
    Recipe("sit-latent", "sit-latent.sh", "SiT 2401.08740 + KL-VAE", tokenizer="tokenizer-klvae"),
    Recipe("var", "var.sh", "VAR 2404.02905", tokenizer="tokenizer-msvq"),
    Recipe("raster-ar", "raster-ar.sh", "LlamaGen 2406.06525 (raster AR)", tokenizer="tokenizer-vq"),
    Recipe("lowdiff", "lowdiff.sh", "LowDiff 2509.15342 (8->16->32 px cascade, one network)"),
    Recipe("hmar", "hmar.sh", "HMAR 2506.04421 (stage 1 + mask fine-tune)", tokenizer="tokenizer-msvq"),
    Recipe("dit-flow-w4a8-ptq", "efficientdm.sh", "DiT + rectified flow, W4A8 post-training quantization (baseline)",
           base="dit-flow", settings=(("BITS", "w4a8"), ("MODE", "ptq"))),
    Recipe("dit-flow-w4a8", "efficientdm.sh", "DiT + rectified flow, W4A8 EfficientDM 2310.03270", base="dit-flow",
           settings=(("BITS", "w4a8"), ("MODE", "efficientdm"))),
    Recipe("dit-flow-w4a4", "efficientdm.sh", "DiT + rectified flow, W4A4 EfficientDM 2310.03270", base="dit-flow",
           settings=(("BITS", "w4a4"), ("MODE", "efficientdm"))),
    Recipe("dit-flow-seed1", "dit-flow.sh", "DiT 2212.09748 + rectified flow 2209.03003", seed=1, replicate_of="dit-flow"),
    Recipe("resgen", "resgen.sh", "ResGen 2412.10208 (RVQ depth 4)", tokenizer="tokenizer-rvq"),
    Recipe("resgen-rvq8", "resgen.sh", "ResGen 2412.10208 (RVQ depth 8)", tokenizer="tokenizer-rvq8"),
    Recipe("detailflow", "detailflow.sh", "DetailFlow 2505.21473 (32 tokens, groups of 4)", tokenizer="tokenizer-detailflow"),
    Recipe("detailflow-64", "detailflow.sh", "DetailFlow 2505.21473 (64 tokens, groups of 4)",
           tokenizer="tokenizer-detailflow-64"),
    Recipe("bfm", "bfm.sh", "BFM 2510.21167 (segment velocity blocks + SemFeat, then FRA)"),
    Recipe("lamamba", "lamamba.sh", "LaMamba-Diff 2408.02615 (DDPM, learned variance)"),
    Recipe("dit-dh", "dit-dh.sh", "RAE 2510.11690: DiT^DH + RAE latent of mnist-vit", tokenizer="tokenizer-rae"),
]
RECIPES_BY_NAME = {r.name: r for r in RECIPES}


@dataclass(frozen=True)
class Budget:
    name: str
    train_minutes: float  # per generator (time of its training loop, on `clock`)
    tokenizer_minutes: float  # per prerequisite tokenizer
    num_images: int  # evaluation samples per method
    bench_batch_size: int
    bench_repeats: int
    clock: str = "cpu"  # what the minutes count: "cpu" seconds of the training process, or "wall" seconds
    # the recipes' learning-rate clock (env SCHEDULE_CLOCK): "time" runs each cosine over the whole budget, so every
    # method trains for all of it whatever its speed on this machine; "steps" runs it over STEPS_PER_MINUTE x minutes
    # (a fixed step count that a fast machine reaches before the budget ends)
    schedule: str = "time"


BUDGETS = {
    "smoke": Budget("smoke", train_minutes=1.0, tokenizer_minutes=0.5, num_images=200, bench_batch_size=16, bench_repeats=1),
    "full": Budget("full", train_minutes=10.0, tokenizer_minutes=6.0, num_images=5000, bench_batch_size=64, bench_repeats=3),
}


# ------------------------------------------------------------------------------------------ shared measurement
def count_parameters(module) -> int:
    if module is None:
        return 0
    logical = getattr(module, "logical_parameter_count", None)  # a quantized network: weights, not packed bytes
    return int(logical()) if callable(logical) else sum(p.numel() for p in module.parameters())


def default_reference(pipeline):
    """The one reference every method is compared with: the pipeline's built-in dataset, training split, at its size
    (the default of `effigen eval` and of benchmarks/compare.py)."""
    from .eval.evaluate import Reference

    return Reference(dataset=pipeline.info.get("dataset"), split="train", resolution=pipeline.sample_shape[-1])


def quality_metrics(pipeline, num_images: int, seed: int, precision: str, extractor, **sampler_overrides) -> dict[str, Any]:
    """FID / precision / recall / IS (and KID, sFID where the net has them) of `num_images` class-balanced samples made
    with `seed`, against `default_reference`. Returns {"metrics": {...}, "generation_seconds": s, "reference": {...}}."""
    from .eval.evaluate import evaluate_images, generate_for_evaluation

    reference = default_reference(pipeline)
    started = time.perf_counter()
    images = generate_for_evaluation(pipeline, num_images, seed=seed, precision=precision, progress=False,
                                     **sampler_overrides)
    generation_seconds = time.perf_counter() - started
    record = evaluate_images(images, reference, extractor, progress=False, seed=seed)
    return {"metrics": {m["metric"]: m["value"] for m in record["metrics"]}, "generation_seconds": generation_seconds,
            "reference": record["reference"], "num_reference": record["num_reference"],
            "feature_extractor": record["feature_extractor"]}


SPEED_KEYS = ("images_per_second", "latency_median_s", "evaluations_per_image", "flops_per_image", "peak_memory_bytes",
              "batch_size", "precision", "repeats")


def speed_rows(pipelines: Sequence, precision: str, batch_size: int, repeats: int) -> list[dict[str, Any]]:
    """`benchmark_runs` over all pipelines in this process, interleaved; the headline figures of each."""
    from .bench.throughput import benchmark_runs

    results = benchmark_runs([(p, precision) for p in pipelines], batch_size=batch_size, repeats=repeats)
    return [{k: r[k] for k in SPEED_KEYS} for r in results]


# ------------------------------------------------------------------------------------------ recipes
def presets_in(script: Path) -> list[str]:
    return re.findall(r"--preset[ =]([A-Za-z0-9_.-]+)", script.read_text())


def available_presets() -> set[str]:
    from .training.experiment import preset_names

    return set(preset_names())


def selected_recipes(methods: str | None, spread: bool = True) -> list[Recipe]:
    """The generator recipes asked for (all by default), their tokenizers first, and the second-seed replicate of
    dit-flow when dit-flow is among them and `spread`."""
    generators = [r for r in RECIPES if r.kind == "generator" and r.replicate_of is None]
    if methods:
        names = [m.strip() for m in methods.split(",") if m.strip()]
        unknown = [n for n in names if n not in RECIPES_BY_NAME]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(r.name for r in RECIPES)}")
        generators = [RECIPES_BY_NAME[n] for n in names]
    chosen: list[Recipe] = []
    for recipe in list(generators):  # a post-processing recipe needs its base generator, trained before it
        if recipe.base and RECIPES_BY_NAME[recipe.base] not in generators:
            generators.insert(generators.index(recipe), RECIPES_BY_NAME[recipe.base])
    for recipe in generators:
        if recipe.tokenizer and RECIPES_BY_NAME[recipe.tokenizer] not in chosen:
            chosen.append(RECIPES_BY_NAME[recipe.tokenizer])
    tokenizers_first = sorted(chosen, key=lambda r: [x.name for x in RECIPES].index(r.name))
    chosen = tokenizers_first + [r for r in generators if r not in tokenizers_first]
    if spread:
        for recipe in RECIPES:
            if recipe.replicate_of and RECIPES_BY_NAME[recipe.replicate_of] in chosen and recipe not in chosen:
                chosen.append(recipe)
    return chosen


def recipe_command(recipe: Recipe, env: dict[str, str]) -> str:
    """The exact command line of a recipe, as a user would type it from the repository root."""
    keys = ("BUDGET_MINUTES", "BUDGET_CLOCK", "SCHEDULE_CLOCK", "OUT", "SEED", "TOKENIZER", "BASE", *(k for k, _ in recipe.settings))
    assignments = " ".join(f"{k}={shlex.quote(env[k])}" for k in keys if k in env)
    return f"OMP_NUM_THREADS=1 {assignments} bash benchmarks/results/{recipe.script}"


_TRAINED = re.compile(r"trained (\d+) steps \((\d+) this run\) in ([\d.]+)s: ([\d.]+) images/s, final loss (\S+)")
_CPU_BUDGET = re.compile(r"budget clock: ([\d.]+) CPU seconds this run")


def parse_training_log(text: str) -> dict[str, Any]:
    """Sums over the `effigen train` calls of a recipe (HMAR has two): training-loop seconds, steps, last loss."""
    runs = _TRAINED.findall(text)
    out: dict[str, Any] = {"train_seconds": sum(float(r[2]) for r in runs), "train_calls": len(runs)}
    cpu = _CPU_BUDGET.findall(text)
    if cpu:  # trainer.budget_clock=cpu: the budget the runs spent, in CPU seconds of their processes
        out["train_cpu_seconds"] = sum(float(c) for c in cpu)
    if runs:
        loss = runs[-1][4]
        try:
            out["final_loss"] = float(loss)
        except ValueError:
            out["final_loss"] = None
    params = re.findall(r"effigen train: .*?, ([\d.]+)M parameters", text)
    if params:
        out["parameters_reported_m"] = [float(p) for p in params]
    return out


def images_seen(run_dir: Path) -> tuple[int, int]:
    """(images seen, steps) summed over every training run under `run_dir`, from each run's latest checkpoint."""
    total_images = total_steps = 0
    for checkpoints in sorted(run_dir.rglob("checkpoints")):
        states = sorted(checkpoints.glob("step_*/train_state/state.json"))
        if states:
            state = json.loads(states[-1].read_text())
            total_images += int(state["images_seen"])
            total_steps += int(state["step"])
    return total_images, total_steps


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ------------------------------------------------------------------------------------------ the driver
@dataclass
class Report:
    out: Path
    budget: Budget
    recipes: list[Recipe]
    resume: bool = False
    jobs: int = 2
    precision: str = "bf16"
    eval_seed: int = 0
    docs: Path | None = None  # where results.md and images/results/ go (default: `out`)
    python: str = sys.executable
    log: Any = print
    results: dict[str, dict] = field(default_factory=dict)

    # paths
    def run_dir(self, recipe: Recipe) -> Path:
        return self.out / "runs" / recipe.name

    def result_path(self, recipe: Recipe) -> Path:
        return self.out / "results" / f"{recipe.name}.json"

    def log_path(self, recipe: Recipe) -> Path:
        return self.out / "logs" / f"{recipe.name}.log"

    def save(self, recipe: Recipe) -> None:
        path = self.result_path(recipe)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results[recipe.name], indent=2))
        os.replace(tmp, path)

    def load_cached(self) -> None:
        """With `resume`, every recipe's cached result under `out` (not only the selected ones: the page and the speed
        benchmark cover all methods run so far, so a method added later joins the same table)."""
        for recipe in RECIPES:
            path = self.result_path(recipe)
            if self.resume and path.is_file():
                self.results[recipe.name] = json.loads(path.read_text())

    def env_for(self, recipe: Recipe) -> dict[str, str]:
        minutes = self.budget.tokenizer_minutes if recipe.kind == "tokenizer" else self.budget.train_minutes
        minutes *= recipe.minutes_scale
        env = {"BUDGET_MINUTES": f"{minutes:g}", "BUDGET_CLOCK": self.budget.clock,
               "SCHEDULE_CLOCK": self.budget.schedule, "OUT": str(self.run_dir(recipe)),
               "SEED": str(recipe.seed)}
        if recipe.tokenizer:
            env["TOKENIZER"] = str(self.run_dir(RECIPES_BY_NAME[recipe.tokenizer]) / "final")
        if recipe.base:
            env["BASE"] = str(self.run_dir(RECIPES_BY_NAME[recipe.base]) / "final")
        env.update(dict(recipe.settings))
        return env

    # phase 1: training -----------------------------------------------------------------------
    def blocked_reason(self, recipe: Recipe, presets: set[str]) -> str | None:
        missing = [p for p in presets_in(RECIPES_DIR / recipe.script) if p not in presets]
        if missing:
            return f"preset not available: {', '.join(missing)} (not listed by `effigen presets`)"
        if recipe.prerequisite:
            prerequisite = self.results.get(recipe.prerequisite, {})
            if prerequisite.get("status") not in (None, "trained", "ok"):
                return f"prerequisite {recipe.prerequisite} did not train ({prerequisite.get('status')})"
        return None

    def finished(self, recipe: Recipe) -> bool:
        # skipped, failed and diverged recipes are tried again (a preset may have been added since)
        return self.results.get(recipe.name, {}).get("status") in ("trained", "ok")

    def train_all(self) -> None:
        presets = available_presets()
        pending = [r for r in self.recipes if not (self.resume and self.finished(r))]
        running: list[tuple[Recipe, subprocess.Popen, float, Any]] = []
        while pending or running:
            for recipe in list(pending):  # skip what cannot run, as soon as that is known
                reason = self.blocked_reason(recipe, presets)
                if reason is not None:
                    pending.remove(recipe)
                    self.results[recipe.name] = {"name": recipe.name, "status": "skipped", "reason": reason,
                                                 "command": recipe_command(recipe, self.env_for(recipe))}
                    self.save(recipe)
                    self.log(f"[report] {recipe.name}: skipped ({reason})")
            ready = [r for r in pending if not r.prerequisite
                     or self.results.get(r.prerequisite, {}).get("status") in ("trained", "ok")]
            while ready and len(running) < self.jobs:
                recipe = ready.pop(0)
                pending.remove(recipe)
                running.append(self.start(recipe))
            if not running:
                if pending:  # waiting on a tokenizer that is neither running nor finished cannot happen; guard anyway
                    for recipe in pending:
                        self.results[recipe.name] = {"name": recipe.name, "status": "skipped",
                                                     "reason": f"prerequisite {recipe.prerequisite} was not run"}
                        self.save(recipe)
                    pending.clear()
                break
            time.sleep(1.0)
            for item in list(running):
                recipe, process, started, handle = item
                if process.poll() is not None:
                    handle.close()
                    running.remove(item)
                    self.finish(recipe, process.returncode, time.perf_counter() - started)

    def start(self, recipe: Recipe):
        env_vars = self.env_for(recipe)
        run_dir = self.run_dir(recipe)
        if not self.resume and run_dir.exists():  # a fresh run: the trainer would otherwise resume an old one
            shutil.rmtree(run_dir)
        log_path = self.log_path(recipe)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **env_vars, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "EFFIGEN": f"{shlex.quote(self.python)} -m effigen", "PYTHONUNBUFFERED": "1"}
        handle = open(log_path, "a" if self.resume else "w")
        handle.write(f"$ {recipe_command(recipe, env_vars)}\n")
        handle.flush()
        self.log(f"[report] {recipe.name}: training ({env_vars['BUDGET_MINUTES']} min), log {log_path}")
        process = subprocess.Popen(["bash", str(RECIPES_DIR / recipe.script)], cwd=REPO_ROOT, env=env,
                                   stdout=handle, stderr=subprocess.STDOUT)
        return recipe, process, time.perf_counter(), handle

    def finish(self, recipe: Recipe, returncode: int, wall_seconds: float) -> None:
        text = self.log_path(recipe).read_text(errors="replace")
        record: dict[str, Any] = {"name": recipe.name, "kind": recipe.kind, "paper": recipe.paper, "seed": recipe.seed,
                                  "replicate_of": recipe.replicate_of, "returncode": returncode,
                                  "wall_seconds": wall_seconds, "budget_minutes": float(self.env_for(recipe)["BUDGET_MINUTES"]),
                                  "command": recipe_command(recipe, self.env_for(recipe)),
                                  "pipeline": str(self.run_dir(recipe) / "final"), **parse_training_log(text)}
        record["images_seen"], record["steps"] = images_seen(self.run_dir(recipe))
        loss = record.get("final_loss")
        if returncode != 0:
            record.update(status="failed", reason=f"exit code {returncode}", error_tail=tail(text))
        elif not recipe.base and (loss is None or not math.isfinite(loss)):  # post-processing recipes do not train
            record.update(status="diverged", reason=f"final loss {loss}", error_tail=tail(text))
        elif not (self.run_dir(recipe) / "final" / "model_index.json").is_file():
            record.update(status="failed", reason="no final pipeline folder", error_tail=tail(text))
        else:
            record["status"] = "trained"
        self.results[recipe.name] = record
        self.save(recipe)
        self.log(f"[report] {recipe.name}: {record['status']} in {wall_seconds:.0f}s"
                 + (f" ({record.get('reason')})" if record["status"] != "trained" else ""))

    # phase 2: quality and grids ---------------------------------------------------------------
    def generators(self) -> list[Recipe]:
        return [r for r in self.recipes if r.kind == "generator"]

    def needs_evaluation(self, recipe: Recipe) -> bool:
        record = self.results.get(recipe.name, {})
        done = record.get("status") == "ok" and record.get("num_images") == self.budget.num_images \
            and record.get("eval_seed") == self.eval_seed
        return record.get("status") in ("trained", "ok") and not done

    def evaluate_all(self) -> None:
        """Quality of every trained generator, `jobs` methods at a time, each in its own one-thread process (the
        figures do not depend on the timing; the speed benchmark below runs all methods in one process)."""
        pending = [r for r in self.generators() if self.needs_evaluation(r)]
        running: list[tuple[Recipe, subprocess.Popen, Any]] = []
        while pending or running:
            while pending and len(running) < self.jobs:
                recipe = pending.pop(0)
                self.log(f"[report] {recipe.name}: evaluating {self.budget.num_images} samples")
                handle = open(self.log_path(recipe), "a")
                command = [self.python, "-m", "effigen.report", "evaluate", str(self.out), recipe.name,
                           str(self.budget.num_images), str(self.eval_seed), self.precision]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
                running.append((recipe, subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=handle,
                                                         stderr=subprocess.STDOUT), handle))
            time.sleep(1.0)
            for item in list(running):
                recipe, process, handle = item
                if process.poll() is None:
                    continue
                handle.close()
                running.remove(item)
                self.results[recipe.name] = json.loads(self.result_path(recipe).read_text())
                record = self.results[recipe.name]
                if process.returncode != 0 and record.get("status") in ("trained", "ok"):
                    text = self.log_path(recipe).read_text(errors="replace")
                    record.update(status="eval failed", reason=f"evaluation exit code {process.returncode}",
                                  error_tail=tail(text))
                    self.save(recipe)
                metrics = record.get("metrics", {})
                if record.get("status") == "ok":
                    self.log(f"[report] {recipe.name}: {record['generator_parameters'] / 1e6:.2f}M generator parameters "
                             f"({record['generator_parameters'] / PARAMETER_TARGET - 1:+.1%} vs {PARAMETER_TARGET / 1e6:.2f}M), "
                             f"FID {metrics.get('fid', float('nan')):.3f} ({record['generation_seconds']:.0f}s to generate)")
                else:
                    self.log(f"[report] {recipe.name}: {record.get('status')} ({record.get('reason')})")

    def evaluate_one(self, recipe: Recipe) -> None:
        """Generate, score and draw the grid of one trained generator; the record is saved whatever happens."""
        import torch

        from .config import config_to_dict
        from .eval.evaluate import default_extractor_for, load_extractor
        from .images import save_image_grid
        from .pipeline import Pipeline

        record = self.results[recipe.name]
        try:
            pipeline = Pipeline.from_pretrained(Path(record["pipeline"]))  # a local run folder; nothing is downloaded
            extractor = load_extractor(default_extractor_for(pipeline.info.get("dataset")))
            quality = quality_metrics(pipeline, self.budget.num_images, self.eval_seed, self.precision, extractor)
            labels = torch.arange(10).repeat_interleave(8)  # one row per class, seeds fixed
            grid = save_image_grid(pipeline(labels, seed=0, precision=self.precision),
                                   self.out / "grids" / f"{recipe.name}.png", nrow=8, upscale=2)
            record.update(quality, num_images=self.budget.num_images, eval_seed=self.eval_seed, grid=str(grid),
                          generator_parameters=count_parameters(pipeline.generator),
                          tokenizer_parameters=count_parameters(pipeline.tokenizer),
                          evaluations_per_image=pipeline.number_of_evaluations(),
                          sampler=config_to_dict(pipeline.sampler_settings()))
            if not math.isfinite(quality["metrics"].get("fid", float("nan"))):
                record.update(status="diverged", reason="non-finite FID (the samples are degenerate)")
            else:
                record["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded in the table, never dropped
            import traceback

            record.update(status="eval failed", reason=f"{type(e).__name__}: {e}", error_tail=tail(traceback.format_exc()))
        self.save(recipe)

    # phase 3: speed, all methods in one process ------------------------------------------------
    def speed_path(self) -> Path:
        return self.out / "results" / "speed.json"

    def benchmark_all(self) -> dict[str, Any]:
        from .bench.throughput import environment
        from .pipeline import Pipeline

        names = [r.name for r in RECIPES if r.kind == "generator" and self.results.get(r.name, {}).get("status") == "ok"]
        path = self.speed_path()
        if self.resume and path.is_file():
            cached = json.loads(path.read_text())
            if sorted(cached.get("methods", [])) == sorted(names) and cached.get("budget") == self.budget.name:
                return cached
        speed: dict[str, Any] = {"methods": names, "budget": self.budget.name, "rows": {}}
        if names:
            self.log(f"[report] benchmarking sampling of {len(names)} methods in one process")
            pipelines = [Pipeline.from_pretrained(Path(self.results[n]["pipeline"])) for n in names]  # local run folders
            rows = speed_rows(pipelines, self.precision, self.budget.bench_batch_size, self.budget.bench_repeats)
            speed["rows"] = dict(zip(names, rows))
            speed["environment"] = environment(pipelines[0].device)
        else:
            from .bench.throughput import environment as env

            speed["environment"] = env("cpu")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(speed, indent=2))
        return speed

    def run(self) -> Path:
        self.load_cached()
        started = time.perf_counter()
        self.train_all()
        self.evaluate_all()
        speed = self.benchmark_all()
        self.log(f"[report] all phases in {time.perf_counter() - started:.0f}s")
        docs = self.docs or self.out
        return write_page([self.results[r.name] for r in RECIPES if r.name in self.results], speed,
                          docs / "results.md", docs / "images" / "results", self.budget, self.page_commands(),
                          jobs=self.jobs)

    def page_commands(self) -> list[str]:
        argv = ["effigen", "report", "--budget", self.budget.name, "--out", str(self.out)]
        default = BUDGETS.get(self.budget.name)
        if default is not None and self.budget.num_images != default.num_images:
            argv += ["--num-images", str(self.budget.num_images)]
        if default is not None and self.budget.train_minutes != default.train_minutes:
            argv += ["--train-minutes", f"{self.budget.train_minutes:g}"]
        if self.docs is not None:
            argv += ["--docs", str(self.docs)]
        # the methods this page was made with, when not the default set: `--methods`, and `--no-spread` when a
        # method with a second-seed replicate ran without it
        asked = [r.name for r in self.recipes if r.kind == "generator" and r.replicate_of is None]
        everything = [r.name for r in RECIPES if r.kind == "generator" and r.replicate_of is None]
        if asked != everything:
            argv += ["--methods", ",".join(asked)]
        replicated = {r.replicate_of for r in RECIPES if r.replicate_of}
        if replicated & set(asked) and not any(r.replicate_of for r in self.recipes):
            argv.append("--no-spread")
        if self.resume:
            argv.append("--resume")
        if self.jobs != 2:
            argv += ["--jobs", str(self.jobs)]
        return [" ".join(shlex.quote(a) for a in argv)]


# ------------------------------------------------------------------------------------------ the page
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point beats on both coordinates (both minimised), by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value if scale == 1.0 else value * scale, spec)


def plot_fid_vs_time(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(1.0 / r["images_per_second"], r["metrics"]["fid"]) for r in rows]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:gray", zorder=2)
    if front:
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "-o", color="tab:red", zorder=3,
                label="Pareto front (faster and better FID)")
    for row, (x, y) in zip(rows, points):
        ax.annotate(row["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    xs = [p[0] for p in points]
    if xs and max(xs) / min(xs) < 10:  # within one decade a log axis may have no major tick: label the minor ones
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor-tick labels of a log axis overlap the major ones
    ax.margins(x=0.25, y=0.12)  # room for the labels of the extreme points
    ax.set_xlabel("sampling time per image (s, log scale)")
    ax.set_ylabel("FID (mnist-net)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_page(results: list[dict], speed: dict[str, Any], page: Path, images_dir: Path, budget: Budget,
               commands: list[str], jobs: int = 2) -> Path:
    """results.md from the per-method records and the one-process speed record; copies the grids, draws the plot."""
    page.parent.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    environment = speed.get("environment", {})
    speed_rows_by_name = speed.get("rows", {})
    rel = os.path.relpath(images_dir, page.parent)
    generators = [r for r in results if r.get("kind", "generator") == "generator" and r["name"] in RECIPES_BY_NAME
                  and RECIPES_BY_NAME[r["name"]].kind == "generator"]
    tokenizers = [r for r in results if r["name"] in RECIPES_BY_NAME and RECIPES_BY_NAME[r["name"]].kind == "tokenizer"]
    main = [r for r in generators if not r.get("replicate_of")]
    lines = [
        "# Results: every generator on MNIST at 32 px, one budget, one protocol",
        "",
        f"Produced by `effigen.report` (budget `{budget.name}`) on {environment.get('date', '?')[:10]}; "
        f"machine: {environment.get('cpu_name', '?')}, {environment.get('cpu_count', '?')} cores, torch "
        f"{environment.get('torch_version', '?')}.",
        "",
        f"- **Training**: each generator for {budget.train_minutes:g} minutes of "
        + ("CPU time of its training process (`trainer.budget_clock=cpu`, one thread: equal work whatever else the "
           "machine runs; the *train min* column is CPU minutes, *wall min* the elapsed time)" if budget.clock == "cpu"
           else "wall time")
        + (" (the trainer's `max_minutes`, with `schedule_clock=time`: the cosine learning-rate schedule spans the "
           "whole budget, so every method trains for all of it; the recipe's steps per minute only set warm-up and a "
           "cap at 4x), " if budget.schedule == "time" else
           " (the trainer's `max_minutes`; `max_steps` is set from the recipe's measured steps per minute so the "
           "cosine schedule ends near the budget), ")
        + f"{jobs} recipe{'s' if jobs > 1 else ''} at a time with `OMP_NUM_THREADS=1` (one thread each). Prerequisite tokenizers: "
        f"{budget.tokenizer_minutes:g} minutes each, not counted in the generators' budget.",
        f"- **Parameters**: every recipe's network is sized to VAR-d4's {PARAMETER_TARGET / 1e6:.2f}M generator parameters "
        f"(within ±{PARAMETER_TOLERANCE:.0%}); tokenizer parameters are listed apart.",
        f"- **Quality**: {budget.num_images} class-balanced samples per method (evaluation seed fixed), "
        "bf16 sampling, each method's saved sampler settings; FID, precision, recall "
        "(k = 3) and IS on the built-in `mnist-net` features, against the same reference for all: the MNIST training split "
        "at 32 px (the default of `effigen eval` and `benchmarks/compare.py`).",
        f"- **Speed**: all methods in one process, interleaved, one thread "
        f"(`effigen.bench.throughput.benchmark_runs`, batch {budget.bench_batch_size}, {budget.bench_repeats} timed repeats, "
        "bf16): images/s, network evaluations (NFE) per image, peak memory (RSS increase), FLOPs per image.",
        "",
        "| method | paper | status | generator params | tokenizer params | training images seen | train min | wall min | "
        "FID | precision | recall | IS | images/s | NFE | peak MiB | GFLOP/img |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    off_target = []
    for r in main:
        s = speed_rows_by_name.get(r["name"], {})
        m = r.get("metrics", {})
        params = r.get("generator_parameters")
        if params and abs(params / PARAMETER_TARGET - 1) > PARAMETER_TOLERANCE:
            off_target.append(f"{r['name']} ({params / 1e6:.2f}M)")
        status = r.get("status", "?") if r.get("status") == "ok" else f"**{r.get('status', '?')}**: {r.get('reason', '')}"
        lines.append(
            f"| {r['name']} | {r.get('paper') or RECIPES_BY_NAME[r['name']].paper} | {status} | "
            f"{_fmt(params, '.2f', 1e-6)}{'M' if params else ''} | "
            f"{_fmt(r.get('tokenizer_parameters') or None, '.2f', 1e-6)}{'M' if r.get('tokenizer_parameters') else ''} | "
            f"{_fmt(r.get('images_seen') or None, ',d')} | "
            f"{_fmt(r.get('train_cpu_seconds') or r.get('train_seconds') or None, '.1f', 1 / 60)} | "
            f"{_fmt(r.get('train_seconds') or None, '.1f', 1 / 60)} | {_fmt(m.get('fid'), '.3f')} | {_fmt(m.get('precision'), '.3f')} | {_fmt(m.get('recall'), '.3f')} | "
            f"{_fmt(m.get('is'), '.2f')} | {_fmt(s.get('images_per_second'), '.1f')} | {_fmt(s.get('evaluations_per_image'), 'd')} | "
            f"{_fmt(s.get('peak_memory_bytes'), '.0f', 2**-20)} | {_fmt(s.get('flops_per_image'), '.3f', 1e-9)} |")
    lines.append("")
    counts = sorted({r.get("num_images") for r in main if r.get("status") == "ok"} - {None})
    if len(counts) > 1:  # e.g. a method added later with --num-images: say so rather than hide it
        lines += ["Evaluation samples differ between methods: " + ", ".join(
            f"{r['name']} {r['num_images']}" for r in main if r.get("status") == "ok") + ".", ""]
    if off_target:
        lines.append(f"Not within ±{PARAMETER_TOLERANCE:.0%} of {PARAMETER_TARGET / 1e6:.2f}M: {', '.join(off_target)}.")
        lines.append("")
    if tokenizers:
        lines += ["Prerequisite tokenizers:", "", "| tokenizer | status | training images seen | train min |", "|---|---|---|---|"]
        for r in tokenizers:
            status = r.get("status") if r.get("status") in ("trained", "ok") else f"**{r.get('status')}**: {r.get('reason', '')}"
            lines.append(f"| {r['name']} | {status} | {_fmt(r.get('images_seen') or None, ',d')} | "
                         f"{_fmt(r.get('train_cpu_seconds') or r.get('train_seconds') or None, '.1f', 1 / 60)} |")
        lines.append("")
        scaled = [RECIPES_BY_NAME[r["name"]] for r in tokenizers if RECIPES_BY_NAME[r["name"]].minutes_scale != 1.0]
        if scaled:
            lines += ["Budget exceptions: " + ", ".join(f"{s.name} trained for {s.minutes_scale:g}x the tokenizer budget"
                                                       for s in scaled)
                      + " (in the common budget it still decodes every image to the mean digit; see its method page).",
                      ""]
    # spread: a second training seed
    for r in generators:
        if r.get("replicate_of"):
            base = next((b for b in main if b["name"] == r["replicate_of"]), None)
            if base and base.get("status") == "ok" and r.get("status") == "ok":
                a, b = base["metrics"]["fid"], r["metrics"]["fid"]
                lines += [f"**Spread**: {r['replicate_of']} trained again with seed {r.get('seed')} (same recipe, budget and "
                          f"evaluation) scores FID {b:.3f} against {a:.3f} with seed {base.get('seed', 0)}: a difference of "
                          f"{abs(a - b):.3f} ({abs(a - b) / max(min(a, b), 1e-12):.0%}). FID differences between methods "
                          "smaller than this are not resolved by one run each.", ""]
            else:
                lines += [f"**Spread**: the second-seed run of {r['replicate_of']} did not finish "
                          f"({r.get('status')}: {r.get('reason', '')}); no spread figure.", ""]
    failures = [r for r in results if r.get("status") not in ("ok", "trained", "skipped")]
    if failures:
        lines += ["## What went wrong", ""]
        for r in failures:
            lines += [f"**{r['name']}**: {r.get('status')} ({r.get('reason', '')}). Last lines of its log:", "", "```",
                      r.get("error_tail", "").strip(), "```", ""]
    # plot and grids
    plotted = [r for r in main if r.get("status") == "ok" and r["name"] in speed_rows_by_name]
    if plotted:
        plot_rows = [{**r, "images_per_second": speed_rows_by_name[r["name"]]["images_per_second"]} for r in plotted]
        plot_fid_vs_time(plot_rows, images_dir / "fid-vs-time.png")
        lines += ["## FID against sampling time", "",
                  "Seconds per image at batch "
                  f"{budget.bench_batch_size} on one thread; the red line joins the methods no other method beats on both.",
                  "", f"![FID against sampling time per image]({rel}/fid-vs-time.png)", ""]
    grids = [r for r in generators if r.get("grid") and Path(r["grid"]).is_file()]
    if grids:
        lines += ["## Samples", "", "Classes 0-9 (one row each), 8 samples per class, sampling seed 0, each method's "
                  "saved sampler settings, shown 2x.", ""]
        for r in grids:
            shutil.copyfile(r["grid"], images_dir / f"{r['name']}.png")
            lines += [f"**{r['name']}**", "", f"![{r['name']} samples]({rel}/{r['name']}.png)", ""]
    lines += ["## Commands", "", "The whole page:", "", "```bash", *commands, "```", "",
              "Each recipe, as the driver ran it (from the repository root; `benchmarks/results/*.sh`):", "", "```bash"]
    lines += [r["command"] for r in results if r.get("command")]
    lines += ["```", ""]
    skipped = [r for r in results if r.get("status") == "skipped"]
    if skipped:
        lines += ["Not run: " + "; ".join(f"{r['name']} ({r.get('reason')})" for r in skipped) + ".", ""]
    page.write_text("\n".join(lines))
    return page


def _evaluate_worker(argv: list[str]) -> int:
    """`python -m effigen.report evaluate OUT NAME NUM_IMAGES EVAL_SEED PRECISION`: the evaluation process of one method
    (started by `Report.evaluate_all`)."""
    import torch

    out, name, num_images, eval_seed, precision = argv
    torch.set_num_threads(1)
    budget = dataclasses.replace(BUDGETS["smoke"], num_images=int(num_images))
    report = Report(out=Path(out), budget=budget, recipes=[RECIPES_BY_NAME[name]], resume=True,
                    eval_seed=int(eval_seed), precision=precision)
    report.load_cached()
    report.evaluate_one(RECIPES_BY_NAME[name])
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["evaluate"]:
        raise SystemExit("usage: python -m effigen.report evaluate OUT NAME NUM_IMAGES EVAL_SEED PRECISION "
                         "(internal; run `python -m effigen.cli.report` for the report)")
    sys.exit(_evaluate_worker(sys.argv[2:]))
