"""Synthetic CT series for tests, benchmarks and demonstrations (no patient data).

A water cylinder with a few inserts of other densities, Gaussian noise, signed 16-bit with the usual CT rescale
(slope 1, intercept -1024 written as stored values offset), axial slices along +z.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

#: UID root used for every synthetic object (pydicom's, plus a fixed suffix for recognisability).
SYNTHETIC_ROOT = "1.2.826.0.1.3680043.8.498."


def phantom_slice(rows: int, cols: int, z: float, rng: np.random.Generator, noise_sd: float = 20.0) -> np.ndarray:
    """One slice of the phantom in HU as float32: air, a water cylinder, inserts, Gaussian noise."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    r = np.hypot(yy - cy, xx - cx)
    image = np.full((rows, cols), -1000.0, dtype=np.float32)
    image[r < 0.42 * min(rows, cols)] = 0.0
    for angle, hu in ((0.0, 1000.0), (1.57, -100.0), (3.14, 60.0), (4.71, 300.0)):
        iy = cy + 0.22 * rows * np.sin(angle + z / 50.0)
        ix = cx + 0.22 * cols * np.cos(angle + z / 50.0)
        image[np.hypot(yy - iy, xx - ix) < 0.05 * min(rows, cols)] = hu
    image += rng.normal(0.0, noise_sd, size=image.shape).astype(np.float32)
    return image


def make_ct_series(out_dir: str | Path, n_slices: int = 300, rows: int = 512, cols: int = 512,
                   slice_thickness: float = 1.0, seed: int = 0, series_description: str = "SYNTHETIC CT",
                   study_uid: str | None = None, modality: str = "CT") -> list[Path]:
    """Write a synthetic axial CT series (one file per slice) and return the file paths in slice order.

    Parameters
    ----------
    out_dir : path
        Folder to write ``CT000001.dcm`` ... into (created when missing).
    n_slices, rows, cols : int
        Series size.
    seed : int
        Seed for the noise, so a series is reproducible.
    study_uid : str, optional
        Put the series into this study (a new study otherwise).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid(SYNTHETIC_ROOT)
    series_uid = generate_uid(SYNTHETIC_ROOT)
    frame_uid = generate_uid(SYNTHETIC_ROOT)
    paths = []
    for i in range(n_slices):
        z = i * slice_thickness
        hu = phantom_slice(rows, cols, z, rng)
        stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.int16)
        sop_uid = generate_uid(SYNTHETIC_ROOT)

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = "SYN0001"
        ds.Modality = modality
        ds.Manufacturer = "dicom-node synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "SYNTHETIC STUDY"
        ds.SeriesDescription = series_description
        ds.PatientName = "SYNTHETIC^PHANTOM"
        ds.PatientID = "SYN-0001"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "HEAD"
        ds.SliceThickness = f"{slice_thickness:g}"
        ds.KVP = "120"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [f"{-cols * 0.25:g}", f"{-rows * 0.25:g}", f"{z:g}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = ["0.5", "0.5"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16  # stored values run to 4095 (HU + 1024): 12 signed bits would wrap the bone insert
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = stored.tobytes()
        path = out / f"CT{i + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
