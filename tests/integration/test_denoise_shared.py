"""Derived series made from the real data in ``../shared/data`` (head, body and limb CT, MR, CR/XA, US and
endoscopy DICOM): dciodvfy, pydicom, SimpleITK geometry, and a reference to every source slice.

Every folder is scanned whole and must hold exactly what :data:`FOLDERS` says (series, instances, files the scan
refuses and why), so a changed folder fails loudly instead of being tested silently on less. To keep CI short
only a deterministic sample is denoised: at most :data:`MAX_INSTANCES` instances of a series (evenly spread,
first and last included) and :data:`LIMB_PATIENTS` of the twelve limb patients; small folders are denoised
whole. Modalities without a model here (XA, US, OT) must be refused with their reason.

A tiny random-weight model (a test fixture, never shipped) changes the pixels so the files are realistic.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from dicom_node.denoise.engine import Engine, denoise_series
from dicom_node.denoise.errors import SeriesRefused
from dicom_node.denoise.series import Series, scan
from models.folder import load_model_folder
from tests.fixtures.images import make_tiny_model
from tests.helpers import require_program

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

#: Instances denoised per series at most (evenly spread over the series, first and last included).
MAX_INSTANCES = 8
#: The limb patients denoised (every fourth of the twelve).
LIMB_PATIENTS = ("STS_001", "STS_005", "STS_009")


@dataclass(frozen=True)
class Expected:
    """What a scan of one folder finds: image series, their instances and frames, refused files by reason."""

    modality: str | None
    series: int
    instances: int
    frames: int
    skipped: tuple[tuple[str, int], ...] = ()  # (start of the reason, files)
    refused: str = ""  # the reason every series of the folder is refused with ("" = denoised)


#: Every DICOM folder under ct/, mr/, xr/, us/ and endoscopy/, exactly as it must scan.
FOLDERS: dict[str, Expected] = {
    "ct/ge-head-7mm": Expected("CT", 1, 28, 28),
    "ct/philips-head-phantom-highdose-2.5mm": Expected("CT", 1, 54, 54, (("not an image (no Rows/Columns)", 1),)),
    "ct/philips-head-phantom-lowdose-1mm": Expected("CT", 1, 70, 70),
    "ct/philips-head-phantom-lowdose-5mm": Expected("CT", 1, 28, 28, (("not an image (no Rows/Columns)", 1),)),
    "ct/tcia-cc-tumor-pelvis-lowdose-2.5mm": Expected("CT", 1, 296, 296),
    # Six patients, single-slice series (axial, coronal, sagittal); 22 write RescaleType 'Houndsfield Unit'.
    "ct/tcia-covid19-ny-sbu-body-slices": Expected("CT", 35, 35, 35),
    "ct/tcia-sts-limb-cropped": Expected("CT", 12, 780, 780),
    "mr/siemens-acr-phantom-t1": Expected("MR", 1, 12, 12),
    "mr/siemens-xa30-bold-enhanced": Expected("MR", 1, 20, 660),
    "mr/siemens-xa30-t1-enhanced": Expected("MR", 1, 1, 96),
    "mr/tcia-remind-t1c": Expected("MR", 1, 176, 176),
    "mr/tcia-remind-t2-space": Expected("MR", 1, 192, 192),
    "mr/tcia-vs-seg-t1-mprage": Expected("MR", 1, 120, 120),
    "xr/wg04-cr-hip-RG2.dcm": Expected("CR", 1, 1, 1),
    "xr/wg04-cr-tibia-RG3-jpegls.dcm": Expected("CR", 1, 1, 1),
    "xr/XA1_UNC.dcm": Expected("XA", 1, 1, 1, refused="is for MR, CR series, not XA"),
    # Colour (RGB, palette) is read as RGB; these folders go end to end in tests/integration/test_modalities.py.
    "us/dicom": Expected("US", 3, 3, 3, refused="is for MR, CR series, not US"),
    "endoscopy/wg04-vl": Expected("OT", 2, 2, 2, refused="is for MR, CR series, not OT"),
}
#: Folders of exported images without DICOM headers (PNG, JPEG, NIfTI/NRRD): training data, not node input.
NOT_DICOM = {"mr/volumes", "xr/nih-chestxray14-png", "us/hc18-fetal-head", "endoscopy/kvasir-seg-jpeg"}


def sample(series: Series) -> Series:
    """At most :data:`MAX_INSTANCES` instances of ``series``, evenly spread, in slice order."""
    n = len(series.instances)
    if n <= MAX_INSTANCES:
        return series
    keep = sorted({int(i) for i in np.linspace(0, n - 1, MAX_INSTANCES).round()})
    return Series(series.series_instance_uid, [series.instances[i] for i in keep], series.normal)


def test_every_shared_folder_is_known(shared_data: Path) -> None:
    found = {str(p.relative_to(shared_data)) for top in ("ct", "mr", "xr", "us", "endoscopy")
             for p in (shared_data / top).iterdir() if not p.name.upper().startswith("README")}
    assert found == set(FOLDERS) | NOT_DICOM, "a shared folder was added or removed: update FOLDERS"


@pytest.fixture(scope="module")
def scanned(shared_data: Path) -> dict[str, object]:
    """Every folder of :data:`FOLDERS` scanned whole (headers only)."""
    return {name: scan([shared_data / name]) for name in FOLDERS}


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_folder_holds_exactly_what_is_expected(scanned: dict, name: str) -> None:
    expected, result = FOLDERS[name], scanned[name]
    assert len(result.series) == expected.series
    assert sum(len(s.instances) for s in result.series) == expected.instances
    assert sum(s.frame_count for s in result.series) == expected.frames
    assert {s.modality for s in result.series} == ({expected.modality} if expected.series else set())
    skipped = sorted(why for _, why in result.skipped)
    assert len(skipped) == sum(n for _, n in expected.skipped), skipped
    for start, n in expected.skipped:
        assert sum(why.startswith(start) for why in skipped) == n, skipped


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Engine]:
    root = tmp_path_factory.mktemp("models")
    ct = Engine(load_model_folder(make_tiny_model(root, name="ct", identity=False)))
    other = Engine(load_model_folder(make_tiny_model(
        root, name="other", modalities=["MR", "CR"], input_unit="modality", mode="per-image", clip=None,
        identity=False)))
    return {"CT": ct, "other": other}


def _chosen(name: str, series: list[Series]) -> list[Series]:
    if name == "ct/tcia-sts-limb-cropped":
        series = [s for s in series if s.instances[0].path.parent.name in LIMB_PATIENTS]
        assert len(series) == len(LIMB_PATIENTS)
    return [sample(s) for s in series]


@pytest.fixture(scope="module")
def derived(scanned: dict, engines: dict[str, Engine],
            tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Series, list[Path]]]:
    """The sample of every denoised folder, denoised once: (source series as sampled, derived files)."""
    root = tmp_path_factory.mktemp("derived")
    out = []
    for name, expected in FOLDERS.items():
        if expected.refused or not expected.series:
            continue
        for series in _chosen(name, scanned[name].series):
            engine = engines["CT" if series.modality == "CT" else "other"]
            result = denoise_series(series, engine, root / series.series_instance_uid, strength=1.0)
            assert len(result.paths) == len(series.instances)
            out.append((series, result.paths))
    return out


def test_the_sample_is_what_ci_denoises(derived: list[tuple[Series, list[Path]]]) -> None:
    per_modality: dict[str, int] = {}
    for series, paths in derived:
        per_modality[series.modality] = per_modality.get(series.modality, 0) + len(paths)
    # CT: head 8, phantom 3 x 8, pelvis 8, 35 body slices, 3 limb patients x 8; MR: 8 + 8 BOLD volumes + 1 + 3 x 8.
    assert per_modality == {"CT": 8 + 24 + 8 + 35 + 24, "MR": 8 + 8 + 1 + 24, "CR": 2}
    assert len(derived) == 4 + 1 + 35 + 3 + 6 + 2


def test_series_without_a_model_are_refused_with_the_reason(
        scanned: dict, engines: dict[str, Engine], tmp_path: Path) -> None:
    for name, expected in FOLDERS.items():
        if expected.refused:
            for series in scanned[name].series:
                with pytest.raises(SeriesRefused, match=expected.refused):
                    denoise_series(series, engines["other"], tmp_path / "refused")
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())


def _dciodvfy_errors(dciodvfy: str, path: Path) -> set[str]:
    proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
    return {line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")}


def test_dciodvfy_reports_no_errors_the_source_did_not_have(derived: list[tuple[Series, list[Path]]]) -> None:
    """Derived instances keep the source's patient, study and series attributes as written, so an error of the
    source file (the limb CT's 17-character StudyID, a Toshiba slice's empty CodeMeaning) stays; any other error
    is the node's."""
    dciodvfy = require_program("dciodvfy")
    problems = []
    for series, paths in derived:
        sources = {inst.sop_instance_uid: inst.path for inst in series.instances}
        for path in paths:
            (ref,) = _referenced(pydicom.dcmread(path, stop_before_pixels=True))
            source_errors = _dciodvfy_errors(dciodvfy, sources[ref])
            new = _dciodvfy_errors(dciodvfy, path) - source_errors
            if new:
                problems.append(f"{series.describe()} {path.name}: {sorted(new)[:3]}")
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
            first = series.instances[0]
            pairs = [([first.path], [p]) for p in paths
                     if _referenced(pydicom.dcmread(p, stop_before_pixels=True)) == {first.sop_instance_uid}]
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
    result = denoise_series(series, engine, tmp_path / "rle",
                            settings=DerivedSeriesSettings(transfer_syntax="rle-lossless"))
    sources = {inst.sop_instance_uid: inst.path for inst in series.instances}
    for path in result.paths[:5]:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
        src = pydicom.dcmread(sources[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)])
        np.testing.assert_array_equal(ds.pixel_array, src.pixel_array)  # identity model: exact, padding included
        proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
        assert not [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
