"""Writing derived instances: :func:`write_instance` for one built dataset, and the derived series writer, the
fast path that writes every instance of a series after the first from the first one's encoded elements (same
bytes as :func:`dicom_node.denoise.derived.build_derived_instance` followed by
:func:`dicom_node.encoding.encode_file`; ``tests/unit/test_derived.py`` compares them byte for byte). Files are
written atomically (temporary file, then rename) and fsynced on request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicom_node.denoise.derived import (
    COMMON_INSTANCE_REFERENCE_IODS,
    PIXEL_DATA_TAGS,
    DerivationInfo,
    build_derived_instance,
    checked_pixels,
    derived_sop_instance_uid,
    pixel_data_element,
    source_image_sequence,
)
from dicom_node.denoise.pixels import PixelFormat
from dicom_node.encoding import (
    encode_file,
    encoded_parts,
    explicit_header,
    file_meta_bytes,
    meta_group,
    raw_bytes,
    ui_element,
)
from dicom_node.store.fsync import fsync_path


def write_instance(ds: Dataset, folder: str | os.PathLike[str], durable: bool = False) -> Path:
    """Write a derived instance as ``folder/<SOPInstanceUID>.dcm`` (atomically: temp file, then rename).

    With ``durable`` the file's data is fsynced before the rename (the caller fsyncs the folder once all are
    written; see :func:`dicom_node.denoise.engine.denoise_series`).
    """
    if ds.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, RLELossless):
        return write_encoded(encode_file(ds), str(ds.SOPInstanceUID), folder, durable)
    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{ds.SOPInstanceUID}.tmp"
    ds.save_as(tmp, enforce_file_format=True)
    if durable:
        fsync_path(tmp)
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    os.replace(tmp, path)
    return path


def write_encoded(data: bytes, sop_instance_uid: str, folder: str | os.PathLike[str], durable: bool = False) -> Path:
    """Write an encoded instance as ``folder/<SOPInstanceUID>.dcm`` (atomically; fsynced with ``durable``)."""
    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{sop_instance_uid}.dcm"
    tmp = out_dir / f".{sop_instance_uid}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


@dataclass
class _SeriesTemplate:
    """A derived instance already made, kept so the next instances of the series can be made by substitution."""

    source_values: dict[int, tuple[str | None, Any]]  # the source's elements as read: VR, value
    passthrough: frozenset[int]  # elements the builder copied from the source as they were, read nowhere else
    dropped: frozenset[int]  # elements the builder left out (private, retired...): their values do not matter
    parts: list[tuple[int, bytes]]  # the derived instance's elements, encoded, in order
    shape: tuple[int, int, int]
    fmt: PixelFormat
    sop_class_uid: str
    source_transfer_syntax: str
    meta: list[tuple[int, str, str]]  # the file meta elements, MediaStorageSOPInstanceUID at index 1


class DerivedSeriesWriter:
    """Makes and writes the derived instances of one series, the same bytes as :func:`build_derived_instance`
    and :func:`write_instance`, with less work per instance.

    The first instance is built in full. The instances after it usually differ from it only in elements the
    builder copies as they are (position, instance number, times...), in their SOP Instance UID and in their
    pixels; such an instance is written from the first one's encoded elements with those substituted: 0.65 ms
    of CPU per 512x512 CT slice, file write included, instead of about 2 ms, taken from the network on the
    same cores. Any other
    difference (an element the builder reads, one added or missing, another pixel format or encoding) makes
    that instance in full, and it becomes the new template. Enhanced multi-frame objects, RLE output and a
    creation time taken per instance are always made in full.
    """

    def __init__(self, info: DerivationInfo) -> None:
        self.info = info
        self.template: _SeriesTemplate | None = None
        #: Instances written from the template, and in full (a test checks the template is used).
        self.from_template = 0
        self.in_full = 0

    def write(self, source: Dataset, pixels: np.ndarray, fmt: PixelFormat, folder: str | os.PathLike[str],
              durable: bool = False) -> Path:
        """Write the derived instance of ``source`` with stored values ``pixels`` into ``folder``."""
        made = self._from_template(source, pixels, fmt) if self.template is not None else None
        if made is not None:
            self.from_template += 1
            return write_encoded(made[1], made[0], folder, durable)
        self.in_full += 1
        as_read = {elem.tag: elem for elem in source.elements()}  # before the builder decodes any of them
        ds = build_derived_instance(source, pixels, fmt, self.info)
        self.template = self._template(source, as_read, ds, fmt)
        return write_instance(ds, folder, durable)

    def _template(self, source: Dataset, as_read: dict[Any, Any], ds: Dataset,
                  fmt: PixelFormat) -> _SeriesTemplate | None:
        info = self.info
        ts = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", "") or "")
        if (info.created is None or info.transfer_syntax != "explicit-vr-little-endian"
                or ts != ExplicitVRLittleEndian  # a lossy source's LossyImageCompression is read after the copy
                or 0x00082112 not in ds or "PerFrameFunctionalGroupsSequence" in ds
                or str(ds.file_meta.MediaStorageSOPClassUID) in COMMON_INSTANCE_REFERENCE_IODS):
            return None
        # Raw values are compared as bytes; the few pydicom decodes while reading (SpecificCharacterSet) as values.
        source_values = {int(tag): (elem.VR, elem.value) for tag, elem in as_read.items()
                         if tag not in PIXEL_DATA_TAGS}
        if 0x00080018 not in source_values:
            return None
        parts = encoded_parts(ds)
        meta = [(int(e.tag), e.VR, e.value) for e in ds.file_meta if int(e.tag) != 0x00020001]
        if (parts is None or file_meta_bytes(ds.file_meta) is None
                or [tag for tag, _vr, _text in meta] != [0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013]):
            return None
        # Copied as it was: the very element read is in the derived dataset. SOPClassUID is copied too, but the
        # builder reads it after the copy (SourceImageSequence, file meta), so it must not change.
        passthrough = frozenset(int(tag) for tag, elem in as_read.items()
                                if tag in ds and ds.get_item(tag) is elem) - {0x00080016}
        dropped = frozenset(int(tag) for tag in as_read if tag not in ds and tag not in PIXEL_DATA_TAGS)
        arr_shape = (int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns))
        return _SeriesTemplate(source_values, passthrough, dropped, parts, arr_shape, fmt, meta[0][2], ts, meta)

    def _from_template(self, source: Dataset, pixels: np.ndarray, fmt: PixelFormat) -> tuple[str, bytes] | None:
        """(SOP Instance UID, file bytes) made from the template, or ``None`` when it does not apply."""
        t = self.template
        if t is None:  # no instance built yet: the caller builds this one in full
            return None
        if (fmt != t.fmt or tuple(source.original_encoding) != (False, True)
                or str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", "") or "")
                != t.source_transfer_syntax):
            return None
        changed: dict[int, bytes] = {}
        source_uid: Any = None
        seen = 0
        for elem in source.elements():
            tag = int(elem.tag)
            if tag in PIXEL_DATA_TAGS:
                continue
            seen += 1
            ref = t.source_values.get(tag)
            if ref is None:
                return None
            if (elem.VR == ref[0] and elem.value == ref[1]) or tag in t.dropped:
                continue
            if tag == 0x00080018:
                source_uid = elem.value
                continue
            data = raw_bytes(elem) if tag in t.passthrough and elem.VR == ref[0] else None
            if data is None:
                return None
            changed[tag] = data
        if seen != len(t.source_values) or not source_uid:
            return None
        if isinstance(source_uid, bytes):  # raw, as read; decoded when the caller looked at it
            try:
                uid = source_uid.rstrip(b"\x00 ").decode("ascii")
            except UnicodeDecodeError:
                return None
        else:
            uid = str(source_uid)
        arr = checked_pixels(pixels, t.shape, fmt)
        sop_uid = derived_sop_instance_uid(self.info.series_instance_uid, uid, self.info.uid_root)
        own = {0x00080018: ui_element(0x00080018, sop_uid), 0x00082112: source_image_sequence(t.sop_class_uid, uid),
               0x7FE00010: pixel_data_element(arr, fmt)}
        for tag, elem in own.items():
            changed[tag] = explicit_header(tag, elem.VR or "UN", elem.length) + (elem.value or b"")
        meta = list(t.meta)
        meta[1] = (0x00020003, "UI", sop_uid)
        meta_bytes = meta_group(meta)
        if meta_bytes is None:
            return None
        body = b"".join(changed.get(tag, data) for tag, data in t.parts)
        return sop_uid, b"\x00" * 128 + b"DICM" + meta_bytes + body

