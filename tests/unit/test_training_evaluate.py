"""Evaluation metrics and the train / evaluate command line on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.evaluate import _smooth, body_mask, edge_mask, edge_sharpness, psnr_ssim
from training.synthetic import head_phantom, write_series

torch.set_num_threads(1)


def test_psnr_ssim_in_a_window():
    ref = head_phantom(96, 1)[0]
    body = body_mask(ref)
    assert body.sum() > 0.3 * body.size
    same = psnr_ssim(ref, ref, body, (-160, 240))
    assert same[0] > 100 and same[1] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = ref + rng.normal(0, 20, ref.shape).astype(np.float32)
    psnr, ssim = psnr_ssim(noisy, ref, body, (-160, 240))
    # Inside the window the error is the noise: PSNR ~ 20 log10(400 / 20) (less where clipping cuts noise).
    assert 26 < psnr < 29 and ssim < 0.9


def test_edge_sharpness_falls_with_blur():
    ref = head_phantom(96, 1)[0]
    body = body_mask(ref)
    edges = edge_mask(_smooth(ref, 1.5), body)
    assert edges.any()
    assert edge_sharpness(_smooth(ref, 2.0), edges) < 0.8 * edge_sharpness(ref, edges)


@pytest.fixture()
def tiny_model(tmp_path) -> Path:
    """An untrained small network: its residual starts at zero, so it is the identity."""
    from models.folder import ModelCard, save_model_folder
    from models.networks import build_network
    from training.data import ct_normalization

    args = {"channels": [8, 16, 32]}
    card = ModelCard(name="identity", version="0", architecture="unet-res-small", arguments=args,
                     modalities=["CT"], normalization=ct_normalization(), noise={"kind": "ct", "n_views": 60})
    save_model_folder(build_network("unet-res-small", **args), card, tmp_path / "identity")
    return tmp_path / "identity"


def test_evaluate_identity_model_scores_like_its_input(tmp_path, tiny_model):
    from training.evaluate import evaluate

    # A little own noise so that the flux can be self-calibrated from the flat regions.
    noisy_root = tmp_path / "noisy"
    vol = head_phantom(128, 3, seed=4) + np.random.default_rng(0).normal(0, 4, (3, 128, 128)).astype(np.float32)
    write_series(noisy_root, vol)
    metrics = evaluate(tiny_model, [str(noisy_root)], tmp_path / "report", real_low_dose=[str(noisy_root)],
                       baseline="nlm", max_slices=2, cache_dir=tmp_path / "cache", write_card=True)
    sim = [s for s in metrics["series"] if s["kind"] == "simulated"][0]
    rows = sim["rows"]
    assert rows["model"]["psnr"] == pytest.approx(rows["input"]["psnr"], abs=1e-3)
    assert rows["nlm"]["psnr"] > rows["input"]["psnr"]  # the baseline does denoise
    assert abs(rows["input"]["bias_hu"]) < 3
    real = [s for s in metrics["series"] if s["kind"] == "real-low-dose"][0]
    assert real["rows"]["model"]["noise_sd_hu"] == pytest.approx(real["rows"]["input"]["noise_sd_hu"], rel=1e-3)
    report = tmp_path / "report"
    assert (report / "table.md").read_text().count("| noisy |") == 6
    assert any(p.suffix == ".png" for p in report.iterdir())
    assert json.loads((report / "metrics.json").read_text())["dose_fraction"] == 0.25
    from models.folder import load_model_folder

    card = load_model_folder(tiny_model, "cpu").card
    assert card.metrics["dose_fraction"] == 0.25 and "noisy-simulated" in card.metrics


def test_command_line_train_and_evaluate(tmp_path):
    from dicom_node.cli import build_parser
    from training.cli import main

    root = tmp_path / "data"
    write_series(root / "train", head_phantom(96, 3, seed=0) +
                 np.random.default_rng(0).normal(0, 4, (3, 96, 96)).astype(np.float32))
    config = tmp_path / "tiny.toml"
    config.write_text(f"""
name = "tiny"
[model]
architecture = "unet-res-small"
arguments = {{ channels = [8, 16, 32] }}
[data]
root = "{root}"
train = ["train"]
patch = 32
batch = 4
[noise]
flux = 1e4
n_views = 60
realisations = 1
[train]
steps = 6
log_every = 2
""")
    assert main([str(config), "--run-dir", str(tmp_path / "run"), "--no-progress",
                 "--export", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "card.toml").exists()
    assert main(["evaluate", str(tmp_path / "exported"), str(root / "train"), "--baseline", "none",
                 "--slices", "1", "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "table.md").exists()
    # The node's command line offers the same commands.
    args = build_parser().parse_args(["train", str(config)])
    assert args.handler.__module__ == "training.cli"
    args = build_parser().parse_args(["evaluate", "m", "d"])
    assert args.handler.__module__ == "training.cli"
