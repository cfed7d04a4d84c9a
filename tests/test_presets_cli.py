"""`effigen presets` labels each experiment preset with the network it resolves to."""

from effigen.cli.main import main
from effigen.cli.presets import network_label
from effigen.training.experiment import EXPERIMENT_PRESETS, build_experiment_config


def test_labels_name_every_change_to_the_network_preset(capsys):
    assert main(["presets"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("mnist-dit "))
    assert "network=DiT-Ti/4 with hidden_size=192, depth=4, num_heads=3, patch_size=2" in line
    assert network_label(EXPERIMENT_PRESETS["smoke"]) == "DiT-Test"
    resolved = build_experiment_config("mnist-dit").network  # what the label says is what training builds
    assert (resolved.hidden_size, resolved.depth, resolved.num_heads, resolved.patch_size) == (192, 4, 3, 2)
