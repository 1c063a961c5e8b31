"""The MR recipe: complex receiver noise (Rician, non-central chi), SNR range, datasets with neighbouring slices,
the subject split, a tiny training run and its evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from training.config import config_from_dict, load_config
from training.modalities import mr

PROJECT = Path(__file__).resolve().parents[2]


def _phantom(slices: int = 6, size: int = 64) -> np.ndarray:
    """A disc of varying brightness per slice on a zero background, with a small bright inner disc ("vessel",
    under 0.5 % of the pixels: above the 99.5th percentile that sets the scale)."""
    yy, xx = np.mgrid[0:size, 0:size] - size / 2
    r = np.hypot(yy, xx)
    vol = np.zeros((slices, size, size), np.float32)
    for k in range(slices):
        vol[k] = np.where(r < size * 0.4, 400.0 + 20 * k, 0.0) + np.where(r < size * 0.03, 1500.0, 0.0)
    return vol


def test_rician_bias_where_the_signal_is_zero() -> None:
    sigma = 3.0
    noisy = mr.add_mr_noise(np.zeros((512, 512), np.float32), sigma, np.random.default_rng(0))
    assert noisy.min() >= 0
    # Rayleigh floor: mean sigma * sqrt(pi / 2), not zero as Gaussian noise on the magnitude would give.
    assert float(noisy.mean()) == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.01)
    # Where the signal is large the magnitude is unbiased with noise SD sigma.
    bright = mr.add_mr_noise(np.full((512, 512), 100 * sigma, np.float32), sigma, np.random.default_rng(1))
    assert float(bright.mean()) == pytest.approx(100 * sigma, rel=0.002)
    assert float(bright.std()) == pytest.approx(sigma, rel=0.02)


@pytest.mark.parametrize("coils", [4, 8])
def test_multi_coil_root_sum_of_squares_is_non_central_chi(coils: int) -> None:
    sigma = 2.0
    rng = np.random.default_rng(coils)
    floor = mr.add_mr_noise(np.zeros((384, 384), np.float32), sigma, rng, coils=coils)
    # Zero signal: a central chi with 2N degrees of freedom, scaled by sigma.
    assert float(floor.mean()) == pytest.approx(sigma * stats.chi(2 * coils).mean(), rel=0.01)
    # With signal A: E[M^2] = A^2 + 2 N sigma^2 (the non-central chi's second moment).
    a = 5.0
    m = mr.add_mr_noise(np.full((384, 384), a, np.float32), sigma, rng, coils=coils)
    assert float((m.astype(np.float64) ** 2).mean()) == pytest.approx(a * a + 2 * coils * sigma**2, rel=0.01)


def test_phase_does_not_change_the_magnitude_statistics() -> None:
    clean = np.full((256, 256), 10.0, np.float32)
    phase = mr.smooth_phase(clean.shape, np.random.default_rng(3), max_cycles=2.0)
    assert float(np.ptp(phase)) > 2 * np.pi  # a real ramp, not a constant
    a = mr.add_mr_noise(clean, 4.0, np.random.default_rng(4), phase=phase)
    b = mr.add_mr_noise(clean, 4.0, np.random.default_rng(5))
    assert float(a.mean()) == pytest.approx(float(b.mean()), rel=0.01)
    assert float(a.std()) == pytest.approx(float(b.std()), rel=0.02)


def test_sigma_fractions_cover_the_range_log_uniformly() -> None:
    rng = np.random.default_rng(0)
    draws = np.array([mr.draw_sigma_fraction((0.01, 0.16), rng) for _ in range(4000)])
    assert draws.min() >= 0.01 and draws.max() <= 0.16
    assert draws.min() < 0.0105 and draws.max() > 0.15
    assert float(np.median(draws)) == pytest.approx(0.04, rel=0.05)  # geometric mean: log-uniform
    with pytest.raises(ValueError):
        mr.draw_sigma_fraction((0.1, 0.05), rng)


def _groups(vol: np.ndarray) -> dict:
    return {"s1": {"f1": [mr.MRVolume("phantom", vol)]}}


@pytest.mark.parametrize("context", [0, 1, 2])
def test_dataset_items_have_the_neighbouring_slices(context: int) -> None:
    vol = _phantom()
    ds = mr.MRPairs(_groups(vol), 32, 50, context=context, sigma_range=(1e-6, 1e-6), augment=False, phase=False)
    for i in range(10):
        x, y = ds[i]
        assert x.shape == (2 * context + 1, 32, 32) and y.shape == (1, 32, 32)
        assert x.dtype == torch.float32 and y.dtype == torch.float32
        # Almost no noise: the centre channel is the target; neighbours are other slices (brightness differs).
        torch.testing.assert_close(x[context], y[0], atol=1e-3, rtol=0)
    # Deterministic in (seed, index).
    torch.testing.assert_close(ds[7][0], ds[7][0])


def test_dataset_noise_level_follows_the_foreground_level_and_keeps_bright_values() -> None:
    vol = _phantom(slices=4, size=64)
    level = mr.foreground_level(vol)
    ds = mr.MRPairs(_groups(vol), 64, 40, context=1, sigma_range=(0.05, 0.05), augment=False, phase=False)
    ratios, tops = [], []
    for i in range(40):
        x, y = ds[i]
        mask = (y[0] > 0.5 * float(y[0].max() / 4)).numpy()  # the object, where the noise is near Gaussian
        scale_sd = float((x[1] - y[0]).numpy()[mask].std())
        ratios.append(scale_sd)
        tops.append(float(y.max()))
    # Normalised noise SD = 0.05 * level / scale, scale = p99.5 - p0.5 of the noisy slice (about the disc's value):
    # the same for every item (one sigma); the vessel above the percentile is not clipped at 1.
    assert np.std(ratios) / np.mean(ratios) < 0.1
    assert 0.05 * level / 600 < np.mean(ratios) < 0.05 * level / 350
    assert max(tops) > 1.0


def test_subject_split_keeps_subjects_apart() -> None:
    subjects = {"volunteer": ["t1", "bold"], "phantom": ["acr"]}
    split = mr.check_subject_split(subjects, ["t1", "other"], ["val"], ["acr"])
    assert split == {"train": ["volunteer", "other"], "validation": ["val"], "evaluation": ["phantom"]}
    with pytest.raises(ValueError, match="volunteer"):
        mr.check_subject_split(subjects, ["t1"], [], ["bold"])  # BOLD repeats are the T1's subject


def test_bundled_config_holds_out_a_brain_and_the_phantom() -> None:
    cfg = load_config(PROJECT / "training" / "configs" / "mr-cnn.toml")
    settings = mr.recipe_settings(cfg)
    split = mr.check_subject_split(settings["subjects"], cfg.data.train, cfg.data.validation, cfg.evaluate.data)
    assert "acr-phantom" in split["evaluation"] and "vs-seg-001" in split["evaluation"]
    assert not set(split["train"]) & set(split["evaluation"])
    assert settings["context"] == 1 and cfg.model.arguments["in_channels"] == 3


def test_tiny_training_run_exports_a_context_model_and_evaluates(tmp_path: Path) -> None:
    import SimpleITK as sitk

    from models.folder import load_model_folder
    from training.loops import train

    for name, seed in (("a", 0), ("b", 1)):
        vol = _phantom(slices=5, size=64) + np.random.default_rng(seed).normal(0, 2, (5, 64, 64)).astype(np.float32)
        sitk.WriteImage(sitk.GetImageFromArray(np.abs(vol).astype(np.int16)), str(tmp_path / f"{name}.nii.gz"))
    cfg = config_from_dict(
        {
            "name": "mr-tiny",
            "modality": "MR",
            "model": {
                "architecture": "unet-res-small",
                "arguments": {"in_channels": 3, "out_channels": 1, "channels": [8, 16, 16]},
            },
            "data": {
                "root": str(tmp_path),
                "train": ["a.nii.gz"],
                "validation": ["b.nii.gz"],
                "patch": 32,
                "batch": 2,
                "validation_patches": 2,
                "workers": 0,
            },
            "noise": {"kind": "mr", "sigma_range": [0.02, 0.1]},
            "recipe": {"context": 1, "coils": [1, 4], "subjects": {"s-a": ["a.nii.gz"], "s-b": ["b.nii.gz"]}},
            "train": {"steps": 2, "warmup": 1, "threads": 1, "validate_every": 2, "checkpoint_every": 0},
        }
    )
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.model_dir is not None  # the run finished, so it exported a model
    loaded = load_model_folder(result.model_dir)
    assert loaded.card.context == 1 and loaded.card.samples_per_pixel == 1 and loaded.card.modalities == ["MR"]
    metrics = mr.evaluate(
        result.model_dir,
        [str(tmp_path / "b.nii.gz")],
        tmp_path / "eval",
        max_images=1,
        baselines=("nlm",),
        sigma_fractions=(0.05,),
        cache_dir=tmp_path / "cache",
        write_card=True,
    )
    assert {r["method"] for r in metrics["rows"]} == {"input", "model", "nlm"}
    assert (tmp_path / "eval" / "table.md").read_text().count("| b |") == 3
    assert "b-sigma0_05" in load_model_folder(result.model_dir).card.metrics


def test_bold_repeats_are_separate_volumes(shared_data: Path) -> None:
    volumes = mr.read_mr_volumes(shared_data / "mr" / "siemens-xa30-bold-enhanced")
    assert len(volumes) == 20
    assert {v.volume.shape for v in volumes} == {(33, 64, 64)}
