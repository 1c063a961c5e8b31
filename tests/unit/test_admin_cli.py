"""The command line as an administrator meets it: a closed pipe, training data elsewhere, a long evaluation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import PROJECT_ROOT

torch.set_num_threads(1)


@pytest.mark.parametrize("command", [["config", "example"], ["models", "show", "ct-cnn-small", "--all"]])
def test_output_into_a_closed_pipe_ends_quietly(command: list[str]) -> None:
    """`dicom-node models show ... | head`: the reader is gone before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "dicom_node", *command], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120, cwd=PROJECT_ROOT)
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert result.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored" at exit


def test_train_without_its_data_says_where_it_looked(tmp_path: Path) -> None:
    env = {**os.environ, "DICOM_NODE_SHARED_DATA": str(tmp_path / "nowhere")}
    config = PROJECT_ROOT / "training" / "configs" / "ct-cnn-small.toml"
    result = subprocess.run([sys.executable, "-m", "dicom_node", "train", str(config)], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("dicom-node train: data folder 'ct/ge-head-7mm' not found: "
                           f"{tmp_path / 'nowhere' / 'ct' / 'ge-head-7mm'} does not exist")
    assert "--data DIR" in line and "[data] root" in line
    result = subprocess.run([sys.executable, "-m", "dicom_node", "train", str(config), "--data", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and f"{tmp_path / 'ct' / 'ge-head-7mm'} does not exist" in result.stderr


def test_evaluate_shows_progress_and_writes_where_help_says(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from models.folder import ModelCard, save_model_folder
    from models.networks import build_network
    from training.cli import main
    from training.data import ct_normalization
    from training.synthetic import head_phantom, write_series

    args = {"channels": [8, 16, 32]}
    card = ModelCard(name="identity", version="0", architecture="unet-res-small", arguments=args,
                     modalities=["CT"], normalization=ct_normalization(), noise={"kind": "ct", "n_views": 60})
    model = tmp_path / "run" / "model"
    save_model_folder(build_network("unet-res-small", **args), card, model)
    data = tmp_path / "data"
    write_series(data / "noisy", head_phantom(96, 2, seed=4) +
                 np.random.default_rng(0).normal(0, 4, (2, 96, 96)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(model), "--real-low-dose", "noisy", "--data", str(data), "--baseline", "nlm",
                 "--slices", "2", "--cache", str(tmp_path / "cache")]) == 0
    report = tmp_path / "run" / "evaluation-model"  # as --help says: evaluation-<model folder name> beside it
    assert (report / "table.md").is_file() and (report / "metrics.json").is_file()
    err = capsys.readouterr().err
    for step in (f"report in {report}", f"folder 1/1: reading {data / 'noisy'}", "identity on 2 slice(s)",
                 "nlm baseline, slice 1/2", "nlm baseline, slice 2/2", "metrics"):
        assert step in err, step
    import argparse

    from training.cli import add_evaluate_arguments

    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    assert "evaluation-<MODEL's folder name> beside MODEL" in " ".join(parser.format_help().split())
