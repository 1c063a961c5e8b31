"""The structural check accepts real files and finds each kind of breakage pydicom reads past."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import UID

from dicom_node.receive.dataset_check import MalformedDataset, check_dataset_structure, inflate
from tests import malformed
from tests.fixtures.synthetic import make_ct_series
from tests.helpers import pydicom_test_file


def split_file(path: Path) -> tuple[bytes, UID]:
    raw = Path(path).read_bytes()
    fp = io.BytesIO(raw)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return raw[fp.tell():], UID(meta.TransferSyntaxUID)


@pytest.fixture(scope="module")
def ct_body(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = make_ct_series(tmp_path_factory.mktemp("ct"), n_slices=1, rows=64, cols=64)[0]
    return malformed.encode_dataset(dcmread(path))


@pytest.mark.parametrize("name", [
    "CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "rtplan.dcm", "JPEG2000.dcm",
    "image_dfl.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "nested_priv_SQ.dcm",
])
def test_wellformed_pydicom_files_pass(name: str) -> None:
    body, ts = split_file(pydicom_test_file(name))
    if ts == "1.2.840.10008.1.2.1.99":
        body = inflate(body)
    assert check_dataset_structure(body, ts.is_implicit_VR, ts.is_little_endian) >= 3


def test_real_shared_files_pass(shared_data: Path) -> None:
    # Every DICOM file of the shared data: the PNG/JPEG/NIfTI/NRRD images and the CSV beside them are not DICOM.
    not_dicom = {".md", ".png", ".jpg", ".jpeg", ".gz", ".nii", ".nrrd", ".csv", ".txt"}
    files = [p for p in shared_data.rglob("*")
             if p.is_file() and p.suffix.lower() not in not_dicom and p.name != "DIRFILE"]
    assert len(files) > 1500
    for path in files:
        body, ts = split_file(path)
        if ts == "1.2.840.10008.1.2.1.99":
            body = inflate(body)
        check_dataset_structure(body, ts.is_implicit_VR, ts.is_little_endian)


def test_synthetic_body_passes(ct_body: bytes) -> None:
    assert check_dataset_structure(ct_body, False, True) > 40


@pytest.mark.parametrize("breaker,message", [
    (malformed.truncated, "declares"),
    (malformed.huge_length, "declares 4294967280 bytes"),
    (malformed.garbage_after_preamble, "declares|runs past|outside"),
    (malformed.wrong_vr, "unknown VR"),
])
def test_broken_bodies_are_refused(ct_body: bytes, breaker, message: str) -> None:
    with pytest.raises(MalformedDataset, match=message):
        check_dataset_structure(breaker(ct_body), False, True)


def test_header_cut_short_and_undefined_length_without_delimiter(ct_body: bytes) -> None:
    with pytest.raises(MalformedDataset, match="runs past the end"):
        check_dataset_structure(ct_body + b"\x08\x00", False, True)
    # A sequence of undefined length that never ends.
    seq = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    with pytest.raises(MalformedDataset, match="delimiter"):
        check_dataset_structure(seq, False, True)


def test_pydicom_truncated_test_files_are_refused() -> None:
    body, ts = split_file(pydicom_test_file("rtplan_truncated.dcm"))
    with pytest.raises(MalformedDataset):
        check_dataset_structure(body, ts.is_implicit_VR, ts.is_little_endian)


def test_bad_deflate_is_refused() -> None:
    with pytest.raises(MalformedDataset, match="inflate"):
        inflate(b"this is not deflate data")
