"""`effigen.experiment` (where the experiment lived before it moved into the training layer) still imports."""


def test_the_old_import_path_still_works():
    import effigen.experiment as old
    import effigen.training.experiment as new

    assert old.build_experiment_dict is new.build_experiment_dict and old.parse_experiment is new.parse_experiment
    assert old.EXPERIMENT_PRESETS is new.EXPERIMENT_PRESETS
