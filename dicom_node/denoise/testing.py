"""Synthetic DICOM images and tiny model folders for tests (of this package and of the ones built on it).

Nothing here is used at run time; real default models come from ``training/`` (a tiny model made here has
random or zero weights and must never be shipped).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

LOGGER = logging.getLogger(__name__)

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def make_image(
    pixels: np.ndarray,
    *,
    modality: str = "CT",
    bits_stored: int | None = None,
    signed: bool | None = None,
    photometric: str = "MONOCHROME2",
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    position: Sequence[float] | None = (0.0, 0.0, 0.0),
    orientation: Sequence[float] | None = AXIAL,
    instance_number: int = 1,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    padding_value: int | None = None,
    series_number: int = 3,
    series_description: str = "SYNTHETIC",
) -> Dataset:
    """A single-frame CT/MR image dataset with file meta (explicit VR little endian) holding ``pixels``.

    ``pixels`` (2-D integer array) decides BitsAllocated (8 or 16) and, unless given, PixelRepresentation.
    """
    arr = np.asarray(pixels)
    if arr.ndim != 2 or arr.dtype.kind not in "iu" or arr.dtype.itemsize not in (1, 2):
        raise ValueError("pixels must be a 2-D 8- or 16-bit integer array")
    signed = arr.dtype.kind == "i" if signed is None else signed
    bits_allocated = arr.dtype.itemsize * 8
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = frame_of_reference_uid or generate_uid()
    ds.Modality = modality
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "SYN0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.InstanceNumber = instance_number
    ds.Manufacturer = "dicom-node tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PositionReferenceIndicator = ""
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleIntercept = f"{intercept or 0.0:.10g}"
    if modality == "CT":
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "15", "1"
    if padding_value is not None:
        ds.PixelPaddingValue = int(padding_value)
        ds["PixelPaddingValue"].VR = "SS" if signed else "US"
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    ds.PixelData = arr.astype(dtype).tobytes()
    ds["PixelData"].VR = "OW" if bits_allocated == 16 else "OB"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


def write_series(folder: str | os.PathLike[str], volume: np.ndarray, *, spacing: float = 2.0,
                 shuffle_instance_numbers: bool = False, seed: int = 0, **image_kwargs: Any) -> list[Path]:
    """Write ``volume`` (slices, rows, cols) as one single-frame series along +z; return paths in slice order.

    File names do not follow slice order; with ``shuffle_instance_numbers`` InstanceNumber does not either.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = volume.shape[0]
    numbers = rng.permutation(n) + 1 if shuffle_instance_numbers else np.arange(1, n + 1)
    names = rng.permutation(n)
    series_uid = image_kwargs.pop("series_uid", None) or generate_uid()
    study_uid = image_kwargs.pop("study_uid", None) or generate_uid()
    for_uid = image_kwargs.pop("frame_of_reference_uid", None) or generate_uid()
    paths = []
    for k in range(n):
        ds = make_image(volume[k], position=(0.0, 0.0, k * spacing), instance_number=int(numbers[k]),
                        series_uid=series_uid, study_uid=study_uid, frame_of_reference_uid=for_uid,
                        **image_kwargs)
        path = out / f"img{int(names[k]):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_multiframe(volume: np.ndarray, *, slope: float = 1.0, intercept: float = 0.0) -> Dataset:
    """A minimal Enhanced MR-like multi-frame dataset (functional groups for geometry and rescale)."""
    first = make_image(volume[0], modality="MR", slope=None)
    ds = first
    ds.SOPClassUID = ENHANCED_MR
    ds.file_meta.MediaStorageSOPClassUID = UID(ENHANCED_MR)
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
        delattr(ds, kw)
    ds.NumberOfFrames = volume.shape[0]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    shared = Dataset()
    ori = Dataset()
    ori.ImageOrientationPatient = list(AXIAL)
    shared.PlaneOrientationSequence = DicomSequence([ori])
    pvt = Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = f"{slope:.10g}", f"{intercept:.10g}", "US"
    shared.PixelValueTransformationSequence = DicomSequence([pvt])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per = []
    for k in range(volume.shape[0]):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, float(k)]
        item.PlanePositionSequence = DicomSequence([pos])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per)
    ds.PixelData = np.ascontiguousarray(volume).astype(volume.dtype.newbyteorder("<")).tobytes()
    return ds


def make_tiny_model(folder: str | os.PathLike[str], *, name: str = "tiny-ct", modalities: Sequence[str] = ("CT",),
                    input_unit: str = "HU", mode: str = "fixed", offset: float = 0.0, scale: float = 1000.0,
                    clip: Sequence[float] | None = (-1024.0, 3071.0), identity: bool = True, seed: int = 0,
                    architecture: str = "unet-res-small", arguments: dict | None = None,
                    samples_per_pixel: int = 1, context: int = 0) -> Path:
    """Save a tiny model folder: an exact identity (zero residual layer) or small random weights.

    ``samples_per_pixel`` (3: RGB) and ``context`` (neighbouring frames per side) shape the card and the
    network's channels as a trained model's would be (``(2 * context + 1) * samples_per_pixel`` in).
    """
    import torch

    from models.folder import ModelCard, Normalization, save_model_folder
    from models.networks import build_network

    args = dict(arguments) if arguments is not None else {"channels": [4, 8], "blocks": 1}
    if samples_per_pixel != 1 or context:
        args.setdefault("in_channels", (2 * context + 1) * samples_per_pixel)
        args.setdefault("out_channels", samples_per_pixel)
    torch.manual_seed(seed)
    net = build_network(architecture, **args)
    if not identity:
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.05)
    card = ModelCard(
        name=name, version="0.0.1", architecture=architecture, arguments=args, modalities=list(modalities),
        normalization=Normalization(input_unit=input_unit, mode=mode, offset=offset, scale=scale,
                                    clip=list(clip) if clip else None),
        noise={"model": "none (test fixture)"}, training={"data": "none: test fixture, not a trained model"},
        samples_per_pixel=samples_per_pixel, context=context,
    )
    path = Path(folder) / name
    save_model_folder(net, card, path)
    return path


ULTRASOUND = "1.2.840.10008.5.1.4.1.1.6.1"
ULTRASOUND_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def make_colour_image(rgb: np.ndarray, *, modality: str = "US", sop_class_uid: str = ULTRASOUND,
                      photometric: str = "RGB", planar_configuration: int = 0,
                      regions: Sequence[tuple[int, int, int, int, int]] = (), series_uid: str | None = None,
                      study_uid: str | None = None, instance_number: int = 1) -> Dataset:
    """A colour image dataset (explicit VR little endian) holding ``rgb`` (``(rows, cols, 3)`` or
    ``(frames, rows, cols, 3)`` uint8).

    ``photometric`` ``RGB`` or ``YBR_FULL`` (the pixels are converted to it), written with
    ``planar_configuration`` 0 (R1 G1 B1 R2...) or 1 (all R, then G, then B). ``regions`` are ultrasound regions
    ``(RegionDataType, x0, y0, x1, y1)`` (inclusive corners).
    """
    from pydicom.pixels import convert_color_space

    arr = np.asarray(rgb, dtype=np.uint8)
    frames = arr[np.newaxis] if arr.ndim == 3 else arr
    ds = make_image(np.zeros(frames.shape[1:3], np.uint8), modality="CT", slope=None, position=None,
                    orientation=None, series_uid=series_uid, study_uid=study_uid, instance_number=instance_number)
    for kw in ("PixelSpacing", "SliceThickness", "KVP", "AcquisitionNumber", "FrameOfReferenceUID",
               "PositionReferenceIndicator"):
        delattr(ds, kw)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.Modality = modality
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL"] if modality == "US" else ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = planar_configuration
    if arr.ndim == 4:
        ds.NumberOfFrames = arr.shape[0]
    if photometric == "YBR_FULL":
        frames = convert_color_space(frames, "RGB", "YBR_FULL")
    elif photometric != "RGB":
        raise ValueError(f"photometric {photometric} is not made here")
    data = np.moveaxis(frames, -1, 1) if planar_configuration == 1 else frames
    ds.PixelData = np.ascontiguousarray(data).tobytes()
    ds["PixelData"].VR = "OB"
    if regions:
        items = []
        for kind, x0, y0, x1, y1 in regions:
            item = Dataset()
            item.RegionSpatialFormat, item.RegionDataType, item.RegionFlags = 1, kind, 0
            item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
            item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
            item.PhysicalUnitsXDirection, item.PhysicalUnitsYDirection = 3, 3
            item.PhysicalDeltaX, item.PhysicalDeltaY = 0.01, 0.01
            items.append(item)
        ds.SequenceOfUltrasoundRegions = DicomSequence(items)
    return ds


def make_palette_image(index: np.ndarray, lut: np.ndarray, *, entry_bits: int = 8, modality: str = "US",
                       sop_class_uid: str = ULTRASOUND) -> Dataset:
    """A PALETTE COLOR image: ``index`` (uint8 or uint16) into ``lut`` (``(entries, 3)``, values < 2**entry_bits).

    The LUT data are written with 16-bit entries when ``entry_bits`` is 16 (else 8-bit entries in OW words).
    """
    arr = np.asarray(index)
    ds = make_colour_image(np.zeros((*arr.shape, 3), np.uint8), modality=modality, sop_class_uid=sop_class_uid)
    del ds.PlanarConfiguration
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated = ds.BitsStored = arr.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    entries = len(lut)
    for i, colour in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [entries % 65536, 0, entry_bits])
        values = np.asarray(lut[:, i], dtype=np.uint16 if entry_bits == 16 else np.uint8)
        data = values.astype("<u2").tobytes() if entry_bits == 16 else values.tobytes()
        if len(data) % 2:
            data += b"\x00"
        setattr(ds, f"{colour}PaletteColorLookupTableData", data)
        ds[f"{colour}PaletteColorLookupTableData"].VR = "OW"
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW" if arr.dtype.itemsize == 2 else "OB"
    return ds
