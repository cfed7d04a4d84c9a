"""Compatibility alias: the experiment moved to `effigen.training.experiment` (it is part of the training layer).
`from effigen.experiment import build_experiment_dict` keeps working; new code imports from effigen.training."""

from .training.experiment import *  # noqa: F401,F403
from .training.experiment import (  # noqa: F401
    EXPERIMENT_PRESETS, ExperimentConfig, build_experiment_config, build_experiment_dict, check_init_from,
    parse_experiment, preset_names, tokenizer_folder, tokenizer_output, tokenizer_settings,
)
