"""The DICOM byte format written by hand (dicom_node.encoding) is byte for byte what pydicom writes.

The command sets of the C-STORE request and response are compared with pynetdicom's in test_dimse_fast_path.py,
whole derived files with ``save_as`` in test_derived.py; this file covers the pieces they are made of and the file
meta of received instances.
"""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID

from dicom_node.encoding import (
    command_set,
    command_uid,
    command_ushort,
    explicit_header,
    meta_group,
    received_file_header,
    ui_element,
)
from dicom_node.identity import IMPLEMENTATION, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _pydicom_file_header(sop_class: str, sop_instance: str, ts: str, source_ae: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = source_ae
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45"])  # even and odd lengths (NUL padding)
@pytest.mark.parametrize("ae", ["CT01", "SCANNER", " PADDED "])  # even, odd (space padding), stripped
@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"])
def test_received_file_header_is_what_pydicom_writes(sop_instance: str, ae: str, ts: str) -> None:
    mine = received_file_header(CT_IMAGE_STORAGE, sop_instance, ts, IMPLEMENTATION, ae)
    assert mine == _pydicom_file_header(CT_IMAGE_STORAGE, sop_instance, ts, ae.strip())


def test_received_file_header_reads_back_and_replaces_non_ascii_ae() -> None:
    header = received_file_header(CT_IMAGE_STORAGE, "1.2.3", "1.2.840.10008.1.2.1", IMPLEMENTATION, "SCANNÉR")
    assert header is not None
    meta = pydicom.dcmread(BytesIO(header + b"\x08\x00\x16\x00UI\x00\x00"), force=True).file_meta
    assert meta.SourceApplicationEntityTitle == "SCANN?R"
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME


def test_non_ascii_uid_is_left_to_pydicom() -> None:
    assert received_file_header(CT_IMAGE_STORAGE, "1.2.3", "1.2.é", IMPLEMENTATION, "AE") is None
    assert meta_group([(0x00020002, "UI", "1.2.é")]) is None


@pytest.mark.parametrize(("vr", "length"), [("US", 2), ("UI", 10), ("OB", 6), ("SQ", 0), ("UT", 70000)])
def test_explicit_header_is_what_pydicom_writes(vr: str, length: int) -> None:
    ds = Dataset()
    value: object = {"US": 7, "UI": "1.2.3.4.56", "OB": b"\x01" * 6, "SQ": [], "UT": "x" * 70000}[vr]
    ds.add_new(0x00091010 if vr != "US" else 0x00280010, vr, value)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    written = fp.getvalue()
    tag = int(next(iter(ds.keys())))
    assert written.startswith(explicit_header(tag, vr, length))


@pytest.mark.parametrize("uid", ["1.2.3.4", "1.2.3.45"])
def test_ui_element_is_what_pydicom_encodes(uid: str) -> None:
    ds = Dataset()
    ds.SOPInstanceUID = uid
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    elem = ui_element(0x00080018, uid)
    assert explicit_header(0x00080018, "UI", elem.length) + bytes(elem.value or b"") == fp.getvalue()


def test_command_set_is_what_pydicom_writes_in_implicit_vr() -> None:
    ds = Dataset()
    ds.AffectedSOPClassUID = CT_IMAGE_STORAGE
    ds.CommandField = 0x8001
    ds.MessageIDBeingRespondedTo = 7
    ds.CommandDataSetType = 0x0101
    ds.Status = 0
    ds.AffectedSOPInstanceUID = "1.2.3.45"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    body = fp.getvalue()
    mine = command_set(
        command_uid(0x0002, CT_IMAGE_STORAGE), command_ushort(0x0100, 0x8001), command_ushort(0x0120, 7),
        command_ushort(0x0800, 0x0101), command_ushort(0x0900, 0), command_uid(0x1000, "1.2.3.45"),
    )
    group_length = Dataset()
    group_length.CommandGroupLength = len(body)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, group_length)
    assert mine == fp.getvalue() + body
