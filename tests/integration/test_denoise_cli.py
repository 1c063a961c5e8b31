"""``dicom-node denoise`` and ``dicom-node models list|show`` end to end (in-process, synthetic data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from dicom_node.cli import main
from dicom_node.denoise.testing import make_tiny_model, write_series

torch.set_num_threads(1)


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    models = tmp_path / "models"
    make_tiny_model(models, name="tiny-ct", identity=False)
    config = tmp_path / "node.toml"
    config.write_text(f'[models]\ndirectories = ["{models}"]\n[node]\ndata_dir = "{tmp_path / "var"}"\n')
    rng = np.random.default_rng(0)
    write_series(tmp_path / "in" / "a", rng.integers(0, 2000, (3, 40, 40)).astype(np.uint16), bits_stored=12,
                 series_number=4)
    write_series(tmp_path / "in" / "b", rng.integers(0, 2000, (2, 40, 40)).astype(np.uint16), bits_stored=12,
                 series_number=5)
    (tmp_path / "in" / "README.txt").write_text("not DICOM")
    return tmp_path, models, config


def test_denoise_folder_with_two_series_and_previews(setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    tmp_path, _models, config = setup
    out = tmp_path / "out"
    rc = main(["denoise", str(tmp_path / "in"), str(out), "-c", str(config), "--strength", "0.5", "--preview",
               "--no-progress", "--device", "cpu"])
    assert rc == 0
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    pngs = sorted(out.glob("*.png"))
    assert len(folders) == 2 and len(pngs) == 2
    assert pngs[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    numbers = set()
    for folder in folders:
        for f in folder.glob("*.dcm"):
            ds = pydicom.dcmread(f)
            numbers.add(int(ds.SeriesNumber))
            assert "strength 0.50" in ds.DerivationDescription
    assert numbers == {1004, 1005}
    err = capsys.readouterr().err
    assert "skipped 1 files" in err


def test_denoise_refuses_series_without_fitting_model(setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    tmp_path, _models, config = setup
    write_series(tmp_path / "pt", np.zeros((1, 8, 8), np.uint16), modality="PT", slope=None)
    rc = main(["denoise", str(tmp_path / "pt"), str(tmp_path / "out"), "-c", str(config), "--no-progress"])
    assert rc == 1
    assert "no installed model fits PT series" in capsys.readouterr().err


def test_models_list_and_show(setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _tmp, models, config = setup
    assert main(["models", "list", "-c", str(config)]) == 0
    listed = capsys.readouterr().out
    assert "tiny-ct" in listed and "unet-res-small" in listed
    assert main(["models", "show", "tiny-ct", "-c", str(config)]) == 0
    shown = capsys.readouterr().out
    assert 'name = "tiny-ct"' in shown and "GFLOP per 512x512 slice" in shown and "match" in shown
    (models / "tiny-ct" / "weights.safetensors").write_bytes(b"corrupted")
    assert main(["models", "show", "tiny-ct", "-c", str(config)]) == 1
    assert "DO NOT MATCH" in capsys.readouterr().out
    assert main(["models", "show", "nope", "-c", str(config)]) == 1
