"""Train the feature nets used for FID / IS / precision-recall on the built-in datasets and write them
to src/effigen/assets/ (<name>.safetensors) plus a record of each in feature_nets.json.

    .venv/bin/python scripts/build_feature_nets.py                 # all three (a few minutes each on 2 cores)
    .venv/bin/python scripts/build_feature_nets.py --only mnist    # one; the other records are kept
    .venv/bin/python scripts/build_feature_nets.py --only shapes --epochs 6

Training is deterministic from --seed on a given machine and thread count.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import sys
import time
from pathlib import Path

import torch

from effigen.eval.feature_nets import (
    REBUILD_COMMAND,
    TRAINING_DEFAULTS,
    feature_net_for_dataset,
    load_feature_net_file,
    save_feature_net,
    train_feature_net,
)
from effigen.io import read_json, write_json

ASSETS = Path(__file__).resolve().parents[1] / "src" / "effigen" / "assets"
RECORD = "feature_nets.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(TRAINING_DEFAULTS),
                        help="build only this dataset's net (repeatable); default: all")
    parser.add_argument("--epochs", type=int, default=None, help="override the per-dataset epoch count")
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
    for dataset in args.only or list(TRAINING_DEFAULTS):
        name = feature_net_for_dataset(dataset)
        print(f"== {name}: training on the {dataset} train split", flush=True)
        started = time.perf_counter()
        net, report = train_feature_net(
            dataset, epochs=args.epochs, seed=args.seed, log=lambda line: print(line, flush=True)
        )
        path = args.out_dir / f"{name}.safetensors"
        save_feature_net(net, path, extra={"test_accuracy": report["test_accuracy"], "seed": args.seed})
        # Re-load what was written and re-measure, so the record describes the file, not the memory copy.
        reloaded = load_feature_net_file(path)
        with torch.no_grad():
            probe = torch.rand(4, 3, net.config.native_resolution, net.config.native_resolution) * 2 - 1
            if not torch.equal(reloaded(probe)["features"], net(probe)["features"]):
                raise SystemExit(f"{path} does not reproduce the trained net; not recording it")
        seconds = time.perf_counter() - started
        command = f"{REBUILD_COMMAND} --only {dataset}" + (f" --seed {args.seed}" if args.seed else "")
        if args.epochs is not None:
            command += f" --epochs {args.epochs}"
        record[name] = {
            "file": path.name,
            "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            **report,
            "total_seconds": round(seconds, 1),
            "torch_version": torch.__version__,
            "rebuild_command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(record_path, dict(sorted(record.items())))
        summary.append(
            f"{name}: test accuracy {report['test_accuracy']:.4f} on {report['test_images']} held-out images, "
            f"{report['parameters']} parameters, {path.stat().st_size / 1024:.0f} KiB, "
            f"trained in {report['train_seconds']:.0f} s ({seconds:.0f} s in all)"
        )
        print(summary[-1], flush=True)
    print("\n".join(["== summary", *summary, f"record: {record_path}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
