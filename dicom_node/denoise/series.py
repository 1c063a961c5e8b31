"""Finding series in files, sorting their slices along the slice normal, and decoding their pixels.

Uses pydicom only (no torch). Headers are read without pixel data (``stop_before_pixels``), so scanning a
1000-slice series holds headers, not images; pixels are decoded one instance at a time by
:func:`read_frames`, with pydicom's decoders for every transfer syntax the receiver accepts (RLE, JPEG lossless,
JPEG-LS, JPEG 2000 via pylibjpeg and pyjpegls).

Slice order follows geometry (PS3.3 C.7.6.2): the slice normal is the cross product of the row and column
direction cosines of ImageOrientationPatient, and a slice's position is ``ImagePositionPatient . normal``.
InstanceNumber only breaks ties and orders images without geometry (projection X-ray).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.denoise.errors import SeriesRefused
from dicom_node.denoise.pixels import PixelFormat, clean_stored, pixel_format_from_dataset

LOGGER = logging.getLogger(__name__)


@dataclass
class FrameGeometry:
    """Where one frame lies: ImagePositionPatient and ImageOrientationPatient (``None`` when unknown)."""

    position: tuple[float, ...] | None  # three values
    orientation: tuple[float, ...] | None  # six values


@dataclass
class Instance:
    """One image file of a series (single-frame or multi-frame), known by its header only.

    Attributes
    ----------
    path
        The file.
    header
        The dataset read without pixel data.
    frames
        Number of frames (1 for single-frame objects).
    formats
        The :class:`PixelFormat` of each frame (enhanced objects may rescale per frame).
    geometry
        Per-frame geometry.
    sort_key
        Position along the series' slice normal (``nan`` without geometry), then InstanceNumber.
    raw_elements, pixel_offset
        The header's elements as read, before any was decoded, and where the pixel data element starts in the
        file (``None`` when not known): decoding an uncompressed file then reads only its pixel bytes.
    """

    path: Path
    header: Dataset
    frames: int
    formats: list[PixelFormat]
    geometry: list[FrameGeometry]
    sort_key: tuple[float, int, str] = (float("nan"), 0, "")
    raw_elements: dict[Any, Any] | None = field(default=None, repr=False, compare=False)
    pixel_offset: int | None = None

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.SOPInstanceUID)

    @property
    def sop_class_uid(self) -> str:
        return str(self.header.SOPClassUID)

    @property
    def is_multiframe(self) -> bool:
        return "NumberOfFrames" in self.header

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.header.Rows), int(self.header.Columns)


@dataclass
class Series:
    """The image instances of one SeriesInstanceUID, sorted along the slice normal."""

    series_instance_uid: str
    instances: list[Instance] = field(default_factory=list)
    normal: tuple[float, float, float] | None = None

    @property
    def first(self) -> Dataset:
        return self.instances[0].header

    @property
    def modality(self) -> str:
        return str(self.first.get("Modality", ""))

    @property
    def frame_count(self) -> int:
        return sum(inst.frames for inst in self.instances)

    def describe(self) -> str:
        """One line for logs and progress bars (no patient data)."""
        number = self.first.get("SeriesNumber", "?")
        desc = self.first.get("SeriesDescription", "")
        return f"series {number} {desc!s} ({self.modality}, {len(self.instances)} instances, {self.frame_count} frames)"


@dataclass
class ScanResult:
    """Series found under some paths, and the files that were skipped with the reason."""

    series: list[Series]
    skipped: list[tuple[Path, str]]


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _functional(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The item of functional-group ``sequence`` for frame ``index``: per-frame first, then shared."""
    for groups_kw in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(groups_kw)
        if not groups:
            continue
        item = groups[index] if groups_kw.startswith("PerFrame") and index < len(groups) else groups[0]
        seq = item.get(sequence)
        if seq:
            return seq[0]
    return None


def _frame_info(ds: Dataset) -> tuple[list[PixelFormat], list[FrameGeometry]]:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    formats: list[PixelFormat] = []
    geometry: list[FrameGeometry] = []
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    base = pixel_format_from_dataset(ds)
    for i in range(frames):
        if enhanced:
            pvt = _functional(ds, i, "PixelValueTransformationSequence")
            if pvt is not None and "RescaleSlope" in pvt:
                rescale = (float(pvt.RescaleSlope), float(pvt.get("RescaleIntercept", 0.0)),
                           pvt.get("RescaleType") or None)
                fmt = pixel_format_from_dataset(ds, rescale)
            else:
                fmt = base
            pos = _functional(ds, i, "PlanePositionSequence")
            ori = _functional(ds, i, "PlaneOrientationSequence")
            geometry.append(FrameGeometry(
                _floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None,
                _floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else None,
            ))
        else:
            fmt = base
            geometry.append(FrameGeometry(_floats(ds.get("ImagePositionPatient"), 3),
                                          _floats(ds.get("ImageOrientationPatient"), 6)))
        formats.append(fmt)
    return formats, geometry


def read_instance_header(path: str | os.PathLike[str]) -> Instance:
    """Read one file's header and check it is an image this node can denoise.

    Raises
    ------
    InvalidDicomError
        Not a DICOM file.
    SeriesRefused
        A DICOM object that is not a denoisable image (no pixel data, colour, unsupported format).
    """
    p = Path(path)
    with open(p, "rb") as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        pixel_offset = fh.tell()  # dcmread stops at the start of (7FE0,0010)
    # Kept as read: the checks below decode some elements in ``ds``, and a derived instance copies raw elements
    # for free but decoded ones at a cost (see dicom_node.denoise.derived.build_derived_instance).
    raw_elements = {elem.tag: elem for elem in ds.elements()}
    if "Rows" not in ds or "Columns" not in ds:
        raise SeriesRefused("not an image (no Rows/Columns)", str(p))
    for key in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not ds.get(key):
            raise SeriesRefused(f"{key} is missing", str(p))
    try:
        formats, geometry = _frame_info(ds)
    except SeriesRefused as exc:
        raise SeriesRefused(exc.reason, str(p)) from None
    return Instance(path=p, header=ds, frames=len(formats), formats=formats, geometry=geometry,
                    raw_elements=raw_elements, pixel_offset=pixel_offset)


def iter_files(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> Iterator[Path]:
    """Files under ``paths`` (folders are walked recursively, in sorted order; hidden entries skipped).

    A single path (``str`` or path-like) is accepted as well as an iterable of them.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            yield p
        elif p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        yield Path(root) / name


def slice_normal(orientation: tuple[float, ...]) -> tuple[float, float, float]:
    """Unit normal of a slice from the 6 direction cosines of ImageOrientationPatient."""
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:], dtype=float)
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    if norm == 0:
        raise SeriesRefused(f"ImageOrientationPatient {list(orientation)} has parallel row and column vectors")
    return tuple(float(v) for v in n / norm)  # type: ignore[return-value]


def sort_series(series: Series) -> None:
    """Sort ``series.instances`` along the slice normal (InstanceNumber breaks ties; images without geometry last).

    Multi-frame instances keep their frames in stored order and are placed by their first frame.
    """
    normal = None
    for inst in series.instances:
        ori = inst.geometry[0].orientation
        if ori is not None:
            normal = slice_normal(ori)
            break
    series.normal = normal
    for inst in series.instances:
        pos = inst.geometry[0].position
        where = float(np.dot(pos, normal)) if (normal is not None and pos is not None) else float("nan")
        number = inst.header.get("InstanceNumber")
        try:
            number_i = int(number) if number not in (None, "") else 0
        except (TypeError, ValueError):
            number_i = 0
        inst.sort_key = (where, number_i, inst.sop_instance_uid)
    series.instances.sort(key=lambda i: (np.isnan(i.sort_key[0]), 0.0 if np.isnan(i.sort_key[0]) else i.sort_key[0],
                                         i.sort_key[1], i.sort_key[2]))


def group_series(instances: Iterable[Instance]) -> list[Series]:
    """Group instances by SeriesInstanceUID (in first-seen order), drop duplicate SOP instances, sort each."""
    by_uid: dict[str, Series] = {}
    seen: set[str] = set()
    for inst in instances:
        if inst.sop_instance_uid in seen:
            LOGGER.warning("duplicate SOPInstanceUID in %s; keeping the first copy", inst.path)
            continue
        seen.add(inst.sop_instance_uid)
        uid = str(inst.header.SeriesInstanceUID)
        by_uid.setdefault(uid, Series(uid)).instances.append(inst)
    for series in by_uid.values():
        sort_series(series)
        log_rescale_quirks(series)
    return list(by_uid.values())


def log_rescale_quirks(series: Series) -> None:
    """Warn once for a series whose RescaleType was read as Hounsfield units under another spelling.

    Real CT files write for example ``Houndsfield Unit`` (GE reformats); the values are HU all the same
    (:func:`dicom_node.denoise.pixels.ct_rescale_unit`), so the series is accepted and the quirk is logged here,
    once per series rather than once per instance.
    """
    written = sorted({fmt.rescale_type_as_written for inst in series.instances for fmt in inst.formats
                      if fmt.rescale_type_as_written})
    if written:
        count = sum(1 for inst in series.instances if any(f.rescale_type_as_written for f in inst.formats))
        LOGGER.warning("%s %s: RescaleType %s read as HU (CT rescaled values are Hounsfield units, PS3.3 C.8.2.1); "
                       "%d of %d instances", series.describe(), series.series_instance_uid,
                       ", ".join(repr(w) for w in written), count, len(series.instances))


class HeaderCache:
    """Instance headers read ahead of time, each taken (and forgotten) by the next :func:`scan` of its file.

    The node's worker reads the headers of a series while the series is quiet (received, not yet complete), so
    the job's scan, which is on the critical path before the first slice reaches the network, finds them read.
    An entry is used only while the file's size and modification time are what they were when it was read.
    """

    def __init__(self, limit: int = 20000) -> None:
        self.limit = limit
        self._entries: dict[Path, tuple[tuple[int, int], Instance]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def prefetch(self, paths: Iterable[str | os.PathLike[str]], limit: int | None = None) -> int:
        """Read the headers of ``paths`` not read yet, at most ``limit`` of them (unreadable files are left to the
        scan, which reports why); return how many were read."""
        read = 0
        for raw in paths:
            if limit is not None and read >= limit:
                break
            path = Path(raw)
            with self._lock:
                if path in self._entries or len(self._entries) >= self.limit:
                    continue
            stamp = self._stamp(path)
            if stamp is None:
                continue
            try:
                instance = read_instance_header(path)
            except Exception:  # noqa: BLE001 - the scan reads it again and reports why
                continue
            with self._lock:
                self._entries[path] = (stamp, instance)
            read += 1
        return read

    def take(self, path: Path) -> Instance | None:
        """The header read for ``path``, if the file has not changed since; the entry is removed either way."""
        with self._lock:
            entry = self._entries.pop(path, None)
        if entry is None or self._stamp(path) != entry[0]:
            return None
        return entry[1]

    def forget(self, keep: Iterable[Path]) -> None:
        """Drop every entry whose path is not in ``keep`` (series completed or purged meanwhile)."""
        keep_set = set(keep)
        with self._lock:
            for path in [p for p in self._entries if p not in keep_set]:
                del self._entries[path]


def scan(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
         headers: HeaderCache | None = None) -> ScanResult:
    """Find the image series under ``paths``; files that are not DICOM images are skipped with a reason.

    Headers already read into ``headers`` are taken from there instead of being read again.
    """
    instances: list[Instance] = []
    skipped: list[tuple[Path, str]] = []
    for path in iter_files(paths):
        try:
            cached = headers.take(path) if headers is not None else None
            instances.append(cached if cached is not None else read_instance_header(path))
        except InvalidDicomError:
            skipped.append((path, "not a DICOM file"))
        except SeriesRefused as exc:
            skipped.append((path, exc.reason))
        except Exception as exc:  # noqa: BLE001 - a malformed file must not stop the scan
            skipped.append((path, f"unreadable: {type(exc).__name__}: {exc}"))
    for path, why in skipped:
        LOGGER.info("skipping %s: %s", path, why)
    return ScanResult(group_series(instances), skipped)


def check_series(series: Series) -> None:
    """Refuse a series whose instances disagree on what must be shared (modality, study, frame of reference)."""
    first = series.first
    for inst in series.instances[1:]:
        for key in ("Modality", "StudyInstanceUID"):
            if inst.header.get(key) != first.get(key):
                raise SeriesRefused(f"instances disagree on {key} ({first.get(key)} vs {inst.header.get(key)})",
                                    str(inst.path))


#: Uncompressed little-endian transfer syntaxes, whose pixel data :func:`read_frames` reads straight from the file;
#: the value says whether the VR is implicit.
_NATIVE_LITTLE_ENDIAN: dict[str | None, bool] = {ExplicitVRLittleEndian: False, ImplicitVRLittleEndian: True}


def _read_native(instance: Instance) -> tuple[Dataset, np.ndarray] | None:
    """The dataset (without its pixel data) and stored values of an uncompressed little-endian instance.

    One read of the pixel bytes, instead of pydicom's full read and pixel handlers: at the offset the header scan
    noted when it has one (the dataset is then rebuilt from the header's elements as read), else after one
    header parse (about 1 ms more per CT slice, on the cores the network needs). ``None`` when the file is
    anything else (another transfer syntax, pixel data of another length, elements after the pixel data):
    pydicom then decodes it.
    """
    header = instance.header
    if instance.formats[0].is_colour:
        return None  # colour is converted on decoding (YBR, palette, planar configuration): pydicom reads it
    if instance.raw_elements is not None and instance.pixel_offset is not None:
        implicit = _NATIVE_LITTLE_ENDIAN.get(getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None))
        if implicit is None or int(header.get("SamplesPerPixel", 1) or 1) != 1:
            return None
        with open(instance.path, "rb") as fh:
            fh.seek(instance.pixel_offset)
            arr = _read_pixel_element(fh, instance, implicit)
        if arr is None:
            return None
        ds = Dataset(dict(instance.raw_elements))
        ds.file_meta = header.file_meta
        implicit_vr, little_endian = header.original_encoding
        ds.set_original_encoding(implicit_vr, little_endian, header.original_character_set)
        return ds, arr
    with open(instance.path, "rb") as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        implicit = _NATIVE_LITTLE_ENDIAN.get(getattr(ds.file_meta, "TransferSyntaxUID", None))
        if implicit is None or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            return None
        arr = _read_pixel_element(fh, instance, implicit)
    return None if arr is None else (ds, arr)


def _read_pixel_element(fh: Any, instance: Instance, implicit: bool) -> np.ndarray | None:
    """Stored values from a file positioned at its (7FE0,0010) element; ``None`` when it is not the expected one
    (another tag or length, a short file, elements after it)."""
    fmt = instance.formats[0]  # frames differ in rescale at most, never in bit layout
    rows, cols = instance.shape
    expected = instance.frames * rows * cols * (fmt.bits_allocated // 8)
    # The element's header is 8 bytes (implicit VR) or 12 (explicit VR, OB/OW).
    head = fh.read(8 if implicit else 12)
    if implicit and len(head) == 8:
        group, element, length = struct.unpack("<HHI", head)
    elif not implicit and len(head) == 12 and head[4:6] in (b"OB", b"OW"):
        group, element, _vr, _reserved, length = struct.unpack("<HH2sHI", head)
    else:
        return None
    if (group, element) != (0x7FE0, 0x0010) or length not in (expected, expected + 1):
        return None
    buffer = bytearray(expected)
    if fh.readinto(buffer) != expected or len(fh.read(2)) != length - expected:
        return None  # short, or elements after the pixel data: pydicom reads the whole file
    arr = np.frombuffer(buffer, dtype=fmt.dtype.newbyteorder("<")).reshape(instance.frames, rows, cols)
    lo, hi = fmt.stored_range
    if fmt.bits_stored < fmt.bits_allocated and arr.size and (arr.min() < lo or arr.max() > hi):
        # Bits above BitsStored are not part of the value (PS3.5 8.1.1): drop them as pydicom's decoder does,
        # sign-extending two's complement values.
        shift = fmt.bits_allocated - fmt.bits_stored
        arr = np.right_shift(np.left_shift(arr, shift), shift)
    return arr


def read_frames(instance: Instance) -> tuple[Dataset, np.ndarray]:
    """Decode an instance: its dataset and stored values as ``(frames, rows, columns)`` in its dtype.

    The dataset may lack the pixel data element (uncompressed files are read without it).

    Colour comes back as RGB ``(frames, rows, columns, 3)``, samples interleaved, whatever the source's encoding:
    pydicom converts YBR (JPEG baseline decodes to YBR_FULL_422) to RGB and reads either planar configuration;
    a palette is looked up (:func:`palette_to_rgb`).

    Raises
    ------
    SeriesRefused
        When the file fails to decode (with the decoder's reason), or the decoded shape is not what the header
        says.
    """
    try:
        try:
            native = _read_native(instance)
        except Exception:  # noqa: BLE001 - a file the fast path cannot read gets pydicom's error below
            native = None
        if native is not None:
            return native[0], clean_stored(native[1], instance.formats[0])
        ds = pydicom.dcmread(instance.path)
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - every decoder failure becomes a clear refusal
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) if "ds" in locals() else None
        ts_name = getattr(ts, "name", str(ts)) if ts is not None else "unknown transfer syntax"
        first_line = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first_line[:3])
        raise SeriesRefused(f"pixel data cannot be decoded ({ts_name}): {detail}", str(instance.path)) from exc
    rows, cols = instance.shape
    fmt = instance.formats[0]
    if fmt.source_photometric == "PALETTE COLOR":
        arr = palette_to_rgb(arr, ds)
    expected: tuple[int, ...] = (instance.frames, rows, cols) + ((3,) if fmt.is_colour else ())
    if arr.shape == expected[1:]:
        arr = arr[np.newaxis]
    if arr.shape != expected:
        raise SeriesRefused(
            f"decoded pixel data has shape {arr.shape}, header says {' x '.join(map(str, expected))}",
            str(instance.path),
        )
    return ds, clean_stored(arr, fmt)


def palette_to_rgb(index: np.ndarray, ds: Dataset) -> np.ndarray:
    """8-bit RGB of a PALETTE COLOR image (its Red/Green/Blue Palette Color LUTs, segmented or not).

    16-bit palette entries (PS3.3 C.7.6.3.1.6) are reduced to their high byte: entries written as ``v << 8`` and
    full-range ones (``v * 257``) both give ``v``. Palettes whose 16-bit entries hold 8-bit values are kept.
    """
    rgb = apply_color_lut(index, ds)
    if rgb.dtype.itemsize > 1:
        if rgb.size and int(rgb.max()) > 255:
            rgb = np.right_shift(rgb, 8)
        rgb = rgb.astype(np.uint8)
    return rgb


def frame_order(instance: Instance) -> np.ndarray:
    """The order of a multi-frame instance's frames in space: along the slice normal when every frame has a
    distinct position on it (an Enhanced MR volume stored in acquisition order), else as stored (cine: time).

    Neighbouring frames fed to a model with context are neighbours in this order.
    """
    n = instance.frames
    geometry = instance.geometry
    if n < 3 or any(g.position is None for g in geometry):
        return np.arange(n)
    orientation = next((g.orientation for g in geometry if g.orientation is not None), None)
    if orientation is None:
        return np.arange(n)
    try:
        normal = np.asarray(slice_normal(orientation))
    except SeriesRefused:
        return np.arange(n)
    where = np.array([float(np.dot(g.position, normal)) for g in geometry])  # type: ignore[arg-type]
    if len(np.unique(np.round(where, 4))) != n:
        return np.arange(n)  # several stacks (echoes, time points) in one object: keep their stored order
    return np.argsort(where, kind="stable")
