"""Low-contrast detectability (training.detectability): the model observer and its confidence intervals on a small
water phantom, with an identity "denoiser" (nothing changes) and a heavy blur (the discs fade)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from training.detectability import Insert, LCDSettings, disc, dprime, run_slice, summarise, table_markdown

torch.set_num_threads(1)

PIXEL_MM = 1.5


def water_phantom(size: int = 160) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot((yy - (size - 1) / 2) / 0.8, xx - (size - 1) / 2)
    return np.where(r < 0.45 * size, 40.0, -1000.0).astype(np.float32)


@pytest.fixture(scope="module")
def settings() -> LCDSettings:
    return LCDSettings(inserts=[Insert(10.0, 20.0), Insert(6.0, 20.0)], doses=(0.25,), realisations=100,
                       window_px=24, roi_mm=18.0, bootstrap=300, kernel="ge-standard", seed=7)


def test_disc_covers_its_area() -> None:
    d = disc((41, 41), (20.0, 20.0), 20.0)
    assert d.sum() == pytest.approx(np.pi * 10 ** 2, rel=0.01)
    assert d.max() == 1.0 and d[0, 0] == 0.0


def test_dprime_of_separated_gaussians() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 20000), rng.normal(2, 1, 20000)
    assert dprime(b, a) == pytest.approx(2.0, abs=0.05)


def test_identity_denoiser_keeps_detectability_and_contrast(settings: LCDSettings) -> None:
    result = run_slice(water_phantom(), PIXEL_MM, lambda w: w.copy(), settings, flux=2e5, name="water")
    for row in result["rows"]:
        assert row["realisations"] == 100
        assert row["dprime_input"] > 1.0  # the discs are detectable in the noisy input
        assert row["dprime_ratio"] == pytest.approx(1.0)
        lo, hi = row["dprime_ratio_ci95"]
        assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)  # paired: the same images
        assert row["contrast_input"] == pytest.approx(1.0, abs=0.2)
        assert row["contrast_ratio_to_input"] == pytest.approx(1.0)
        assert row["dprime_kept"] and row["contrast_kept"]
        lo_in, hi_in = row["dprime_input_ci95"]
        assert lo_in < row["dprime_input"] < hi_in
    assert summarise([result], settings)["passes"]


def test_heavy_blur_loses_contrast_and_is_reported(settings: LCDSettings) -> None:
    def blur(windows: np.ndarray) -> np.ndarray:
        return np.stack([ndimage.gaussian_filter(w, 4.0, mode="nearest") for w in windows])

    result = run_slice(water_phantom(), PIXEL_MM, blur, settings, flux=2e5, name="water")
    for row in result["rows"]:
        assert row["contrast_model"] < 0.8, row
        assert not row["contrast_kept"]
        assert row["contrast_input"] == pytest.approx(1.0, abs=0.2)
    summary = summarise([result], settings)
    assert not summary["passes"] and not summary["per_dose"][0.25]["passes"]
    assert "no: " in table_markdown([result]) and "contrast" in table_markdown([result])
