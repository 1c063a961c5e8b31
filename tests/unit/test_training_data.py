"""Datasets: reading DICOM into physical units, series-level splits, patches and augmentation, pairs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from training.data import (
    NoiseSettings,
    NoisyCache,
    RealPairs,
    SelfSupervisedPairs,
    SimulatedPairs,
    augment,
    ct_normalization,
    match_slices,
    per_image_normalization,
    read_one_series,
    read_series,
    split_by_series,
)
from training.loops import neighbor_masks, subsample
from training.synthetic import head_phantom, write_series

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tiny")
    vol = head_phantom(64, 3, seed=0)
    return {
        "a": write_series(root / "a", vol, thickness=2.0),
        "b": write_series(root / "b", head_phantom(64, 3, seed=1), thickness=2.0),
        "vol": vol,
    }


def test_read_series_gives_hu_sorted_by_position(tiny, tmp_path):
    series = read_one_series(tiny["a"])
    assert series.modality == "CT"
    assert series.volume.shape == (3, 64, 64)
    np.testing.assert_allclose(series.volume, np.round(tiny["vol"]), atol=0.5)
    assert list(series.positions) == sorted(series.positions)
    assert series.pixel_mm == pytest.approx(0.5)
    # Files in reverse name order still come back sorted by position.
    for i, f in enumerate(sorted(tiny["a"].iterdir())):
        (tmp_path / f"{9 - i}.dcm").write_bytes(f.read_bytes())
    again = read_one_series(tmp_path)
    np.testing.assert_array_equal(again.volume, series.volume)


def test_read_series_decodes_compressed_real_files(shared_data):
    series = read_series(shared_data / "xr" / "wg04-cr-tibia-RG3-jpegls.dcm")
    assert len(series) == 1 and series[0].volume.shape == (1, 1760, 1760)
    assert series[0].inverted  # MONOCHROME1 is inverted so that bright = more signal
    mr = read_one_series(shared_data / "mr" / "siemens-xa30-t1-enhanced")
    assert mr.volume.shape == (96, 128, 128)


def test_split_is_by_series(tiny):
    all_series = read_series(tiny["a"]) + read_series(tiny["b"])
    train, val = split_by_series(all_series, ["b"])
    assert [s.name for s in train] == ["a"] and [s.name for s in val] == ["b"]
    assert not {s.uid for s in train} & {s.uid for s in val}


def test_augment_applies_the_same_transform_to_both():
    rng = np.random.default_rng(0)
    x = torch.arange(16.0).view(1, 4, 4)
    seen = set()
    for _ in range(40):
        a, b = augment((x, x.clone()), rng)
        assert torch.equal(a, b)
        seen.add(tuple(a.flatten().tolist()))
    assert len(seen) == 8  # 4 rotations x 2 flips


def test_simulated_pairs_are_deterministic_and_noisy(tiny):
    series = read_series(tiny["a"])
    settings = NoiseSettings(kind="ct", flux=2e4, n_views=60, dose_range=(0.25, 0.25), realisations=1)
    cache = NoisyCache(series, settings, progress=False)
    ds = SimulatedPairs(series, cache, patch=32, length=10, normalisation=ct_normalization(), seed=3)
    x1, y1 = ds[4]
    x2, y2 = ds[4]
    assert x1.shape == (1, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert float((x1 - y1).abs().mean()) > 0  # the input carries noise the target does not
    assert not torch.equal(ds[5][0], x1)


def test_noisy_cache_on_disk_gives_the_same_slices(tiny, tmp_path):
    series = read_series(tiny["a"])
    settings = NoiseSettings(kind="ct", flux=2e4, n_views=60, realisations=1)
    first = NoisyCache(series, settings, progress=False, cache_dir=tmp_path)
    second = NoisyCache(series, settings, progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    for (s1, k1, v1), (s2, k2, v2) in zip(first.entries, second.entries):
        assert (s1, k1) == (s2, k2)
        np.testing.assert_array_equal(v1[0], v2[0])


def test_real_pairs_match_by_position_and_refuse_other_grids(tiny, tmp_path):
    low = read_one_series(tiny["a"])
    full = read_one_series(tiny["b"])
    assert match_slices(low, full) == [(0, 0), (1, 1), (2, 2)]
    ds = RealPairs([(low, full)], patch=32, length=4, normalisation=ct_normalization())
    x, y = ds[0]
    assert x.shape == y.shape == (1, 32, 32)
    other = read_one_series(write_series(tmp_path / "c", head_phantom(64, 2), pixel_mm=0.7))
    with pytest.raises(ValueError, match="pixel grid"):
        match_slices(low, other)


def test_self_supervised_noise2sim_pairs_neighbouring_slices(tiny):
    series = read_series(tiny["a"])
    ds = SelfSupervisedPairs(series, patch=32, length=6, normalisation=per_image_normalization(),
                             method="noise2sim", augment=False)
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and not torch.equal(x, y)


def test_neighbor2neighbor_subsampling_takes_adjacent_pixels_of_each_cell():
    gen = torch.Generator().manual_seed(0)
    image = torch.arange(64.0).view(1, 1, 8, 8)
    first, second = neighbor_masks((1, 4, 4), gen)
    g1, g2 = subsample(image, first), subsample(image, second)
    assert g1.shape == g2.shape == (1, 1, 4, 4)
    for i in range(4):
        for j in range(4):
            a, b = int(g1[0, 0, i, j]), int(g2[0, 0, i, j])
            ya, xa, yb, xb = a // 8, a % 8, b // 8, b % 8
            assert (ya // 2, xa // 2) == (yb // 2, xb // 2) == (i, j)  # same 2x2 cell
            assert abs(ya - yb) + abs(xa - xb) == 1  # edge neighbours


@pytest.mark.parametrize("rescale_type,kept", [("Houndsfield Unit", True), ("HU", True), ("US", False)])
def test_read_series_accepts_misspelt_hounsfield_units_and_logs_once(tiny, tmp_path, caplog, rescale_type, kept):
    import logging

    import pydicom

    for f in sorted(tiny["a"].iterdir()):
        ds = pydicom.dcmread(f)
        ds.RescaleType = rescale_type
        ds.save_as(tmp_path / f.name)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        found = read_series(tmp_path)
    assert len(found) == (1 if kept else 0)
    quirks = [r for r in caplog.records if "read as HU" in r.getMessage()]
    assert len(quirks) == (1 if rescale_type == "Houndsfield Unit" else 0)
    if kept:
        np.testing.assert_allclose(found[0].volume, np.round(tiny["vol"]), atol=0.5)


def test_flux_calibrates_on_a_single_slice_series(tiny):
    """The body CT of COVID-19-NY-SBU comes as single-slice series; calibration indexed past the only slice."""
    from training.data import calibrate_series_flux

    series = read_one_series(tiny["a"])
    one = type(series)(uid=series.uid, modality="CT", volume=series.volume[1:2], pixel_mm=series.pixel_mm,
                       positions=series.positions[1:2], thickness=series.thickness, source=series.source)
    flux, measured, simulated = calibrate_series_flux(one, NoiseSettings(n_views=90))
    assert flux > 0 and measured > 0 and simulated > 0
