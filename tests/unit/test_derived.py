"""The derived-instance builder: identity, provenance and references by the rules of DESIGN.md."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from dicom_node import __version__
from dicom_node.denoise.derived import (
    DerivationInfo,
    build_derived_instance,
    derived_sop_instance_uid,
    new_series_uid,
)
from dicom_node.denoise.pixels import pixel_format_from_dataset
from dicom_node.denoise.series_writer import DerivedSeriesWriter, write_instance
from tests.fixtures.images import make_image, make_multiframe

SHA = "ab" * 32


def _info(**kw: object) -> DerivationInfo:
    base: dict[str, Any] = dict(series_instance_uid="1.2.3.4.5", model_name="ct-cnn", model_version="1.2.0",
                                model_sha256=SHA, strength=0.75,
                                created=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    base.update(kw)
    return DerivationInfo(**base)


@pytest.fixture()
def source() -> pydicom.Dataset:
    ds = make_image(np.arange(64, dtype=np.int16).reshape(8, 8), intercept=-1024.0, series_number=7,
                    series_description="HEAD 1MM")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "HELIX"]
    ds.add_new(0x00291010, "OB", b"private")
    return ds


def test_identity_and_numbering(source: pydicom.Dataset) -> None:
    fmt = pixel_format_from_dataset(source)
    pixels = np.full((8, 8), 5, dtype=np.int16)
    ds = build_derived_instance(source, pixels, fmt, _info())
    assert ds.SeriesInstanceUID == "1.2.3.4.5"
    assert ds.SOPInstanceUID == derived_sop_instance_uid("1.2.3.4.5", source.SOPInstanceUID) != source.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert ds.SeriesNumber == 1007
    assert ds.SeriesDescription == "HEAD 1MM DN"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL", "HELIX"]
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
               "PatientName", "PatientID", "RescaleSlope", "RescaleIntercept"):
        assert ds[kw].value == source[kw].value
    assert not any(elem.tag.is_private for elem in ds)
    np.testing.assert_array_equal(ds.pixel_array, pixels)


def test_provenance(source: pydicom.Dataset) -> None:
    ds = build_derived_instance(source, np.zeros((8, 8), np.int16), pixel_format_from_dataset(source), _info())
    assert "ct-cnn" in ds.DerivationDescription and "1.2.0" in ds.DerivationDescription
    assert "0.75" in ds.DerivationDescription and SHA[:12] in ds.DerivationDescription
    code = ds.DerivationCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("113087", "DCM", "Smoothing")
    (ref,) = ds.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    (equip,) = ds.ContributingEquipmentSequence
    assert equip.Manufacturer == "dicom-node"
    assert f"dicom-node {__version__}" in equip.SoftwareVersions
    assert "ct-cnn 1.2.0" in equip.SoftwareVersions
    assert SHA in equip.ContributionDescription
    assert equip.PurposeOfReferenceCodeSequence[0].CodeValue == "109103"
    assert equip.ContributionDateTime.startswith("20260102030405")


def test_deterministic_uids() -> None:
    assert new_series_uid("job-17") == new_series_uid("job-17") != new_series_uid("job-18")
    assert new_series_uid() != new_series_uid()


def test_pixels_are_checked(source: pydicom.Dataset) -> None:
    fmt = pixel_format_from_dataset(source)
    with pytest.raises(ValueError, match="shape"):
        build_derived_instance(source, np.zeros((4, 8), np.int16), fmt, _info())
    with pytest.raises(ValueError, match="dtype"):
        build_derived_instance(source, np.zeros((8, 8), np.uint16), fmt, _info())
    source.BitsStored = 12
    fmt12 = pixel_format_from_dataset(source)
    with pytest.raises(ValueError, match="BitsStored 12"):
        build_derived_instance(source, np.full((8, 8), 5000, np.int16), fmt12, _info())


def test_info_is_validated() -> None:
    with pytest.raises(ValueError, match="UID"):
        _info(series_instance_uid="not a uid")
    with pytest.raises(ValueError, match="strength"):
        _info(strength=1.5)
    with pytest.raises(ValueError, match="transfer_syntax"):
        _info(transfer_syntax="jpeg")


def test_rle_round_trip(source: pydicom.Dataset, tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(-1000, 1000, size=(8, 8)).astype(np.int16)
    ds = build_derived_instance(source, pixels, pixel_format_from_dataset(source),
                                _info(transfer_syntax="rle-lossless"))
    path = write_instance(ds, tmp_path)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(back.pixel_array, pixels)


def test_lossy_source_is_marked_lossy(source: pydicom.Dataset) -> None:
    source.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.91")  # JPEG 2000, lossy
    ds = build_derived_instance(source, np.zeros((8, 8), np.int16), pixel_format_from_dataset(source), _info())
    assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_15444_1"


def test_enhanced_references_each_frame() -> None:
    volume = np.zeros((3, 4, 4), dtype=np.uint16)
    src = make_multiframe(volume)
    ds = build_derived_instance(src, volume, pixel_format_from_dataset(src), _info())
    assert list(ds.ImageType)[:2] == ["DERIVED", "PRIMARY"]
    assert "SourceImageSequence" not in ds and "DerivationDescription" not in ds
    for i, group in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        item = group.DerivationImageSequence[0]
        assert item.SourceImageSequence[0].ReferencedFrameNumber == i
        assert item.DerivationCodeSequence[0].CodeValue == "113087"
    evidence = ds.SourceImageEvidenceSequence[0]
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID


def test_missing_type2_patient_attributes_are_added_empty(source: pydicom.Dataset) -> None:
    del source.PatientBirthDate
    del source.PatientSex
    ds = build_derived_instance(source, np.zeros((8, 8), np.int16), pixel_format_from_dataset(source), _info())
    assert ds.PatientBirthDate == "" and ds.PatientSex == ""


def test_rle_multiframe_round_trip(tmp_path: Path) -> None:
    volume = np.random.default_rng(1).integers(0, 4095, size=(3, 6, 5)).astype(np.uint16)
    src = make_multiframe(volume)
    ds = build_derived_instance(src, volume, pixel_format_from_dataset(src), _info(transfer_syntax="rle-lossless"))
    back = pydicom.dcmread(write_instance(ds, tmp_path))
    assert back.file_meta.TransferSyntaxUID == RLELossless and back.NumberOfFrames == 3
    np.testing.assert_array_equal(back.pixel_array, volume)


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_private_elements_go_at_every_level_of_a_file_read_raw(source: pydicom.Dataset, tmp_path: Path,
                                                               implicit_vr: bool) -> None:
    item = pydicom.Dataset()
    item.CodeValue = "X1"
    item.add_new(0x00431001, "LO", "vendor secret")
    source.ProcedureCodeSequence = pydicom.Sequence([item])
    path = tmp_path / "source.dcm"
    source.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
    source.save_as(path, enforce_file_format=True)
    raw = pydicom.dcmread(path)  # elements stay raw until touched, as in the worker
    ds = build_derived_instance(raw, np.full((8, 8), 5, dtype=np.int16), pixel_format_from_dataset(raw), _info())
    assert not [elem.tag for elem in ds.iterall() if elem.tag.is_private]
    assert ds.ProcedureCodeSequence[0].CodeValue == "X1"


def _save_as_bytes(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _derived_from_file(path: Path, transfer_syntax: str = "explicit-vr-little-endian") -> pydicom.Dataset:
    raw = pydicom.dcmread(path)  # elements stay raw until touched, as in the worker
    fmt = pixel_format_from_dataset(raw)
    frames = int(raw.get("NumberOfFrames", 1) or 1)
    shape = (frames, int(raw.Rows), int(raw.Columns)) if frames > 1 else (int(raw.Rows), int(raw.Columns))
    pixels = np.full(shape, fmt.stored_range[0] + 5, dtype=fmt.dtype)
    return build_derived_instance(raw, pixels, fmt, _info(transfer_syntax=transfer_syntax))


@pytest.mark.parametrize("source_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("derived_syntax", ["explicit-vr-little-endian", "rle-lossless"])
def test_encode_file_writes_what_pydicom_writes(source: pydicom.Dataset, tmp_path: Path, source_syntax: UID,
                                                derived_syntax: str) -> None:
    from dicom_node.encoding import encode_file

    item = pydicom.Dataset()
    item.CodeValue = "X1"
    item.CodeMeaning = "odd"  # odd length: padded by the writer, stored padded
    source.ProcedureCodeSequence = pydicom.Sequence([item])
    source.add_new(0x00181030, "LO", "PROTOCOL ÄÖ")  # a non-ASCII value under the default character set
    path = tmp_path / "source.dcm"
    source.file_meta.TransferSyntaxUID = source_syntax
    source.save_as(path, enforce_file_format=True)
    ds = _derived_from_file(path, derived_syntax)
    ours = encode_file(ds)
    assert ours == _save_as_bytes(ds)
    written = write_instance(ds, tmp_path / "out")
    assert written.read_bytes() == ours and pydicom.dcmread(written).ProcedureCodeSequence[0].CodeValue == "X1"


def test_encode_file_writes_what_pydicom_writes_for_real_scanner_files(shared_data: Path, tmp_path: Path) -> None:
    from dicom_node.encoding import encode_file

    folders = ["ct/ge-head-7mm", "ct/philips-head-phantom-lowdose-1mm", "mr/siemens-acr-phantom-t1",
               "mr/siemens-xa30-t1-enhanced"]
    checked = 0
    for folder in folders:
        for path in sorted((shared_data / folder).iterdir())[:2]:
            ds = _derived_from_file(path)
            assert encode_file(ds) == _save_as_bytes(ds), path
            checked += 1
    assert checked == 7


def _every_element_reencoded_by_pydicom(data: bytes) -> bytes:
    """``data`` read back, every element decoded, and written again by pydicom from the decoded values."""
    from io import BytesIO

    back = pydicom.dcmread(BytesIO(data))
    for _ in back.iterall():  # decodes every element, nested ones too
        pass
    return _save_as_bytes(back)


@pytest.mark.parametrize("source_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_pre_encoded_elements_are_what_pydicom_encodes(source: pydicom.Dataset, tmp_path: Path,
                                                       source_syntax: UID) -> None:
    """The builder encodes its new elements itself (once per series, or by hand for the UIDs): pydicom, encoding
    the same values, must write the same bytes."""
    from dicom_node.encoding import encode_file

    source.SpecificCharacterSet = "ISO_IR 100"
    source.SeriesDescription = "TÊTE 1MM"  # an odd-length, non-ASCII value in the new SeriesDescription
    source.SOPInstanceUID = "1.2.3.4.5.6.7"  # odd length: the referencing UID is padded with NUL
    path = tmp_path / "source.dcm"
    source.file_meta.TransferSyntaxUID = source_syntax
    source.save_as(path, enforce_file_format=True)
    ds = _derived_from_file(path)
    ours = encode_file(ds)
    assert ours == _every_element_reencoded_by_pydicom(ours)
    back = pydicom.dcmread(write_instance(ds, tmp_path / "out"))
    assert back.SeriesDescription == "TÊTE 1MM DN"
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == "1.2.3.4.5.6.7"


def test_pre_encoded_elements_are_what_pydicom_encodes_for_real_scanner_files(shared_data: Path) -> None:
    from dicom_node.encoding import encode_file

    checked = 0
    for folder in ["ct/ge-head-7mm", "ct/philips-head-phantom-lowdose-1mm", "mr/siemens-acr-phantom-t1"]:
        for path in sorted((shared_data / folder).iterdir())[:2]:
            ours = encode_file(_derived_from_file(path))
            assert ours == _every_element_reencoded_by_pydicom(ours), path
            checked += 1
    assert checked == 6


# ------------------------------------------------------------------------------------------------- series writer


def _series_writer_matches_builder(paths: list[Path], tmp_path: Path,
                                   edit: Callable[[int, pydicom.Dataset], object] | None = None) -> DerivedSeriesWriter:
    """Write every file's derived instance with a DerivedSeriesWriter and with build_derived_instance +
    write_instance; require the same bytes for each. ``edit(index, ds)`` may change a source before both."""
    from dicom_node.denoise.series import read_frames, read_instance_header

    info = _info(series_instance_uid=new_series_uid())
    writer = DerivedSeriesWriter(info)
    for index, path in enumerate(paths):
        inst = read_instance_header(path)
        made = []
        for how in ("writer", "builder"):
            ds, stored = read_frames(inst)  # a fresh dataset each time: the builder decodes elements in it
            if edit is not None:
                edit(index, ds)
            pixels = stored[::-1].copy() if stored.shape[0] > 1 else stored[0][::-1].copy()  # other pixels
            pixels = pixels.reshape(stored.shape if stored.shape[0] > 1 else stored.shape[1:])
            fmt = inst.formats[0]
            if how == "writer":
                made.append(writer.write(ds, pixels, fmt, tmp_path / "writer").read_bytes())
            else:
                made.append(write_instance(build_derived_instance(ds, pixels, fmt, info),
                                           tmp_path / "builder").read_bytes())
        assert made[0] == made[1], f"{path.name}: the series writer and the builder differ"
    return writer


def test_series_writer_writes_what_the_builder_writes(tmp_path: Path) -> None:
    from tests.fixtures.synthetic import make_ct_series

    paths = make_ct_series(tmp_path / "ct", n_slices=6, rows=32, cols=32)
    writer = _series_writer_matches_builder(paths, tmp_path)
    assert (writer.in_full, writer.from_template) == (1, 5)  # the fast path is what was compared


def _edited_series(folder: Path, n_slices: int, edit: Callable[[int, pydicom.Dataset], bool]) -> list[Path]:
    """A synthetic CT series whose files were changed by ``edit(index, ds)`` and saved again (so the reader
    sees the changes as raw elements, as it would from a scanner)."""
    from tests.fixtures.synthetic import make_ct_series

    paths = make_ct_series(folder, n_slices=n_slices, rows=32, cols=32)
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        if edit(index, ds):
            ds.save_as(path, enforce_file_format=True)
    return paths


def test_series_writer_makes_in_full_what_the_template_cannot_say(tmp_path: Path) -> None:
    # Each edit on its own, against a clean template: the unedited slice after an edited one is made in full
    # (it differs from the edited one) and becomes the template again.
    edits = {
        2: lambda ds: setattr(ds, "SeriesDescription", "CHANGED"),  # read by the builder: a new description
        4: lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.4"),  # copied, and read again after
        6: lambda ds: setattr(ds, "PatientIdentityRemoved", "YES"),  # not in the template's source
        8: lambda ds: setattr(ds, "SeriesNumber", 99),  # replaced by the builder
        10: lambda ds: setattr(ds, "SpecificCharacterSet", "ISO_IR 192"),  # changes how text is encoded
    }

    def edit(index: int, ds: pydicom.Dataset) -> bool:
        if index in edits:
            edits[index](ds)
        return index in edits

    writer = _series_writer_matches_builder(_edited_series(tmp_path / "ct", 12, edit), tmp_path)
    # Slice 0, each edited one and the one after it are made in full; slice 1 from the template.
    assert (writer.in_full, writer.from_template) == (1 + 2 * len(edits), 1)


def test_series_writer_ignores_what_the_builder_leaves_out(tmp_path: Path) -> None:
    def edit(index: int, ds: pydicom.Dataset) -> bool:
        ds.add_new(0x00291010, "OB", b"private" * (index + 1))  # private: left out, whatever its value
        ds.add_new(0x00280107, "US", index)  # LargestImagePixelValue, not kept in derived objects: left out
        ds.InstanceNumber = 100 + index  # copied as it is: substituted
        return True

    writer = _series_writer_matches_builder(_edited_series(tmp_path / "ct", 5, edit), tmp_path)
    assert (writer.in_full, writer.from_template) == (1, 4)


def test_series_writer_takes_a_sop_instance_uid_already_decoded(tmp_path: Path) -> None:
    from tests.fixtures.synthetic import make_ct_series

    def look(index: int, ds: pydicom.Dataset) -> None:
        assert ds.SOPInstanceUID  # decodes the element: the writer then sees a value, not raw bytes

    paths = make_ct_series(tmp_path / "ct", n_slices=3, rows=32, cols=32)
    writer = _series_writer_matches_builder(paths, tmp_path, look)
    assert writer.from_template == 2


def test_series_writer_writes_what_the_builder_writes_for_real_scanner_series(shared_data: Path,
                                                                              tmp_path: Path) -> None:
    from dicom_node.denoise.series import read_instance_header

    used = 0
    for folder in ["ct/ge-head-7mm", "ct/philips-head-phantom-lowdose-1mm", "mr/siemens-acr-phantom-t1",
                   "mr/siemens-xa30-t1-enhanced"]:
        paths = []
        for path in sorted((shared_data / folder).iterdir()):
            try:
                read_instance_header(path)
            except Exception:  # noqa: BLE001 - licence texts
                continue
            paths.append(path)
            if len(paths) == 4:
                break
        writer = _series_writer_matches_builder(paths, tmp_path / folder.replace("/", "-"))
        used += writer.from_template
    assert used >= 3  # real scanner slices did take the fast path


def _jpeg_baseline_source(quality: int = 80) -> tuple[pydicom.Dataset, int]:
    """A colour Secondary Capture image in JPEG baseline (YBR_FULL_422, as JPEG writes it) and its JPEG size."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate

    from tests.fixtures.images import SECONDARY_CAPTURE, make_colour_image

    rgb = np.random.default_rng(0).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    ds = make_colour_image(rgb, modality="OT", sop_class_uid=SECONDARY_CAPTURE)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality, subsampling=1)  # 4:2:2
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    return ds, len(buf.getvalue())


def test_jpeg_baseline_source_is_written_uncompressed_as_rgb_with_its_lossy_history() -> None:
    source, size = _jpeg_baseline_source()
    fmt = pixel_format_from_dataset(source)
    rgb = source.pixel_array
    ds = build_derived_instance(source, rgb, fmt, _info())
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration) == ("RGB", 3, 0)
    assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"
    assert float(ds.LossyImageCompressionRatio) == pytest.approx(rgb.nbytes / size, rel=0.05)
    np.testing.assert_array_equal(ds.pixel_array, rgb)


def test_lossy_history_already_recorded_is_kept_and_an_earlier_one_is_extended() -> None:
    source, _size = _jpeg_baseline_source()
    source.LossyImageCompression, source.LossyImageCompressionMethod = "01", "ISO_10918_1"
    source.LossyImageCompressionRatio = "7.5"
    ds = build_derived_instance(source, source.pixel_array, pixel_format_from_dataset(source), _info())
    assert (ds.LossyImageCompressionMethod, ds.LossyImageCompressionRatio) == ("ISO_10918_1", 7.5)
    source.LossyImageCompressionMethod, source.LossyImageCompressionRatio = "ISO_14495_1", "2.5"
    ds = build_derived_instance(source, source.pixel_array, pixel_format_from_dataset(source), _info())
    assert list(ds.LossyImageCompressionMethod) == ["ISO_14495_1", "ISO_10918_1"]
    assert len(ds.LossyImageCompressionRatio) == 2 and float(ds.LossyImageCompressionRatio[0]) == 2.5


def test_grey_derived_image_keeps_monochrome1_and_bits_stored() -> None:
    src = make_image(np.arange(1024, dtype=np.uint16).reshape(32, 32), photometric="MONOCHROME1", bits_stored=10,
                     slope=None, modality="MR")
    fmt = pixel_format_from_dataset(src)
    ds = build_derived_instance(src, src.pixel_array, fmt, _info())
    assert (ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel) == (
        "MONOCHROME1", 16, 10, 9, 1)
    assert "PlanarConfiguration" not in ds
    with pytest.raises(ValueError, match="exceed BitsStored 10"):
        build_derived_instance(src, np.full((32, 32), 1024, np.uint16), fmt, _info())


@pytest.mark.parametrize("kind", ["rgb-planar1", "palette"])
def test_series_writer_writes_what_the_builder_writes_for_colour(tmp_path: Path, kind: str) -> None:
    """Colour series (RGB by plane, palette) written from the template: the same bytes as built in full."""
    from pydicom.uid import generate_uid

    from tests.fixtures.images import make_colour_image, make_palette_image

    rng = np.random.default_rng(1)
    series_uid, study_uid, paths = generate_uid(), generate_uid(), []
    lut = np.stack([np.arange(256)] * 3, axis=1)
    lut[200:] = [255, 0, 0]
    for k in range(3):
        if kind == "palette":
            ds = make_palette_image(rng.integers(0, 256, size=(12, 16), dtype=np.uint8), lut)
            ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.InstanceNumber = series_uid, study_uid, k + 1
        else:
            ds = make_colour_image(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8), planar_configuration=1,
                                   series_uid=series_uid, study_uid=study_uid, instance_number=k + 1)
        paths.append(tmp_path / f"{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    writer = _series_writer_matches_builder(paths, tmp_path)
    assert (writer.in_full, writer.from_template) == (1, 2)
    out = pydicom.dcmread(sorted((tmp_path / "writer").iterdir())[-1])
    assert (out.PhotometricInterpretation, out.PlanarConfiguration, out.SamplesPerPixel) == ("RGB", 0, 3)
