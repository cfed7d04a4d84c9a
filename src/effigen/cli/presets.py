"""`effigen presets`: the experiment presets and each method's network sizes."""

from __future__ import annotations

import argparse
import json

from ..training.experiment import EXPERIMENT_PRESETS
from ..registry import METHODS


def network_label(preset: dict) -> str:
    """The network a preset resolves to: its network preset and every `network` key that changes it."""
    base_name = preset.get("network_preset")
    base = METHODS[preset["method"]].network_presets.get(base_name, {}) if base_name else {}
    changes = {k: v for k, v in preset.get("network", {}).items() if base.get(k) != v}
    label = base_name or "defaults"
    return label + (" with " + ", ".join(f"{k}={v}" for k, v in changes.items()) if changes else "")


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="effigen presets", description=__doc__)
    parser.add_argument("name", nargs="?", help="show one experiment preset in full")
    args = parser.parse_args(argv)
    if args.name:
        if args.name not in EXPERIMENT_PRESETS:
            parser.error(f"unknown preset {args.name!r}; available: {', '.join(EXPERIMENT_PRESETS)}")
        print(json.dumps(EXPERIMENT_PRESETS[args.name], indent=2))
        return 0
    print("experiment presets (effigen train --preset NAME):")
    for name, preset in EXPERIMENT_PRESETS.items():
        data = preset.get("data", {})
        print(f"  {name:<25} method={preset['method']:<10} data={data.get('name')}@{data.get('resolution')}px "
              f"network={network_label(preset)}")
    for method in METHODS.values():
        print(f"\nnetwork presets of {method.name} ({method.paper}) (--network_preset=NAME):")
        for name, values in method.network_presets.items():
            print(f"  {name:<10} " + " ".join(f"{k}={v}" for k, v in values.items()))
    return 0
