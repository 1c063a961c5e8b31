"""``dicom-node denoise`` and ``dicom-node models list|show`` end to end (in-process, synthetic data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from dicom_node.cli import main
from tests.fixtures.images import make_tiny_model, write_series

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


def test_denoise_folder_with_two_series_and_previews(setup: tuple[Path, Path, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
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


def test_denoise_refuses_series_without_fitting_model(setup: tuple[Path, Path, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
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
    assert shown.startswith("model    tiny-ct 0.0.1") and "GFLOP per 512x512 slice" in shown
    assert "for      CT; body parts any; strength 0 to 1" in shown and "match the card" in shown
    assert main(["models", "show", "tiny-ct", "--all", "-c", str(config)]) == 0
    shown = capsys.readouterr().out
    assert 'name = "tiny-ct"' in shown and "GFLOP per 512x512 slice" in shown and "match" in shown
    assert main(["models", "show", "tiny-ct", "--json", "-c", str(config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["card"]["name"] == "tiny-ct" and shown["weights_match"] is True
    (models / "tiny-ct" / "weights.safetensors").write_bytes(b"corrupted")
    assert main(["models", "show", "tiny-ct", "-c", str(config)]) == 1
    assert "DO NOT MATCH" in capsys.readouterr().out
    assert main(["models", "show", "nope", "-c", str(config)]) == 1


def test_bundled_model_summary_is_short(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOM_NODE_CONFIG", raising=False)
    assert main(["models", "show", "ct-cnn-small"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) < 20  # the card itself has about 100 metric lines (--all)
    assert "for      CT; body parts HEAD; strength 0 to 1" in shown
    assert any(line.startswith("  philips-head-phantom-lowdose-1mm-simulated: PSNR ") and "dB (+" in line
               for line in shown)


def test_denoise_without_model_uses_the_cpu_default_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """No --model, no configuration, a CPU: ct-cnn-small at 0.5 (not the GPU model ct-cnn at 1.0)."""
    monkeypatch.delenv("DICOM_NODE_CONFIG", raising=False)
    rng = np.random.default_rng(1)
    write_series(tmp_path / "in", rng.integers(0, 2000, (2, 32, 32)).astype(np.uint16), bits_stored=12)
    out = tmp_path / "out"
    assert main(["denoise", str(tmp_path / "in"), str(out), "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "model ct-cnn-small at strength 0.5 on cpu (the default for CT on cpu)" in printed
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    ds = pydicom.dcmread(next(folder.glob("*.dcm")))
    assert "ct-cnn-small" in ds.DerivationDescription and "strength 0.50" in ds.DerivationDescription


def test_denoise_without_model_follows_the_rules_of_the_configuration(setup: tuple[Path, Path, Path],
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    tmp_path, models, _config = setup
    config = tmp_path / "rules.toml"
    config.write_text(f'[models]\ndirectories = ["{models}"]\n[node]\ndata_dir = "{tmp_path / "var"}"\n'
                      '[[rules]]\nname = "ct-test"\nmatch = { Modality = "CT" }\nmodel = "tiny-ct"\nstrength = 0.3\n')
    out = tmp_path / "out"
    assert main(["denoise", str(tmp_path / "in" / "a"), str(out), "-c", str(config), "--device", "cpu",
                 "--no-progress"]) == 0
    assert f"model tiny-ct at strength 0.3 on cpu (rule 'ct-test' of {config})" in capsys.readouterr().out
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert "strength 0.30" in pydicom.dcmread(next(folder.glob("*.dcm"))).DerivationDescription


def test_default_model_per_device(tmp_path: Path) -> None:
    """What `denoise` picks without --model on each device type (no GPU needed to check the choice)."""
    from dicom_node.cli.denoise import choose_model
    from dicom_node.config import load_config
    from dicom_node.denoise.series import scan

    write_series(tmp_path / "ct", np.zeros((1, 8, 8), np.uint16), bits_stored=12)
    (series,) = scan([tmp_path / "ct"]).series
    cfg = load_config(None, environ={})
    on_gpu = choose_model(series, cfg, None, None, "cuda", use_rules=False)
    on_cpu = choose_model(series, cfg, None, None, "cpu", use_rules=False)
    assert (on_gpu.folder.name, on_gpu.strength) == ("ct-cnn", 1.0)
    assert (on_cpu.folder.name, on_cpu.strength) == ("ct-cnn-small", 0.5)
    assert choose_model(series, cfg, None, 0.7, "cpu", use_rules=False).strength == 0.7  # --strength wins
    assert choose_model(series, cfg, "ct-cnn-small", None, "cuda", use_rules=False).strength == 0.5
