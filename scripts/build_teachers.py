"""Train the built-in ViT teachers (`effigen.teachers.builtin.VIT_TEACHERS`: mnist-vit) and write them to
src/effigen/assets/ (teacher-<name>.safetensors) plus a record of each in teachers.json.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/build_teachers.py --threads 1     # mnist-vit: 30 epochs, ~11 minutes on one core
    .venv/bin/python scripts/build_teachers.py --epochs 5 --out-dir /tmp/teachers  # a quick trial elsewhere

Training is deterministic from --seed on a given machine and thread count. (`mnist-net` needs no build: it adapts
the FID feature net of scripts/build_feature_nets.py.)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import sys
import time
from pathlib import Path

import torch

from effigen.io import read_json, write_json
from effigen.teachers.builtin import (
    REBUILD_COMMAND,
    VIT_TEACHERS,
    load_vit_classifier,
    save_vit_classifier,
    train_vit_teacher,
)

ASSETS = Path(__file__).resolve().parents[1] / "src" / "effigen" / "assets"
RECORD = "teachers.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(VIT_TEACHERS), help="build only this teacher")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epoch count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=ASSETS, help=f"where to write (default {ASSETS})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    record_path = args.out_dir / RECORD
    record = read_json(record_path) if record_path.is_file() else {}
    summary = []
    for name in args.only or list(VIT_TEACHERS):
        print(f"== {name}: training on the {VIT_TEACHERS[name]['dataset']} train split", flush=True)
        started = time.perf_counter()
        model, report = train_vit_teacher(name, epochs=args.epochs, seed=args.seed,
                                          log=lambda line: print(line, flush=True))
        path = args.out_dir / f"teacher-{name}.safetensors"
        meta = {k: report[k] for k in ("dataset", "num_classes", "class_names", "mean", "std", "test_accuracy")}
        save_vit_classifier(model, path, {**meta, "seed": args.seed})
        # re-load what was written and compare, so the record describes the file, not the memory copy
        reloaded, _ = load_vit_classifier(path)
        with torch.no_grad():
            size = model.vit.config.image_size
            probe = torch.rand(4, 3, size, size) * 2 - 1
            if not torch.equal(reloaded(probe), model(probe)):
                raise SystemExit(f"{path} does not reproduce the trained teacher; not recording it")
        seconds = time.perf_counter() - started
        command = f"OMP_NUM_THREADS=1 {REBUILD_COMMAND} --only {name} --threads {torch.get_num_threads()}"
        command += (f" --seed {args.seed}" if args.seed else "") + (f" --epochs {args.epochs}" if args.epochs else "")
        record[name] = {
            "file": path.name,
            "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            **{k: v for k, v in report.items() if k != "class_names"},
            "architecture": {k: v for k, v in vars(model.vit.config).items()},
            "total_seconds": round(seconds, 1),
            "torch_version": torch.__version__,
            "rebuild_command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(record_path, dict(sorted(record.items())))
        summary.append(f"{name}: test accuracy {report['test_accuracy']:.4f} on {report['test_images']} held-out "
                       f"images, {report['parameters']} parameters, {path.stat().st_size / 1024:.0f} KiB, trained in "
                       f"{report['train_seconds']:.0f} s ({seconds:.0f} s in all)")
        print(summary[-1], flush=True)
    print("\n".join(["== summary", *summary, f"record: {record_path}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
