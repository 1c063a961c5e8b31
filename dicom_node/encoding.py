"""The DICOM byte format, written in one place: every byte the node encodes by hand rather than through pydicom.

- Data elements in explicit VR little endian (PS3.5 7.1.2): headers, UIDs, values pydicom encoded once and cached.
- Command sets in implicit VR little endian (PS3.7 6.3.1), for the C-STORE request and response the DIMSE fast
  path (:mod:`dicom_node.dimse.reactor`) sends.
- File Meta Information (PS3.10 7.1): the group written in front of received instances
  (:func:`received_file_header`) and of derived ones.
- Whole files of derived instances (:func:`encode_file`), raw elements copied as they are.

Each is used where pydicom's own writer costs milliseconds of Python per instance beside the network on the same
cores, and each is tested byte for byte against pydicom (tests/unit/test_encoding.py, tests/unit/test_derived.py).
Writing the bytes to disk is the callers' job.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Hashable
from typing import Any

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.tag import Tag

# New elements of a derived instance are put into its dataset already encoded in explicit VR little endian, as
# RawDataElements: pydicom decodes them when they are read and writes them as they are. Values shared by every
# instance of a series are encoded once by pydicom (cached); the two per-instance ones, the SOP Instance UID and
# the Source Image Sequence, are encoded here directly (UIDs and fixed structure only).


def explicit_header(tag: int, vr: str, length: int) -> bytes:
    """An element header in explicit VR little endian (PS3.5 7.1.2)."""
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length)


def charset_key(value: Any) -> tuple[str, ...] | None:
    """SpecificCharacterSet as a hashable cache key (``None``: the default repertoire)."""
    if not value:
        return None
    return (str(value),) if isinstance(value, str) else tuple(str(v) for v in value)


def raw_element(elem: DataElement, charset: tuple[str, ...] | None) -> RawDataElement:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, list(charset) if charset else None)
    data = fp.getvalue()
    start = 12 if elem.VR in LONG_VRS else 8
    return RawDataElement(Tag(elem.tag), elem.VR, len(data) - start, data[start:], 0, False, True)


@functools.lru_cache(maxsize=4096)
def encoded_element(tag: int, vr: str, value: Hashable, charset: tuple[str, ...] | None) -> RawDataElement:
    """``value`` (a tuple for several values) encoded by pydicom as element ``tag``, once per distinct value."""
    return raw_element(DataElement(tag, vr, list(value) if isinstance(value, tuple) else value), charset)


def ui_element(tag: int, uid: str) -> RawDataElement:
    """A UI element: the UID's ASCII characters, padded with NUL to an even length (PS3.5 6.2)."""
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return RawDataElement(Tag(tag), "UI", len(value), value, 0, False, True)

#: VRs whose explicit-VR header has two reserved bytes and a 32-bit length (PS3.5 7.1.2).
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})


#: The File Meta elements the builder writes (PS3.10 7.1), with their VRs; (0002,0000) and (0002,0001) are added.
FILE_META_ELEMENTS = {0x00020002: "UI", 0x00020003: "UI", 0x00020010: "UI", 0x00020012: "UI", 0x00020013: "SH"}


def file_meta_bytes(meta: Dataset) -> bytes | None:
    """Group 2 as ``write_file_meta_info(enforce_standard=True)`` writes it, for the builder's file meta (its
    elements given as text); ``None`` for anything else, which pydicom then writes."""
    items = []
    for elem in meta:
        tag = int(elem.tag)
        if tag == 0x00020001 and elem.value == b"\x00\x01":
            continue
        vr = FILE_META_ELEMENTS.get(tag)
        if vr is None or elem.VR != vr or not isinstance(elem.value, str):
            return None
        items.append((tag, vr, elem.value))
    if not {0x00020002, 0x00020003, 0x00020010} <= {tag for tag, _vr, _text in items}:
        return None  # pydicom raises the error that names what is missing
    return meta_group(items)


def meta_group(items: list[tuple[int, str, str]]) -> bytes | None:
    """Group 2 with its group length and version, the other elements given as (tag, VR, text) in tag order."""
    body = [explicit_header(0x00020001, "OB", 2) + b"\x00\x01"]
    for tag, vr, text in items:
        try:
            value = text.encode("ascii")
        except UnicodeEncodeError:
            return None
        if len(value) % 2:
            value += b"\x00" if vr == "UI" else b" "
        body.append(explicit_header(tag, vr, len(value)) + value)
    group = b"".join(body)
    return explicit_header(0x00020000, "UL", 4) + struct.pack("<I", len(group)) + group


def encode_file(ds: Dataset) -> bytes:
    """The bytes ``ds.save_as(..., enforce_file_format=True)`` writes, for a dataset in explicit VR little endian.

    A derived instance is mostly the source's elements, still raw (undecoded) when the source was explicit VR
    little endian too. pydicom writes each through a fresh buffer and a dozen checks (about 4 ms of Python per
    CT slice, beside the network on the same cores); a raw element of defined length in the file's own
    encoding is only its header and its stored value, so those are written here directly and every other
    element goes through pydicom's ``write_data_element``. Tested byte for byte against ``save_as``.
    """
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(ds.preamble or b"\x00" * 128)
    fp.write(b"DICM")
    meta = file_meta_bytes(ds.file_meta)
    if meta is None:
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    else:
        fp.write(meta)
    parts = encoded_parts(ds)
    if parts is None:  # raw elements must be converted: leave it all to pydicom
        write_dataset(fp, ds)
        return fp.getvalue()
    fp.write(b"".join(data for _tag, data in parts))
    return fp.getvalue()


def encoded_parts(ds: Dataset) -> list[tuple[int, bytes]] | None:
    """Each element of ``ds`` (explicit VR little endian) as its encoded bytes, in order; ``None`` when the dataset
    was read in another encoding or character set (its raw elements would need converting)."""
    if not (tuple(ds.original_encoding) == (False, True) and ds.original_character_set == ds._character_set):
        return None
    encoding = ds.get("SpecificCharacterSet", "iso8859")
    parts = []
    for elem in ds.elements():
        tag = elem.tag
        if tag & 0xFFFF == 0 and tag >> 16 > 6:  # retired group lengths are not written (PS3.5 7.2)
            continue
        data = raw_bytes(elem)
        if data is None:
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_data_element(fp, elem, encoding)
            data = fp.getvalue()
        parts.append((int(tag), data))
    return parts


def raw_bytes(elem: Any) -> bytes | None:
    """A raw element of defined length in explicit VR little endian, encoded: its header and its stored value
    (``None`` for anything pydicom must write)."""
    if not (elem.is_raw and elem.VR and elem.length != 0xFFFFFFFF and not elem.is_implicit_VR
            and elem.is_little_endian and not elem.is_buffered):
        return None
    value = elem.value or b""
    if elem.VR not in LONG_VRS and len(value) > 0xFFFF:
        return None
    return explicit_header(int(elem.tag), elem.VR, len(value)) + value


def received_file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                         implementation: tuple[str, str], source_ae_title: str) -> bytes | None:
    """Preamble, ``DICM`` prefix and File Meta Information (PS3.10 7.1) for a dataset received over the network.

    Written here rather than with pydicom's ``FileMetaDataset``: building and validating that object per instance
    cost more than the rest of the C-STORE handler together.

    Parameters
    ----------
    sop_class_uid, sop_instance_uid, transfer_syntax_uid : str
        Media Storage SOP Class and Instance UIDs and the Transfer Syntax UID.
    implementation : tuple of str
        Implementation Class UID and Implementation Version Name of the writer.
    source_ae_title : str
        Source Application Entity Title: the calling AE (non-ASCII characters become ``?``).

    Returns
    -------
    bytes or None
        The header, or ``None`` when a UID is not ASCII (pydicom then writes and reports it).
    """
    group = meta_group([
        (0x00020002, "UI", sop_class_uid), (0x00020003, "UI", sop_instance_uid),
        (0x00020010, "UI", transfer_syntax_uid), (0x00020012, "UI", implementation[0]),
        (0x00020013, "SH", implementation[1]),
        (0x00020016, "AE", source_ae_title.strip().encode("ascii", "replace").decode("ascii")),
    ])
    return None if group is None else b"\x00" * 128 + b"DICM" + group


def command_element(element: int, value: bytes) -> bytes:
    """One command-set element (group 0000, implicit VR little endian, PS3.7 6.3.1)."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def command_ushort(element: int, value: int) -> bytes:
    """A US command element (Command Field, Message ID, Status, ...)."""
    return command_element(element, struct.pack("<H", value))


def command_uid(element: int, value: Any) -> bytes:
    """A UI command element, padded with NUL to an even length."""
    return command_element(element, padded_text(str(value), b"\x00"))


def command_set(*elements: bytes) -> bytes:
    """A command set: its elements, in tag order, after the Command Group Length (0000,0000) they add up to."""
    body = b"".join(elements)
    return command_element(0x0000, struct.pack("<I", len(body))) + body


def padded_text(value: str, pad: bytes) -> bytes:
    """``value`` in ASCII, padded to an even length with ``pad`` (NUL for UIDs, space for text; PS3.5 6.2)."""
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw
