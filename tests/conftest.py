import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_dit_config():
    from effigen.models.dit import DiTConfig

    return DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=4)


@pytest.fixture
def run_cli():
    """Run the effigen CLI in-process; returns (exit code, stdout, stderr)."""
    from effigen.cli.main import main

    def call(args, capsys):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give zero-initialised layers (adaLN-Zero, output layer) non-zero weights so tests see real outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return module
