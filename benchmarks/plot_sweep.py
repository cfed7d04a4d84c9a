"""Plot FID against network evaluations per image from one or more `sampler_sweep.py --json` files.

    python benchmarks/plot_sweep.py flow.json ddpm.json --labels "LightningDiT (flow)" "DiT-DDPM" \
        --out docs/images/sampling/fid-vs-nfe.png

One line per (file, solver), log-scaled NFE (guided evaluations count twice), FID of the feature net each sweep used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(sweeps: list[dict], labels: list[str], out: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    markers, styles = "osD^v<>", ["-", "--", ":", "-."]
    groups = list(dict.fromkeys(labels))  # one line style per label (model), one marker per series
    series = 0
    for sweep, label in zip(sweeps, labels):
        solvers = list(dict.fromkeys(row["solver"] for row in sweep["rows"]))
        for solver in solvers:
            rows = sorted((r for r in sweep["rows"] if r["solver"] == solver), key=lambda r: r["nfe"])
            suffix = "".join(f", {k}={v}" for k, v in sweep.get("sampler_overrides", {}).items())
            ax.plot([r["nfe"] for r in rows], [r["fid"] for r in rows], marker=markers[series % len(markers)],
                    linestyle=styles[groups.index(label) % len(styles)], label=f"{label}: {solver}{suffix}")
            series += 1
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("network evaluations per image (log scale; guidance counts twice)")
    extractor = sweeps[0].get("feature_extractor", "feature net")
    ax.set_ylabel(f"FID ({extractor}, {sweeps[0].get('num_images', '?')} samples)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", help="JSON files written by sampler_sweep.py --json")
    parser.add_argument("--labels", nargs="+", help="one label per file (default: the file names)")
    parser.add_argument("--title")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    labels = args.labels or [Path(p).stem for p in args.sweeps]
    if len(labels) != len(args.sweeps):
        parser.error(f"{len(args.sweeps)} files but {len(labels)} labels")
    sweeps = [json.loads(Path(p).read_text()) for p in args.sweeps]
    print(plot(sweeps, labels, Path(args.out), args.title))


if __name__ == "__main__":
    main()
