"""The training configuration is checked by the node's schema (dicom_node.config.build_section): keys and types."""

from __future__ import annotations

import pytest

from training.config import TrainingConfigError, config_from_dict


def test_wrong_types_unknown_and_missing_keys_are_named_together() -> None:
    with pytest.raises(TrainingConfigError) as info:
        config_from_dict({"seed": True, "train": {"steps": "ten", "stepz": 3}, "noise": {"dose_range": [0.1]},
                          "data": {"train": ["ct/a", 7]}, "gan": 3, "source": "x"}, "run.toml")
    message = str(info.value)
    assert message.startswith("run.toml is invalid:\n")
    for line in ("name: required key is missing",
                 "seed: must be integer, not bool (True)",
                 "train.steps: must be integer, not str ('ten')",
                 "noise.dose_range: must be a list of 2 numbers, not list ([0.1])",
                 "data.train[1]: must be string, not int (7)",
                 "gan: must be a table, not int (3)"):
        assert f"  - {line}\n" in message + "\n"
    assert "train.stepz: unknown key (known keys: amp, checkpoint_every, " in message
    assert "source: unknown key" in message  # set from the file's path, never by the file


def test_toml_arrays_fill_tuples_and_integers_numbers() -> None:
    cfg = config_from_dict({"name": "x", "noise": {"dose_range": [0.1, 1], "kernels": ["smooth"],
                                                   "tcm_range": [0, 0.5]}, "train": {"lr": 1}})
    assert cfg.noise.dose_range == (0.1, 1.0) and cfg.noise.kernels == ("smooth",)
    assert cfg.noise.tcm_range == (0.0, 0.5) and isinstance(cfg.train.lr, float)
    assert cfg.gan.betas == [0.5, 0.9]  # untouched sections keep the dataclass's defaults
    with pytest.raises(TrainingConfigError, match=r"noise.kernels\[0\]: must be string, not int"):
        config_from_dict({"name": "x", "noise": {"kernels": [1]}})
