"""read_frames reads uncompressed pixel data straight from the file: it must give what pydicom's decoder gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from dicom_node.denoise import series as series_module
from dicom_node.denoise.errors import SeriesRefused
from dicom_node.denoise.pixels import clean_stored
from dicom_node.denoise.series import read_frames, read_instance_header
from tests.fixtures.images import make_image, make_multiframe


def _pydicom_frames(path: Path) -> np.ndarray:
    inst = read_instance_header(path)
    arr = pydicom.dcmread(path).pixel_array
    return clean_stored(arr.reshape(inst.frames, *inst.shape), inst.formats[0])


def _check_same_as_pydicom(path: Path, expect_fast: bool | None = True) -> None:
    # Both fast paths: from the offset and raw elements the scan kept, and from a fresh header parse.
    for keep_scan in (True, False):
        inst = read_instance_header(path)
        assert inst.pixel_offset is not None and inst.raw_elements is not None
        if not keep_scan:
            inst.raw_elements = inst.pixel_offset = None
        fast = series_module._read_native(inst)
        if expect_fast is not None:
            assert (fast is not None) == expect_fast
        ds, stored = read_frames(inst)
        reference = _pydicom_frames(path)
        assert stored.dtype == reference.dtype and np.array_equal(stored, reference)
        full = pydicom.dcmread(path)
        for elem in full:  # every element but the pixels, as pydicom reads them
            if elem.tag != 0x7FE00010:
                assert ds[elem.tag].value == elem.value, elem.keyword
        # What a derived instance is built from: the encoding it was read in, and the file meta.
        assert tuple(ds.original_encoding) == tuple(full.original_encoding)
        assert ds.original_character_set == full.original_character_set
        assert ds.file_meta == full.file_meta


@pytest.mark.parametrize(("dtype", "bits_stored", "shape"), [
    (np.int16, 16, (16, 12)), (np.uint16, 12, (9, 7)), (np.int16, 12, (10, 10)), (np.uint8, 8, (5, 7)),
    (np.int8, 6, (3, 5)),
])
def test_native_files_read_as_pydicom_decodes_them(tmp_path: Path, dtype: type, bits_stored: int,
                                                   shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    # Values over the whole allocated range: bits above BitsStored must be dropped (and signs extended) as
    # pydicom's decoder does.
    pixels: np.ndarray = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    ds = make_image(pixels, bits_stored=bits_stored, slope=None)
    path = tmp_path / "explicit.dcm"
    ds.save_as(path, enforce_file_format=True)
    _check_same_as_pydicom(path)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = tmp_path / "implicit.dcm"
    ds.save_as(implicit, implicit_vr=True, little_endian=True, enforce_file_format=True)
    _check_same_as_pydicom(implicit)


def test_multiframe_and_trailing_elements(tmp_path: Path) -> None:
    volume = np.random.default_rng(4).integers(0, 4000, size=(3, 8, 6)).astype(np.uint16)
    path = tmp_path / "mf.dcm"
    make_multiframe(volume).save_as(path, enforce_file_format=True)
    _check_same_as_pydicom(path)
    # Pixel data followed by another element: pydicom reads the whole file, so nothing after the pixels is lost.
    ds = make_image(volume[0])
    ds.DataSetTrailingPadding = b"\x00" * 4
    padded = tmp_path / "padded.dcm"
    ds.save_as(padded, enforce_file_format=True)
    _check_same_as_pydicom(padded, expect_fast=False)
    assert "DataSetTrailingPadding" in read_frames(read_instance_header(padded))[0]


def test_truncated_pixel_data_is_refused_with_pydicoms_reason(tmp_path: Path) -> None:
    path = tmp_path / "short.dcm"
    make_image(np.zeros((16, 16), np.int16)).save_as(path, enforce_file_format=True)
    inst = read_instance_header(path)
    path.write_bytes(path.read_bytes()[:-100])
    assert series_module._read_native(inst) is None
    with pytest.raises(SeriesRefused, match="pixel data"):
        read_frames(inst)


def test_real_files_read_as_pydicom_decodes_them(shared_data: Path) -> None:
    checked = 0
    for folder in sorted(p for p in (shared_data / "ct").iterdir() if p.is_dir()) + \
            sorted(p for p in (shared_data / "mr").iterdir() if p.is_dir()):
        for path in sorted(f for f in folder.rglob("*") if f.is_file())[:2]:
            try:
                read_instance_header(path)
            except Exception:  # noqa: BLE001 - licence texts and other non-image files
                continue
            ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
            _check_same_as_pydicom(path, expect_fast=not ts.is_compressed)
            checked += 1
    for path in sorted((shared_data / "interop" / "wg04" / "REF").iterdir())[:6]:
        try:
            read_instance_header(path)
        except SeriesRefused:  # colour images: not denoisable
            continue
        _check_same_as_pydicom(path, expect_fast=None)  # some carry elements after the pixel data
        checked += 1
    assert checked >= 8


def test_derived_file_is_the_same_whichever_way_the_source_was_read(tmp_path: Path) -> None:
    import datetime

    from dicom_node.denoise.derived import DerivationInfo, build_derived_instance
    from dicom_node.encoding import encode_file
    from tests.fixtures.synthetic import make_ct_series

    info = DerivationInfo(series_instance_uid="1.2.826.0.1.3680043.8.498.1", model_name="m", model_version="1",
                          model_sha256="0" * 64, created=datetime.datetime(2026, 1, 2, 3, 4, 5))
    for path in make_ct_series(tmp_path / "ct", n_slices=3, rows=32, cols=32):
        encoded = []
        for keep_scan in (True, False):
            inst = read_instance_header(path)
            if not keep_scan:
                inst.raw_elements = inst.pixel_offset = None
            ds, stored = read_frames(inst)
            encoded.append(encode_file(build_derived_instance(ds, stored[0], inst.formats[0], info)))
        assert encoded[0] == encoded[1]


def test_colour_files_read_as_rgb(shared_data: Path) -> None:
    """RGB as pydicom decodes it; a palette (8- or 16-bit, uncompressed: never the grey fast path) looked up into
    8-bit RGB; frames first, samples last."""
    from pydicom.pixels import apply_color_lut

    for name in ("US1_UNC.dcm", "OBXXXX1A.dcm", "gdcm-US-ALOKA-16.dcm"):
        path = shared_data / "us" / "dicom" / name
        inst = read_instance_header(path)
        assert series_module._read_native(inst) is None
        _ds, stored = read_frames(inst)
        full = pydicom.dcmread(path)
        expected = full.pixel_array
        if full.PhotometricInterpretation == "PALETTE COLOR":
            expected = (apply_color_lut(expected, full) >> 8).astype(np.uint8)
        assert stored.dtype == np.uint8 and stored.shape == (1, full.Rows, full.Columns, 3)
        np.testing.assert_array_equal(stored[0], expected)
