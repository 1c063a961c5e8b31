"""Every modality end to end: real files of MR, CR, US and endoscopy sent by storescu to the real node, denoised
by their own routing rule, delivered to Orthanc, and valid under dciodvfy (no error the source did not have).

The sources are real files from ``../shared/data``, and two multi-frame objects made in the test from real frames
(no multi-frame ultrasound or endoscopy file exists there): an Ultrasound Multi-frame Image from US1's frame
and a JPEG-baseline Video Endoscopic Image from the two WG04 endoscopy stills.

Each rule names the bundled model of its modality (``mr-cnn``, ``xr-cnn``, ``us-cnn``, ``endo-cnn``). When
``models/bundled/<name>`` exists and fits the case (its modalities, samples per pixel), the test uses it; else a
small random-weight model of the same card shape (a test fixture, never shipped). :data:`MODEL_SOURCE` says which
was used, and ``test_which_models_were_used`` prints it.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from dicom_node.denoise.model_check import suggested_body_part_pattern
from dicom_node.denoise.pixels import GREY_TOLERANCE, tissue_region_mask
from dicom_node.denoise.series import palette_to_rgb
from models.folder import CardError, ModelError, load_model_folder
from tests.fixtures.images import make_tiny_model
from tests.helpers import PROJECT_ROOT, require_program
from tests.integration.test_pipeline import pacs, wait_until, write_config
from tests.integration.test_receive import STORESCU_PROPOSE
from tests.peers import dicom_node, orthanc, storescu

pytestmark = pytest.mark.integration

BUNDLED = PROJECT_ROOT / "models" / "bundled"
ULTRASOUND_MULTIFRAME = UID("1.2.840.10008.5.1.4.1.1.3.1")
VIDEO_ENDOSCOPIC = UID("1.2.840.10008.5.1.4.1.1.77.1.1.1")


@dataclass(frozen=True)
class ModelShape:
    """What a bundled model must be for these cases, and the card of the stand-in when it is not there."""

    modalities: tuple[str, ...]
    samples_per_pixel: int = 1
    context: int = 0


#: The bundled model of each modality, as the routing examples name them (dicom_node/example.toml).
MODELS = {
    "mr-cnn": ModelShape(("MR",), context=1),
    "xr-cnn": ModelShape(("CR", "DX", "XA")),
    "us-cnn": ModelShape(("US",)),
    "endo-cnn": ModelShape(("ES", "XC", "OT"), samples_per_pixel=3),
}
#: One rule per modality family.
RULES: list[dict[str, Any]] = [
    {"name": "mr", "match": {"Modality": "MR"}, "model": "mr-cnn"},
    {"name": "xray", "match": {"Modality": ["CR", "DX", "XA"]}, "model": "xr-cnn"},
    {"name": "ultrasound", "match": {"Modality": "US"}, "model": "us-cnn"},
    {"name": "endoscopy", "match": {"Modality": ["ES", "XC", "OT"]}, "model": "endo-cnn"},
]
#: Model name -> "bundled" or "test model (<why>)", filled by the ``models`` fixture.
MODEL_SOURCE: dict[str, str] = {}


@dataclass(frozen=True)
class Case:
    """One source object sent to the node, and what its derived object must show."""

    name: str
    model: str
    files: Callable[[Path, Path], list[Path]]  # (shared data, scratch folder) -> files to send
    checks: tuple[str, ...] = field(default=())


def _shared(*parts: str) -> Callable[[Path, Path], list[Path]]:
    return lambda data, _tmp: [data.joinpath(*parts)]


def _mprage_slices(data: Path, tmp: Path) -> list[Path]:
    """Four adjacent slices of the real 3D T1 (JPEG-LS, 512x512): neighbouring slices for a context model.

    Copies, with BodyPartExamined BRAIN (the files leave it out), so a rule for a brain model routes them.
    """
    out = []
    for n in range(59, 63):
        ds = pydicom.dcmread(data / "mr" / "tcia-vs-seg-t1-mprage" / f"1-{n:03d}.dcm")
        ds.BodyPartExamined = "BRAIN"
        out.append(tmp / f"mprage-{n:03d}.dcm")
        ds.save_as(out[-1], enforce_file_format=True)
    return out


def _enhanced_mr(data: Path, _tmp: Path) -> list[Path]:
    return sorted((data / "mr" / "siemens-xa30-t1-enhanced").iterdir())


def _us_cine(data: Path, tmp: Path) -> list[Path]:
    """An Ultrasound Multi-frame Image of four frames: US1's real frame moved 2 px further per frame (a probe
    sliding), its Doppler colours included."""
    ds = pydicom.dcmread(data / "us" / "dicom" / "US1_UNC.dcm")
    rgb = ds.pixel_array
    frames = np.stack([np.roll(rgb, 2 * k, axis=0) for k in range(4)])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ULTRASOUND_MULTIFRAME
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = "CINE"
    ds.NumberOfFrames, ds.FrameTime, ds.FrameIncrementPointer = 4, "33.3", 0x00181063
    ds.PixelData = frames.tobytes()
    path = tmp / "us-cine.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]


def _endoscopy_video(data: Path, tmp: Path) -> list[Path]:
    """A Video Endoscopic Image of three frames (the two WG04 stills, then the first again), each JPEG baseline
    (quality 85, 4:2:2) as endoscopy video is stored: YBR_FULL_422, already lossy."""
    from PIL import Image
    from pydicom.encaps import encapsulate

    first = pydicom.dcmread(data / "endoscopy" / "wg04-vl" / "VL1_UNC.dcm")
    second = pydicom.dcmread(data / "endoscopy" / "wg04-vl" / "VL2_UNC.dcm")
    blobs = []
    for frame in (first.pixel_array, second.pixel_array, first.pixel_array):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, "JPEG", quality=85, subsampling=1)
        blobs.append(buf.getvalue())
    ds = first
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = VIDEO_ENDOSCOPIC
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.SeriesDescription, ds.ImageType = "ES", "VIDEO", ["ORIGINAL", "PRIMARY"]
    if "ConversionType" in ds:  # Secondary Capture's; not part of the video IOD
        del ds.ConversionType
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "32849002", "SCT", "Esophagus"
    ds.AnatomicRegionSequence = DicomSequence([region])
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.NumberOfFrames, ds.FrameTime, ds.FrameIncrementPointer = 3, "40.0", 0x00181063
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "YBR_FULL_422", 0
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate(blobs)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    path = tmp / "endoscopy-video.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]


CASES = [
    Case("mr-enhanced-multiframe", "mr-cnn", _enhanced_mr, ("multiframe",)),
    Case("mr-mprage-jpegls-slices", "mr-cnn", _mprage_slices),
    Case("cr-monochrome1-jpegls", "xr-cnn", _shared("xr", "wg04-cr-tibia-RG3-jpegls.dcm"), ("grey-kept",)),
    Case("xa-10bit", "xr-cnn", _shared("xr", "XA1_UNC.dcm"), ("grey-kept",)),
    Case("us-rgb-doppler", "us-cnn", _shared("us", "dicom", "US1_UNC.dcm"), ("colour-untouched",)),
    Case("us-palette8-regions", "us-cnn", _shared("us", "dicom", "OBXXXX1A.dcm"),
         ("palette", "colour-untouched", "regions")),
    Case("us-palette16-regions", "us-cnn", _shared("us", "dicom", "gdcm-US-ALOKA-16.dcm"),
         ("palette", "colour-untouched", "regions")),
    Case("us-cine-multiframe", "us-cnn", _us_cine, ("multiframe", "colour-untouched")),
    Case("endoscopy-sc-rgb", "endo-cnn", _shared("endoscopy", "wg04-vl", "VL1_UNC.dcm")),
    Case("endoscopy-video-jpeg", "endo-cnn", _endoscopy_video, ("multiframe", "lossy")),
]


def _bundled_fits(name: str, shape: ModelShape, body_parts: set[str]) -> str:
    """``""`` when ``models/bundled/<name>`` loads and fits ``shape`` and the cases' ``body_parts``, else why not."""
    folder = BUNDLED / name
    if not (folder / "card.toml").exists():
        return "not bundled yet"
    try:
        card = load_model_folder(folder).card
    except (CardError, ModelError, OSError, ValueError) as exc:
        return f"does not load: {exc}"
    missing = [m for m in shape.modalities if m not in card.modalities]
    if missing:
        return f"its card lacks modalities {missing}"
    if card.samples_per_pixel != shape.samples_per_pixel:
        return f"samples_per_pixel {card.samples_per_pixel}, the cases need {shape.samples_per_pixel}"
    if card.body_parts and not body_parts <= {b.upper() for b in card.body_parts}:
        return f"its card lists body parts {card.body_parts}, the cases have {sorted(body_parts)}"
    MODEL_BODY_PARTS[name] = list(card.body_parts)
    return ""


#: Body parts of the bundled models used (a rule for such a model must match BodyPartExamined).
MODEL_BODY_PARTS: dict[str, list[str]] = {}


@pytest.fixture(scope="module")
def sent(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The files of every case, as they are sent (real files, or made from real frames in a scratch folder)."""
    tmp = tmp_path_factory.mktemp("sources")
    return {case.name: case.files(shared_data, tmp) for case in CASES}


@pytest.fixture(scope="module")
def models(sent: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model folder the node reads: each bundled model that fits, else a test model of its card's shape."""
    folder = tmp_path_factory.mktemp("models")
    for seed, (name, shape) in enumerate(MODELS.items()):
        body_parts = {str(pydicom.dcmread(p, stop_before_pixels=True).get("BodyPartExamined") or "").upper()
                      for case in CASES if case.model == name for p in sent[case.name]}
        why = _bundled_fits(name, shape, body_parts)
        if not why:
            shutil.copytree(BUNDLED / name, folder / name)
            MODEL_SOURCE[name] = "bundled"
            continue
        colour = shape.samples_per_pixel == 3
        make_tiny_model(folder, name=name, modalities=shape.modalities, input_unit="modality",
                        mode="fixed" if colour else "per-image", offset=0.0, scale=255.0 if colour else 1.0,
                        clip=None, identity=False, seed=seed, samples_per_pixel=shape.samples_per_pixel,
                        context=shape.context)
        MODEL_SOURCE[name] = f"test model ({why})"
    return folder


@dataclass
class Delivered:
    """What the node delivered for one case: the sources as sent and the derived files fetched from Orthanc."""

    sources: dict[str, Path]  # source SOP Instance UID -> file sent
    derived: dict[str, Path]  # source SOP Instance UID -> derived file as stored by Orthanc


def _referenced(ds: pydicom.Dataset) -> set[str]:
    refs = {str(item.ReferencedSOPInstanceUID) for item in ds.get("SourceImageSequence", [])}
    for group in ds.get("PerFrameFunctionalGroupsSequence", []):
        for deriv in group.get("DerivationImageSequence", []):
            refs |= {str(i.ReferencedSOPInstanceUID) for i in deriv.SourceImageSequence}
    return refs


def _orthanc_instances(peer: Any) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{peer.http_port}/instances", timeout=30) as rsp:
        return json.loads(rsp.read())


@pytest.fixture(scope="module")
def delivered(models: Path, sent: dict[str, list[Path]],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Delivered]:
    """Every case sent to one node by storescu, each modality routed by its rule; the derived objects fetched back
    from Orthanc, mapped to their sources by their references."""
    require_program("Orthanc")
    tmp = tmp_path_factory.mktemp("modalities")
    owner = {}
    for case in CASES:
        for path in sent[case.name]:
            owner[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = (case.name, path)
    rules = [dict(rule, strength=1.0, destinations=["pacs"], quiet_seconds=1.0) for rule in RULES]
    for rule in rules:
        if MODEL_BODY_PARTS.get(rule["model"]):
            rule["match"] = dict(rule["match"], BodyPartExamined=suggested_body_part_pattern(
                MODEL_BODY_PARTS[rule["model"]]))
    with orthanc(tmp / "orthanc") as pacs_peer:
        config = write_config(tmp / "node.toml", models, [pacs(pacs_peer)], rules)
        with dicom_node(tmp / "node", config=config) as node:
            for case in CASES:
                for path in sent[case.name]:  # each file in its own transfer syntax: nothing transcoded on the way
                    ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                    result = storescu(node.port, "DENOISE", [path], extra=["-R", STORESCU_PROPOSE[ts]])
                    assert result.returncode == 0, f"{case.name}: {result.stderr[-2000:]}"
            wait_until(lambda: len(_orthanc_instances(pacs_peer)) >= len(owner), 300,
                       f"{len(owner)} derived instances in Orthanc")
        out: dict[str, Delivered] = {case.name: Delivered({}, {}) for case in CASES}
        (tmp / "derived").mkdir()
        for orthanc_id in _orthanc_instances(pacs_peer):
            path = tmp / "derived" / f"{orthanc_id}.dcm"
            with urllib.request.urlopen(f"http://127.0.0.1:{pacs_peer.http_port}/instances/{orthanc_id}/file",
                                        timeout=60) as rsp:
                path.write_bytes(rsp.read())
            (ref,) = _referenced(pydicom.dcmread(path, stop_before_pixels=True))
            name, source = owner[ref]
            out[name].sources[ref] = source
            out[name].derived[ref] = path
    return out


def test_which_models_were_used(models: Path) -> None:
    """Says, in the test output, whether each rule ran its bundled model or a stand-in of the same shape."""
    print("\n" + "\n".join(f"{name}: {MODEL_SOURCE[name]}" for name in MODELS))
    assert set(MODEL_SOURCE) == set(MODELS)


def _rgb_of(source: pydicom.Dataset) -> np.ndarray:
    """The source's pixels as the node reads them (a palette applied), frames first."""
    arr = source.pixel_array
    if source.PhotometricInterpretation == "PALETTE COLOR":
        arr = palette_to_rgb(arr, source)
    return arr if int(source.get("NumberOfFrames", 1) or 1) > 1 else arr[np.newaxis]


def _dciodvfy_errors(path: Path) -> set[str]:
    proc = subprocess.run([require_program("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    return {line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_denoised_by_its_rule_and_delivered(delivered: dict[str, Delivered], case: Case) -> None:
    got = delivered[case.name]
    assert got.derived and set(got.derived) == set(got.sources), f"{case.name}: not every source came back derived"
    changed = 0
    for ref, path in got.derived.items():
        src, ds = pydicom.dcmread(got.sources[ref]), pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # never re-encoded, lossily or at all
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert ds.SOPClassUID == src.SOPClassUID and ds.Modality == src.Modality
        # Enhanced objects carry it in DerivationImageSequence (in the functional groups), the others at the top.
        [description, *_] = [str(e.value) for e in ds.iterall() if e.keyword == "DerivationDescription"]
        assert list(ds.ImageType)[0] == "DERIVED" and case.model in description
        # The trust check's verdict reached PACS in the header (written in place before the export).
        assert "; trust check: " in description and "pending" not in description
        assert ds.get("NumberOfFrames") == src.get("NumberOfFrames")
        colour = src.PhotometricInterpretation not in ("MONOCHROME1", "MONOCHROME2")
        if colour:
            assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration) == ("RGB", 3, 0)
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (8, 8, 7, 0)
            before = _rgb_of(src)
        else:
            for kw in ("PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                       "SamplesPerPixel", "RescaleSlope", "RescaleIntercept"):
                assert ds.get(kw) == src.get(kw), kw
            before = src.pixel_array if "NumberOfFrames" in src and int(src.NumberOfFrames) > 1 \
                else src.pixel_array[np.newaxis]
        after = ds.pixel_array if int(ds.get("NumberOfFrames", 1) or 1) > 1 else ds.pixel_array[np.newaxis]
        assert after.shape == before.shape
        changed += int((after != before).sum())
        if "grey-kept" in case.checks:
            assert 0 <= after.min() and after.max() < 1 << int(src.BitsStored)
        if "multiframe" in case.checks and "PerFrameFunctionalGroupsSequence" in src:
            assert len(ds.PerFrameFunctionalGroupsSequence) == int(src.NumberOfFrames)
        if "palette" in case.checks:
            assert not [e for e in ds if "PaletteColorLookupTable" in e.keyword]
        if "colour-untouched" in case.checks:
            spread = before.max(axis=-1).astype(int) - before.min(axis=-1)
            doppler = spread > GREY_TOLERANCE
            assert doppler.any(), "the source has colour pixels to keep"
            np.testing.assert_array_equal(after[doppler], before[doppler])
        if "regions" in case.checks:
            region = tissue_region_mask(src, int(src.Rows), int(src.Columns))
            assert region is not None and (~region).any()
            np.testing.assert_array_equal(after[:, ~region], before[:, ~region])
        if "lossy" in case.checks:
            assert ds.LossyImageCompression == "01"
            assert list(np.atleast_1d(ds.LossyImageCompressionMethod))[-1] == "ISO_10918_1"
            assert float(np.atleast_1d(ds.LossyImageCompressionRatio)[-1]) > 1.0
    assert changed > 0, f"{case.name}: the model changed nothing ({MODEL_SOURCE.get(case.model)})"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_dciodvfy_reports_no_error_the_source_did_not_have(delivered: dict[str, Delivered], case: Case) -> None:
    got = delivered[case.name]
    problems = []
    for ref, path in got.derived.items():
        new = _dciodvfy_errors(path) - _dciodvfy_errors(got.sources[ref])
        if new:
            problems.append(f"{path.name}: {sorted(new)}")
    assert not problems, "\n".join(problems)
