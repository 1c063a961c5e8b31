"""Derived series made from the real data in ``../shared/data`` (CT, enhanced MR, CR): dciodvfy, pydicom,
SimpleITK geometry, and a reference to every source slice.

A tiny random-weight model (a test fixture, never shipped) changes the pixels so the files are realistic.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from dicom_node.denoise.engine import Engine, denoise_series
from dicom_node.denoise.series import Series, scan
from dicom_node.denoise.testing import make_tiny_model
from models.folder import load_model_folder
from tests.helpers import require_program

pytestmark = pytest.mark.integration
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def derived(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Series, list[Path]]]:
    """Every series under ct/, mr/ and xr/ denoised once: (source series, derived files)."""
    root = tmp_path_factory.mktemp("derived")
    ct = Engine(load_model_folder(make_tiny_model(root / "models", name="ct", identity=False)))
    other = Engine(load_model_folder(make_tiny_model(
        root / "models", name="other", modalities=["MR", "CR"], input_unit="modality", mode="per-image", clip=None,
        identity=False)))
    out = []
    for sub in ("ct", "mr", "xr"):
        for series in scan([shared_data / sub]).series:
            engine = ct if series.modality == "CT" else other
            result = denoise_series(series, engine, root / "out" / series.series_instance_uid, strength=1.0)
            out.append((series, result.paths))
    return out


def test_all_series_were_found(derived: list[tuple[Series, list[Path]]]) -> None:
    modalities = sorted(s.modality for s, _ in derived)
    assert modalities.count("CT") == 4 and modalities.count("MR") == 3 and modalities.count("CR") == 2


def test_dciodvfy_reports_no_errors(derived: list[tuple[Series, list[Path]]]) -> None:
    dciodvfy = require_program("dciodvfy")
    problems = []
    for _series, paths in derived:
        for path in paths:
            proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
            errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
            if errors:
                problems.append(f"{path.name}: {errors[:3]}")
    assert not problems, "\n".join(problems[:20])


def _referenced(ds: pydicom.Dataset) -> set[str]:
    refs = {str(item.ReferencedSOPInstanceUID) for item in ds.get("SourceImageSequence", [])}
    for group in ds.get("PerFrameFunctionalGroupsSequence", []):
        for deriv in group.get("DerivationImageSequence", []):
            refs |= {str(i.ReferencedSOPInstanceUID) for i in deriv.SourceImageSequence}
    return refs


def test_every_source_slice_is_referenced_and_geometry_kept(derived: list[tuple[Series, list[Path]]]) -> None:
    for series, paths in derived:
        sources = {inst.sop_instance_uid: inst for inst in series.instances}
        seen: set[str] = set()
        uids = set()
        for path in paths:
            ds = pydicom.dcmread(path)
            refs = _referenced(ds)
            assert len(refs) == 1
            (ref,) = refs
            src = sources[ref].header
            seen.add(ref)
            uids.add(str(ds.SeriesInstanceUID))
            assert ds.StudyInstanceUID == src.StudyInstanceUID
            assert ds.get("FrameOfReferenceUID") == src.get("FrameOfReferenceUID")
            for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                       "Rows", "Columns", "NumberOfFrames", "BitsStored", "PixelRepresentation",
                       "PhotometricInterpretation"):
                assert ds.get(kw) == src.get(kw), kw
            if "PerFrameFunctionalGroupsSequence" in src:
                for a, b in zip(ds.PerFrameFunctionalGroupsSequence, src.PerFrameFunctionalGroupsSequence):
                    assert a.PlanePositionSequence[0].ImagePositionPatient == \
                        b.PlanePositionSequence[0].ImagePositionPatient
            assert ds.pixel_array.shape == (int(src.get("NumberOfFrames", 1)), src.Rows, src.Columns)[
                (0 if "NumberOfFrames" in src else 1):]
        assert seen == set(sources), f"{series.describe()}: not every source instance is referenced"
        assert len(uids) == 1 and series.series_instance_uid not in uids


def _sitk_read(paths: list[Path]) -> sitk.Image:
    if len(paths) == 1:
        return sitk.ReadImage(str(paths[0]))
    reader = sitk.ImageSeriesReader()
    folder = str(paths[0].parent)
    uid = reader.GetGDCMSeriesIDs(folder)[0]
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder, uid))
    return reader.Execute()


def test_simpleitk_sees_the_same_geometry(derived: list[tuple[Series, list[Path]]], tmp_path: Path) -> None:
    for series, paths in derived:
        if series.instances[0].is_multiframe and len(series.instances) > 1:
            # BOLD: 20 multi-frame volumes; compare the first volume file by file
            pairs = [([series.instances[0].path], [p]) for p in paths
                     if _referenced(pydicom.dcmread(p, stop_before_pixels=True)) == {series.instances[0].sop_instance_uid}]
        else:
            src_dir = tmp_path / series.series_instance_uid
            src_dir.mkdir()
            for inst in series.instances:  # source folders may hold several series: link this one's files
                (src_dir / inst.path.name).symlink_to(inst.path)
            pairs = [(sorted(src_dir.iterdir()), paths)]
        for src_paths, out_paths in pairs:
            a, b = _sitk_read(list(src_paths)), _sitk_read(list(out_paths))
            assert a.GetSize() == b.GetSize(), series.describe()
            np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_rle_lossless_output_is_valid_and_lossless(shared_data: Path, tmp_path: Path) -> None:
    from dicom_node.denoise.derived import DerivedSeriesSettings

    dciodvfy = require_program("dciodvfy")
    (series,) = scan([shared_data / "ct" / "ge-head-7mm"]).series
    engine = Engine(load_model_folder(make_tiny_model(tmp_path / "models", name="id")))
    result = denoise_series(series, engine, tmp_path / "rle", settings=DerivedSeriesSettings(transfer_syntax="rle-lossless"))
    sources = {inst.sop_instance_uid: inst.path for inst in series.instances}
    for path in result.paths[:5]:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
        src = pydicom.dcmread(sources[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)])
        np.testing.assert_array_equal(ds.pixel_array, src.pixel_array)  # identity model: exact, padding included
        proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
        assert not [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
