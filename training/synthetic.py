"""Small synthetic phantoms written as DICOM series: the tiny data that tests and examples train on."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np


def head_phantom(size: int = 128, slices: int = 4, seed: int = 0) -> np.ndarray:
    """A head-like phantom in HU ``(slices, size, size)``: skull ring, brain, a few inserts varying along z."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    c = (size - 1) / 2
    out = np.full((slices, size, size), -1000.0, np.float32)
    inserts = [(rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.05, 0.12),
                rng.choice([-100, 60, 120, 300]))
               for _ in range(5)]
    for k in range(slices):
        a, b = 0.44 * size * (1 - 0.02 * k), 0.36 * size * (1 - 0.02 * k)
        r = ((yy - c) / a) ** 2 + ((xx - c) / b) ** 2
        out[k][r < 1.0] = 1000.0  # skull
        out[k][r < 0.85] = 35.0  # brain
        for dy, dx, rad, hu in inserts:
            m = (yy - c - dy * size) ** 2 + (xx - c - dx * size) ** 2 < (rad * size * (1 + 0.05 * k)) ** 2
            out[k][m & (r < 0.85)] = hu
        out[k][(np.abs(yy - c) < 1.5) & (np.abs(xx - c - 0.1 * size) < 0.15 * size)] = 700.0  # a thin dense bar
    return out


def write_series(folder: str | Path, volume: np.ndarray, modality: str = "CT", pixel_mm: float = 0.5,
                 thickness: float = 1.0, series_uid: str | None = None, transfer_syntax: str | None = None) -> Path:
    """Write ``volume`` (physical units; HU for CT) as one DICOM file per slice in ``folder``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    intercept = -1024.0 if modality == "CT" else 0.0
    for k, img in enumerate(volume):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.PatientID = "SYNTH"
        ds.StudyDate = _dt.date(2026, 1, 1).strftime("%Y%m%d")
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(k * thickness)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [pixel_mm, pixel_mm]
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = img.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = 1.0
        ds.RescaleIntercept = intercept
        stored = np.clip(np.round(img - intercept), 0, 65535).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"{k + 1:04d}.dcm", enforce_file_format=True)
    return folder
