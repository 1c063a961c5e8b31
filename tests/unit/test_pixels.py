"""Stored values <-> physical units <-> network inputs, and applying a residual."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dicom_node.denoise.errors import SeriesRefused
from dicom_node.denoise.pixels import (
    PixelFormat,
    apply_residual,
    physical_to_stored,
    scaling_for,
    stored_to_physical,
)
from models.folder import Normalization

BITS = [(8, 8), (8, 7), (16, 10), (16, 12), (16, 16)]
RESCALES = [(1.0, 0.0), (1.0, -1024.0), (3.774114, 0.000061), (0.25, 10.5), (9.570207, -19595.0), (-1.0, 100.0)]


def every_value(fmt: PixelFormat) -> np.ndarray:
    lo, hi = fmt.stored_range
    return np.arange(lo, hi + 1, dtype=np.int64).astype(fmt.dtype)


@pytest.mark.parametrize("bits_allocated,bits_stored", BITS)
@pytest.mark.parametrize("signed", [0, 1])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("slope,intercept", RESCALES)
def test_stored_physical_round_trip_is_exact(bits_allocated: int, bits_stored: int, signed: int, photometric: str,
                                             slope: float, intercept: float) -> None:
    fmt = PixelFormat(bits_allocated, bits_stored, signed, photometric, slope, intercept)
    stored = every_value(fmt)
    back = physical_to_stored(stored_to_physical(stored, fmt), fmt)
    assert back.dtype == fmt.dtype
    np.testing.assert_array_equal(back, stored)


@pytest.mark.parametrize("bits_allocated,bits_stored", BITS)
@pytest.mark.parametrize("signed", [0, 1])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("mode", ["fixed", "per-image"])
def test_zero_residual_gives_back_every_stored_value(bits_allocated: int, bits_stored: int, signed: int,
                                                     photometric: str, mode: str) -> None:
    fmt = PixelFormat(bits_allocated, bits_stored, signed, photometric, 1.5, -7.0)
    stored = every_value(fmt)
    physical = stored_to_physical(stored, fmt)
    norm = Normalization(input_unit="modality", mode=mode, offset=3.0, scale=40.0, clip=[-50.0, 4000.0])
    scaling = scaling_for(physical, fmt, norm)
    x = scaling.to_network(physical)
    out = apply_residual(stored, np.zeros_like(x), scaling, fmt, strength=1.0)
    np.testing.assert_array_equal(out, stored)
    assert out.dtype == fmt.dtype


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_residual_moves_physical_values_the_right_way(photometric: str) -> None:
    fmt = PixelFormat(16, 12, 0, photometric, 2.0, -100.0)
    stored = np.full((4, 4), 1000, dtype=fmt.dtype)
    physical = stored_to_physical(stored, fmt)
    norm = Normalization(input_unit="modality", mode="fixed", offset=0.0, scale=100.0)
    scaling = scaling_for(physical, fmt, norm)
    x = scaling.to_network(physical)
    # the network lowers its input by 0.1: in MONOCHROME2 that is -10 physical units, -5 stored values;
    # in MONOCHROME1 the network sees an inverted image, so its -0.1 raises the stored values.
    out = apply_residual(stored, np.full_like(x, -0.1), scaling, fmt)
    expected = 995 if photometric == "MONOCHROME2" else 1005
    assert (out == expected).all()


def test_monochrome1_inversion_keeps_fixed_offsets_meaningful() -> None:
    fmt = PixelFormat(16, 10, 0, "MONOCHROME1")
    norm = Normalization(input_unit="modality", mode="fixed", offset=0.0, scale=1023.0)
    stored = np.array([[0, 1023]], dtype=fmt.dtype)
    x = scaling_for(stored_to_physical(stored, fmt), fmt, norm).to_network(stored_to_physical(stored, fmt))
    np.testing.assert_allclose(x, [[1.0, 0.0]])  # stored 0 is the brightest in MONOCHROME1


def test_strength_blends_and_clips() -> None:
    fmt = PixelFormat(16, 12, 0, "MONOCHROME2", 1.0, 0.0)
    stored = np.array([[100, 4090]], dtype=fmt.dtype)
    physical = stored_to_physical(stored, fmt)
    scaling = scaling_for(physical, fmt, Normalization(input_unit="modality", offset=0.0, scale=1.0))
    res = np.array([[-40.0, 40.0]], dtype=np.float32)
    np.testing.assert_array_equal(apply_residual(stored, res, scaling, fmt, 0.0), stored)
    np.testing.assert_array_equal(apply_residual(stored, res, scaling, fmt, 0.5), [[80, 4095]])
    np.testing.assert_array_equal(apply_residual(stored, res, scaling, fmt, 1.0), [[60, 4095]])
    with pytest.raises(ValueError):
        apply_residual(stored, res, scaling, fmt, 1.5)


def test_padding_is_untouched_and_not_fed_raw() -> None:
    fmt = PixelFormat(16, 16, 1, "MONOCHROME2", 1.0, 0.0, "HU", padding_value=-2000)
    stored = np.array([[-2000, 40], [-2000, 50]], dtype=fmt.dtype)
    mask = fmt.padding_mask(stored)
    assert mask is not None and mask.sum() == 2
    physical = stored_to_physical(stored, fmt)
    norm = Normalization(input_unit="HU", offset=0.0, scale=1000.0, clip=[-1024.0, 3071.0])
    scaling = scaling_for(physical, fmt, norm, mask)
    x = scaling.to_network(physical, mask)
    assert x.min() >= -1.024 - 1e-6
    out = apply_residual(stored, np.full(x.shape, 0.5, np.float32), scaling, fmt, mask=mask)
    assert out[0, 0] == -2000 and out[1, 0] == -2000
    assert out[0, 1] == 540


def test_padding_range_limit() -> None:
    fmt = PixelFormat(16, 12, 0, padding_value=0, padding_limit=10)
    mask = fmt.padding_mask(np.array([0, 5, 10, 11], dtype=np.uint16))
    np.testing.assert_array_equal(mask, [True, True, True, False])


@pytest.mark.parametrize("kwargs,match", [
    ({"photometric": "RGB"}, "RGB with 1 samples per pixel is not valid"),
    ({"photometric": "MONOCHROME2", "samples_per_pixel": 3}, "MONOCHROME2 with 3 samples per pixel"),
    ({"photometric": "YBR_FULL_422"}, "not supported"),  # the engine's pixels are grey or RGB, never YBR
    ({"bits_allocated": 32, "bits_stored": 32}, "BitsAllocated 32"),
    ({"bits_stored": 17}, "BitsStored 17"),
    ({"slope": 0.0}, "rescale slope"),
])
def test_unsupported_formats_are_refused(kwargs: dict[str, Any], match: str) -> None:
    base: dict[str, Any] = dict(bits_allocated=16, bits_stored=12, pixel_representation=0, photometric="MONOCHROME2")
    base.update(kwargs)
    with pytest.raises(SeriesRefused, match=match):
        PixelFormat(**base)



@pytest.mark.parametrize("written,unit,quirk", [
    (None, "HU", None),
    ("", "HU", None),
    ("HU", "HU", None),
    ("Houndsfield Unit", "HU", "Houndsfield Unit"),  # GE LightSpeed reformats (COVID-19-NY-SBU)
    ("HOUNSFIELD UNITS", "HU", "HOUNSFIELD UNITS"),
    ("hu", "HU", "hu"),
    ("US", "US", None),  # unspecified: not Hounsfield units, a HU model must refuse it
    ("OD", "OD", None),
    ("Hounsfield-ish", "Hounsfield-ish", None),
])
def test_ct_rescale_unit_reads_spellings_of_hounsfield_units(written: str | None, unit: str, quirk: str | None) -> None:
    from dicom_node.denoise.pixels import ct_rescale_unit

    assert ct_rescale_unit(written) == (unit, quirk)


def _ct_slice(rescale_type: str | None, series_uid: str, number: int):
    from tests.fixtures.images import make_image

    ds = make_image(np.full((8, 8), 1000, np.int16), series_uid=series_uid, study_uid="1.2.3",
                    frame_of_reference_uid="1.2.3.4", position=(0.0, 0.0, float(number)), instance_number=number)
    if rescale_type is not None:
        ds.RescaleType = rescale_type
    return ds


def test_misspelt_hounsfield_series_fits_a_hu_model_and_is_logged_once(tmp_path, caplog) -> None:
    """22 real GE slices write RescaleType 'Houndsfield Unit'; the node refused them ("expects Hounsfield units")."""
    import logging

    from dicom_node.denoise.engine import series_unit
    from dicom_node.denoise.series import scan

    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(3):
        _ct_slice("Houndsfield Unit", "1.2.3.5", k + 1).save_as(folder / f"{k}.dcm", enforce_file_format=True)
    with caplog.at_level(logging.WARNING, logger="dicom_node.denoise.series"):
        (series,) = scan([folder]).series
    assert series_unit(series) == "HU"
    quirk_logs = [r for r in caplog.records if "RescaleType" in r.getMessage()]
    assert len(quirk_logs) == 1 and "'Houndsfield Unit'" in quirk_logs[0].getMessage()
    assert quirk_logs[0].levelno == logging.WARNING
    card = _hu_card()
    card.check_fits("CT", series_unit(series))  # no ModelMismatch


def test_ct_series_in_another_unit_is_still_refused_by_a_hu_model(tmp_path) -> None:
    from dicom_node.denoise.engine import series_unit
    from dicom_node.denoise.series import scan
    from models.folder import ModelMismatch

    folder = tmp_path / "series"
    folder.mkdir()
    _ct_slice("US", "1.2.3.6", 1).save_as(folder / "0.dcm", enforce_file_format=True)
    (series,) = scan([folder]).series
    with pytest.raises(ModelMismatch, match="rescale type is US"):
        _hu_card().check_fits("CT", series_unit(series))


def _hu_card():
    from models.folder import ModelCard

    return ModelCard(name="hu", version="1", architecture="unet-res", modalities=["CT"],
                     normalization=Normalization(input_unit="HU", mode="fixed", offset=0.0, scale=1000.0))


@pytest.mark.parametrize("photometric,samples,bits,source", [
    ("RGB", 3, 8, None), ("YBR_FULL_422", 3, 8, "YBR_FULL_422"), ("YBR_FULL", 3, 8, "YBR_FULL"),
    ("PALETTE COLOR", 1, 16, "PALETTE COLOR"), ("PALETTE COLOR", 1, 8, "PALETTE COLOR"),
])
def test_colour_sources_get_the_rgb_format_they_decode_to(photometric: str, samples: int, bits: int,
                                                           source: str | None) -> None:
    from pydicom.dataset import Dataset

    from dicom_node.denoise.pixels import pixel_format_from_dataset

    ds = Dataset()
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    ds.BitsAllocated = ds.BitsStored = bits
    ds.PixelRepresentation = 0
    fmt = pixel_format_from_dataset(ds)
    assert (fmt.photometric, fmt.samples_per_pixel, fmt.bits_allocated, fmt.bits_stored) == ("RGB", 3, 8, 8)
    assert fmt.source_photometric == source and fmt.is_colour
    assert fmt.grey().photometric == "MONOCHROME2" and not fmt.grey().is_colour


def test_tissue_regions_and_grey_pixels() -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from dicom_node.denoise.pixels import grey_pixel_mask, tissue_region_mask

    def region(kind: int, x0: int, y0: int, x1: int, y1: int) -> Dataset:
        item = Dataset()
        item.RegionDataType = kind
        item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
        item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
        return item

    ds = Dataset()
    assert tissue_region_mask(ds, 4, 6) is None  # no regions: the whole image may change
    ds.SequenceOfUltrasoundRegions = Sequence([region(1, 1, 0, 2, 1), region(3, 0, 2, 5, 3)])  # tissue, spectral
    mask = tissue_region_mask(ds, 4, 6)
    assert mask is not None
    assert mask.sum() == 4 and mask[0:2, 1:3].all()  # the Max corners are inclusive
    ds.SequenceOfUltrasoundRegions = Sequence([region(3, 0, 0, 5, 3)])
    assert not tissue_region_mask(ds, 4, 6).any()  # regions but no tissue: nothing may change
    rgb = np.array([[[10, 10, 10], [10, 18, 12], [200, 60, 0]]], np.uint8)
    np.testing.assert_array_equal(grey_pixel_mask(rgb), [[True, True, False]])
