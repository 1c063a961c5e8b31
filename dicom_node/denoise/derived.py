"""The derived series: one builder that makes each derived instance from its source and the new pixels.

Rules (DESIGN.md, "The derived series"; PS3.3 C.7.6.1 General Image, C.7.3.1 General Series, C.7.5.1 General
Equipment, C.12.2 Common Instance Reference):

- the whole source dataset is copied first, so Patient, Study, Frame of Reference, Equipment and geometry
  (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness, functional groups) are kept as
  modules; private elements, the icon and pixel statistics that no longer hold are removed;
- a new SeriesInstanceUID (one per job, passed in) and a SOPInstanceUID per instance derived deterministically
  from the series UID and the source's SOPInstanceUID (a retried job writes the same UIDs);
- SeriesNumber = source + offset; SeriesDescription = source + suffix;
- ImageType DERIVED\\SECONDARY followed by the source's remaining values (FrameType likewise for enhanced
  objects);
- DerivationDescription (model name, version, sha256 prefix, strength) and DerivationCodeSequence
  (DCM 113087 "Smoothing": CID 7203 has no "denoising" concept; smoothing is the closest processing class);
- SourceImageSequence with purpose of reference (DCM 121322 "Source image for image processing operation");
  enhanced multi-frame objects carry the same reference per frame in the Derivation Image functional group;
- ReferencedSeriesSequence (Common Instance Reference) only for IODs that include that module;
- ContributingEquipmentSequence: purpose (DCM 109103 "Modifying Equipment"), Manufacturer ``dicom-node``,
  software versions of the node and the model, and the model's full sha256 in ContributionDescription;
- written in explicit VR little endian (or RLE Lossless).

:mod:`dicom_node.encoding` turns a built instance into bytes; :mod:`dicom_node.denoise.series_writer` writes
it to a file, and a whole series with the same bytes and less CPU (the fast path).

This module uses pydicom and numpy only.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_ROOT_UID, UID, ExplicitVRLittleEndian, RLELossless, generate_uid

from dicom_node import __version__
from dicom_node.denoise.pixels import PixelFormat, checked_strength
from dicom_node.denoise.trust_note import PENDING_NOTE
from dicom_node.encoding import (
    charset_key,
    encoded_element,
    explicit_header,
    raw_element,
    ui_element,
)
from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, NODE_MANUFACTURER

LOGGER = logging.getLogger(__name__)

#: CID 7203 Image Derivation.
DERIVATION_CODE = ("113087", "DCM", "Smoothing")
#: CID 7202 Source Image Purposes of Reference.
SOURCE_PURPOSE_CODE = ("121322", "DCM", "Source image for image processing operation")
#: CID 7005 Contributing Equipment Purposes of Reference.
EQUIPMENT_PURPOSE_CODE = ("109103", "DCM", "Modifying Equipment")

TRANSFER_SYNTAXES = {"explicit-vr-little-endian": ExplicitVRLittleEndian, "rle-lossless": RLELossless}

#: SOP classes whose IOD includes the Common Instance Reference module (PS3.3 A.x; checked with dciodvfy).
COMMON_INSTANCE_REFERENCE_IODS = {
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR
}

#: Transfer syntaxes whose pixel data went through lossy compression, with the method (PS3.3 C.7.6.1.1.5.1).
_LOSSY_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}

_REMOVE = (
    "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries", "LargestPixelValueInSeries",
    "IconImageSequence", "PixelDataProviderURL", "DataSetTrailingPadding", "DigitalSignaturesSequence",
    "MACParametersSequence", "EncryptedAttributesSequence", "OriginalAttributesSequence",
    "ReferencedSeriesSequence", "StudiesContainingOtherReferencedInstancesSequence", "DerivationImageSequence",
)

#: The Palette Color Lookup Table module (PS3.3 C.7.9) and the Image Pixel module's palette (C.7.6.3): a palette
#: source is written as RGB (the palette applied), so none of these describes the derived pixels.
_PALETTE_ELEMENTS = (
    0x00281101, 0x00281102, 0x00281103, 0x00281104, 0x00281199, 0x00281201, 0x00281202, 0x00281203, 0x00281204,
    0x00281221, 0x00281222, 0x00281223, 0x00281224,
)


@dataclass(frozen=True)
class DerivationInfo:
    """Everything a derived instance says about how it was made; passed in, never guessed.

    Attributes
    ----------
    series_instance_uid
        The derived series' UID (one per job; :func:`new_series_uid` makes one).
    model_name, model_version, model_sha256
        The model that made the pixels.
    strength
        The blend of output and input used, in [0, 1].
    series_number_offset, description_suffix
        From ``[derived]`` in the configuration.
    transfer_syntax
        ``explicit-vr-little-endian`` or ``rle-lossless``.
    node_version
        Software version written in ContributingEquipmentSequence.
    created
        Creation time written as InstanceCreation/Content/ContributionDateTime (UTC now when ``None``).
    uid_root
        The site's UID root for derived SOP Instance UIDs ("": pydicom's root).
    trust_note
        End DerivationDescription with a fixed-width "trust check pending" note that
        :func:`dicom_node.denoise.trust_note.write_trust_note` overwrites with the verdict once the series is
        written (the check needs the whole series).
    """

    series_instance_uid: str
    model_name: str
    model_version: str
    model_sha256: str
    strength: float = 1.0
    series_number_offset: int = 1000
    description_suffix: str = " DN"
    transfer_syntax: str = "explicit-vr-little-endian"
    node_version: str = __version__
    created: _dt.datetime | None = None
    uid_root: str = ""
    trust_note: bool = False

    def __post_init__(self) -> None:
        if not self.series_instance_uid or not UID(self.series_instance_uid).is_valid:
            raise ValueError(f"series_instance_uid {self.series_instance_uid!r} is not a valid UID")
        checked_strength(self.strength)
        if self.transfer_syntax not in TRANSFER_SYNTAXES:
            raise ValueError(f"transfer_syntax {self.transfer_syntax!r} is not one of {', '.join(TRANSFER_SYNTAXES)}")

    @property
    def description(self) -> str:
        """DerivationDescription (ST): model, version, hash prefix and strength (and the trust note's place)."""
        return (f"Denoised by {NODE_MANUFACTURER} {self.node_version} with model {self.model_name} "
                f"{self.model_version} (sha256 {self.model_sha256[:12]}), strength {self.strength:.2f}"
                + (PENDING_NOTE if self.trust_note else ""))


def _uid_prefix(uid_root: str) -> str:
    """The prefix ``generate_uid`` takes: the site's root with a trailing dot, or pydicom's root."""
    return f"{uid_root.rstrip('.')}." if uid_root else PYDICOM_ROOT_UID


def new_series_uid(*entropy: str, uid_root: str = "") -> str:
    """A new SeriesInstanceUID: random, or deterministic when ``entropy`` strings (e.g. a job id) are given."""
    return str(generate_uid(prefix=_uid_prefix(uid_root), entropy_srcs=list(entropy) if entropy else None))


def derived_series_uid(source_series_uid: str, model_name: str, model_version: str, model_sha256: str,
                       strength: float, uid_root: str = "") -> str:
    """The derived series' UID: a function of the source series and of what made the pixels.

    The same source series denoised by the same model (name, version, weights) at the same strength always gives
    the same derived series, so a re-sent or grown source series replaces or extends its derived series in PACS
    instead of adding a second one; another model or strength gives a new, distinguishable series.
    """
    return new_series_uid(source_series_uid, model_name, model_version, model_sha256, f"strength {strength:.4f}",
                          uid_root=uid_root)


def derived_sop_instance_uid(series_instance_uid: str, source_sop_instance_uid: str, uid_root: str = "") -> str:
    """The derived instance's SOPInstanceUID, a function of the derived series and the source instance."""
    return str(generate_uid(prefix=_uid_prefix(uid_root),
                            entropy_srcs=[series_instance_uid, source_sop_instance_uid]))


def _code(value: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
    return item


def _strip_private(ds: Dataset) -> None:
    """Remove private elements at every level, decoding only the sequences on the way (raw elements stay raw:
    ``Dataset.remove_private_tags`` decodes every element, a third of the cost of building a CT slice)."""
    for tag in list(ds.keys()):
        if tag.is_private:
            del ds[tag]
            continue
        vr = ds.get_item(tag).VR
        if vr in (None, "UN"):  # implicit VR source, or unknown: the dictionary says whether it is a sequence
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue
        if vr == "SQ":
            for item in ds[tag].value:
                _strip_private(item)


def _derived_type(values: Any, enhanced: bool = False) -> list[str]:
    """ImageType/FrameType of a derived image: DERIVED\\SECONDARY\\<the source's values from the third on>.

    Enhanced MR/CT objects (PS3.3 C.8.16.1.2, C.8.15.2.1.1) only allow PRIMARY as value 2 ("Patient
    Examination Characteristics"), so they become DERIVED\\PRIMARY\\....
    """
    if values is None or values == "":
        vals: list[str] = []
    elif isinstance(values, str):
        vals = [values]
    else:
        vals = [str(v) for v in values]
    return ["DERIVED", "PRIMARY" if enhanced else "SECONDARY"] + vals[2:]


def _source_item(source: Dataset, frames: Sequence[int] | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frames:
        item.ReferencedFrameNumber = list(frames) if len(frames) > 1 else frames[0]
    item.PurposeOfReferenceCodeSequence = DicomSequence([_code(SOURCE_PURPOSE_CODE)])
    return item


def _dt_strings(when: _dt.datetime) -> tuple[str, str, str]:
    return when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f"), when.strftime("%Y%m%d%H%M%S.%f") + "+0000"


def _contributing_equipment_item(info: DerivationInfo, contribution_datetime: str) -> Dataset:
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([_code(EQUIPMENT_PURPOSE_CODE)])
    item.Manufacturer = NODE_MANUFACTURER
    item.ManufacturerModelName = "denoiser"[:64]
    item.SoftwareVersions = [f"{NODE_MANUFACTURER} {info.node_version}"[:64],
                             f"{info.model_name} {info.model_version}"[:64]]
    item.ContributionDateTime = contribution_datetime
    item.ContributionDescription = (
        f"Denoising with model {info.model_name} version {info.model_version}, sha256 {info.model_sha256}, "
        f"strength {info.strength:.2f}"
    )[:1024]
    return item


def _add_contributing_equipment(ds: Dataset, info: DerivationInfo, when: _dt.datetime) -> None:
    existing = list(ds.get("ContributingEquipmentSequence", []))
    item = _contributing_equipment_item(info, _dt_strings(when)[2])
    ds.ContributingEquipmentSequence = DicomSequence(existing + [item])


#: MR Pulse Sequence module (PS3.3 C.8.13.4) attributes that are "1C: required if Image Type value 1 is ORIGINAL
#: or MIXED"; dciodvfy rejects them in DERIVED objects, so derived enhanced MR drops them.
_ORIGINAL_ONLY = (
    "PulseSequenceName", "MRAcquisitionType", "EchoPulseSequence", "MultipleSpinEcho", "MultiPlanarExcitation",
    "PhaseContrast", "TimeOfFlightContrast", "ArterialSpinLabelingContrast", "SteadyStatePulseSequence",
    "EchoPlanarPulseSequence", "SaturationRecovery", "SpectrallySelectedSuppression", "OversamplingPhase",
    "GeometryOfKSpaceTraversal", "RectilinearPhaseEncodeReordering", "SegmentedKSpaceTraversal",
    "CoverageOfKSpace", "NumberOfKSpaceTrajectories",
)
#: Functional groups that Enhanced MR only requires for ORIGINAL frames and whose source copies fail validation
#: (MR Modifier: Siemens writes the undefined term GRAPPA and omits the second in-plane factor); dropped.
_ORIGINAL_ONLY_GROUPS = ("MRModifierSequence",)


def _drop_original_only(ds: Dataset) -> None:
    if str(ds.get("SOPClassUID", "")) not in ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4"):
        return
    for keyword in _ORIGINAL_ONLY:
        if keyword in ds:
            delattr(ds, keyword)
    for groups_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(groups_kw, []):
            for keyword in _ORIGINAL_ONLY_GROUPS:
                if keyword in group:
                    delattr(group, keyword)


def _evidence_item(source: Dataset) -> Dataset:
    """Hierarchical SOP Instance Reference (PS3.3 C.17.2.1) to the source instance."""
    sop = Dataset()
    sop.ReferencedSOPClassUID = source.SOPClassUID
    sop.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedSOPSequence = DicomSequence([sop])
    study = Dataset()
    study.StudyInstanceUID = source.StudyInstanceUID
    study.ReferencedSeriesSequence = DicomSequence([series])
    return study


#: Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1): present, may be empty.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _repair_inherited(ds: Dataset) -> None:
    """Fix, without inventing data, the defects that the derived object would otherwise inherit from its source.

    - missing Type 2 Patient/Study attributes are added empty (Type 2 allows empty: "unknown");
    - PatientIdentityRemoved YES with an empty DeidentificationMethod and no method code gets the text
      "not stated by the source";
    - a missing Laterality (General Series, Type 2C) is added empty when the body part is not stated (neither
      BodyPartExamined nor AnatomicRegionSequence, as VL images code it), which is what "unknown" means for it.
    """
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not ds.get("DeidentificationMethod") \
            and not ds.get("DeidentificationMethodCodeSequence"):
        ds.DeidentificationMethod = "not stated by the source"
    if "Laterality" not in ds and not ds.get("BodyPartExamined") and "ImageLaterality" not in ds \
            and not ds.get("AnatomicRegionSequence") and "PerFrameFunctionalGroupsSequence" not in ds:
        ds.Laterality = ""


def _set_frame_types(ds: Dataset) -> None:
    """Enhanced objects: FrameType in every ``*FrameTypeSequence`` becomes DERIVED\\SECONDARY\\..."""
    for groups_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(groups_kw, []):
            for elem in group:
                if elem.VR == "SQ" and elem.keyword.endswith("FrameTypeSequence"):
                    for item in elem.value:
                        if "FrameType" in item:
                            item.FrameType = _derived_type(item.FrameType, enhanced=True)


def _set_frame_derivation(ds: Dataset, source: Dataset, info: DerivationInfo) -> None:
    """Enhanced objects: a Derivation Image functional group per frame pointing at the source frame."""
    groups = ds.get("PerFrameFunctionalGroupsSequence")
    if not groups:
        return
    for index, group in enumerate(groups, start=1):
        deriv = Dataset()
        deriv.DerivationDescription = info.description
        deriv.DerivationCodeSequence = DicomSequence([_code(DERIVATION_CODE)])
        deriv.SourceImageSequence = DicomSequence([_source_item(source, [index])])
        group.DerivationImageSequence = DicomSequence([deriv])


#: (7FE0,0010) Pixel Data, (7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel Data.
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def build_derived_instance(source: Dataset, pixels: np.ndarray, fmt: PixelFormat, info: DerivationInfo) -> Dataset:
    """Make the derived instance of ``source`` with the new stored values ``pixels``.

    Parameters
    ----------
    source
        The full source dataset (pixel data may be present; it is replaced).
    pixels
        New stored values, ``(rows, columns)`` or ``(frames, rows, columns)``, in ``fmt.dtype`` and the source's
        BitsStored range.
    fmt
        The source's pixel format (BitsAllocated, BitsStored, PixelRepresentation are kept).
    info
        UIDs, numbering and provenance (see :class:`DerivationInfo`).

    Returns
    -------
    Dataset
        A dataset with file meta, ready for :func:`write_instance`.

    Raises
    ------
    ValueError
        When ``pixels`` does not match the source's rows, columns, frames or bit depth.
    """
    frames = int(source.get("NumberOfFrames", 1) or 1)
    arr = checked_pixels(pixels, (frames, int(source.Rows), int(source.Columns)), fmt)
    when = info.created or _dt.datetime.now(_dt.UTC)
    sop_uid = derived_sop_instance_uid(info.series_instance_uid, str(source.SOPInstanceUID), info.uid_root)

    ds = _source_elements(source)
    # The new elements go in already encoded (explicit VR little endian): most are the same for every instance of
    # the series and are encoded once; building and encoding them through pydicom cost about 3 ms of CPU per slice.
    charset = charset_key(ds.get("SpecificCharacterSet"))
    _set_identity(ds, source, info, sop_uid, when, charset)
    _set_derivation(ds, source, info, charset)
    _set_references(ds, source)
    _set_provenance(ds, source, info, when, _compression_ratio(source, arr), charset)
    _set_pixels(ds, arr, fmt, charset)
    ds.file_meta = _file_meta(str(source.SOPClassUID), sop_uid)
    ds.preamble = b"\x00" * 128
    if info.transfer_syntax == "rle-lossless":
        ds.compress(RLELossless, arr if frames > 1 else arr[0])
    return ds


def _source_elements(source: Dataset) -> Dataset:
    """Every element of ``source`` but its pixels, private elements and those the derived instance must not carry.

    Elements not decoded yet (raw) are immutable tuples and are shared; the decoded ones are deep-copied. Decoding
    and deep-copying all of them cost 4-5 ms of CPU per CT slice, taken from the network running beside it.
    (Dataset takes the dict as it is: no per-element __setitem__.)
    """
    ds = Dataset({elem.tag: elem if elem.is_raw else copy.deepcopy(elem)
                  for elem in source.elements() if elem.tag not in PIXEL_DATA_TAGS})
    if tuple(source.original_encoding) == (False, True):
        # Same encoding as the derived file (explicit VR little endian): raw values are written as they are.
        ds.set_original_encoding(False, True, source.original_character_set)
    _strip_private(ds)
    for keyword in _REMOVE:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _set_identity(ds: Dataset, source: Dataset, info: DerivationInfo, sop_uid: str, when: _dt.datetime,
                  charset: tuple[str, ...] | None) -> None:
    """The derived instance's own UIDs, series number and description, image type, dates and times."""
    number = source.get("SeriesNumber")
    try:
        base_number = int(number) if number not in (None, "") else 0
    except (TypeError, ValueError):
        base_number = 0
    description = (str(source.get("SeriesDescription", "") or "") + info.description_suffix).strip()[:64]
    date, time, _ = _dt_strings(when)
    ds[0x00080018] = ui_element(0x00080018, sop_uid)
    ds[0x0020000E] = ui_element(0x0020000E, info.series_instance_uid)
    ds[0x00200011] = encoded_element(0x00200011, "IS", base_number + info.series_number_offset, charset)
    ds[0x0008103E] = encoded_element(0x0008103E, "LO", description, charset)
    image_type = _derived_type(source.get("ImageType"), "PerFrameFunctionalGroupsSequence" in source)
    ds[0x00080008] = encoded_element(0x00080008, "CS", tuple(image_type), charset)
    for tag, value in ((0x00080012, date), (0x00080013, time), (0x00080023, date), (0x00080033, time)):
        ds[tag] = encoded_element(tag, "DA" if tag in (0x00080012, 0x00080023) else "TM", value, charset)


def _set_derivation(ds: Dataset, source: Dataset, info: DerivationInfo, charset: tuple[str, ...] | None) -> None:
    """What was done and to which source: DerivationDescription, DerivationCodeSequence, SourceImageSequence."""
    if "PerFrameFunctionalGroupsSequence" in source:
        # Enhanced IODs have no General Image module: the derivation and its source live per frame in the
        # Derivation Image functional group, and the source is listed in SourceImageEvidenceSequence.
        for keyword in ("DerivationDescription", "DerivationCodeSequence", "SourceImageSequence"):
            if keyword in ds:
                delattr(ds, keyword)
        _set_frame_types(ds)
        _set_frame_derivation(ds, source, info)
        _drop_original_only(ds)
        ds.SourceImageEvidenceSequence = DicomSequence([_evidence_item(source)])
    else:
        ds[0x00082111] = encoded_element(0x00082111, "ST", info.description[:1024], charset)
        ds[0x00089215] = _code_sequence_element(0x00089215, DERIVATION_CODE)
        ds[0x00082112] = source_image_sequence(str(source.SOPClassUID), str(source.SOPInstanceUID))
    _repair_inherited(ds)


def _set_references(ds: Dataset, source: Dataset) -> None:
    """ReferencedSeriesSequence (Common Instance Reference module) for the IODs that require it."""
    if str(source.SOPClassUID) not in COMMON_INSTANCE_REFERENCE_IODS:
        return
    ref = Dataset()
    ref.SeriesInstanceUID = source.SeriesInstanceUID
    inst = Dataset()
    inst.ReferencedSOPClassUID = source.SOPClassUID
    inst.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ref.ReferencedInstanceSequence = DicomSequence([inst])
    ds.ReferencedSeriesSequence = DicomSequence([ref])


def _set_provenance(ds: Dataset, source: Dataset, info: DerivationInfo, when: _dt.datetime,
                    lossy_ratio: float | None, charset: tuple[str, ...] | None) -> None:
    """The source's lossy compression carried over, and this node appended to ContributingEquipmentSequence."""
    src_ts = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", "") or "")
    if src_ts in _LOSSY_METHODS:
        _record_lossy_source(ds, source, _LOSSY_METHODS[src_ts], lossy_ratio)
    if "ContributingEquipmentSequence" in ds:  # the source's own list, kept, with this node appended
        _add_contributing_equipment(ds, info, when)
    else:
        ds[0x0018A001] = _contributing_equipment_element(info, _dt_strings(when)[2], charset)


def _set_pixels(ds: Dataset, arr: np.ndarray, fmt: PixelFormat, charset: tuple[str, ...] | None) -> None:
    """The Image Pixel module: the source's bit depth kept, colour written as interleaved RGB, the new pixels."""
    for tag, number in ((0x00280002, fmt.samples_per_pixel), (0x00280100, fmt.bits_allocated),
                        (0x00280101, fmt.bits_stored), (0x00280102, fmt.bits_stored - 1),
                        (0x00280103, fmt.pixel_representation)):
        ds[tag] = encoded_element(tag, "US", number, charset)
    if fmt.is_colour:
        # Written as decoded: RGB, samples interleaved (YBR sources were converted, a palette applied), and
        # uncompressed, which every colour IOD allows (PS3.3 C.7.6.3.1.2; YBR_FULL_422 only describes JPEG).
        ds[0x00280004] = encoded_element(0x00280004, "CS", "RGB", charset)
        ds[0x00280006] = encoded_element(0x00280006, "US", 0, charset)
        if fmt.source_photometric == "PALETTE COLOR":
            for tag in _PALETTE_ELEMENTS:
                if tag in ds:
                    del ds[tag]
            if "PixelPaddingValue" in ds:  # a palette index, which the RGB pixels no longer hold
                del ds.PixelPaddingValue
    elif 0x00280006 in ds:
        del ds[0x00280006]  # Planar Configuration is only for colour (Type 1C)
    ds[0x7FE00010] = pixel_data_element(arr, fmt)


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    """File Meta Information of a derived instance: explicit VR little endian, the node's implementation."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _compression_ratio(source: Dataset, arr: np.ndarray) -> float | None:
    """Uncompressed over compressed size of a source whose pixel data is encapsulated; ``None`` when not known."""
    elem = source.get(0x7FE00010)
    if elem is None or not getattr(source.file_meta, "TransferSyntaxUID", None) \
            or not source.file_meta.TransferSyntaxUID.is_compressed:
        return None
    compressed = len(elem.value or b"")
    return arr.nbytes / compressed if compressed else None


def _record_lossy_source(ds: Dataset, source: Dataset, method: str, ratio: float | None) -> None:
    """LossyImageCompression "01" with the method and ratio of the source's own lossy encoding (PS3.3
    C.7.6.1.1.5): the derived pixels are written uncompressed, but they carry what that compression lost.

    A source that already records this encoding (its last method is the transfer syntax's) keeps its values; one
    that records only earlier compressions gets this one appended, as the standard asks for each successive step.
    """
    methods = _values(source.get("LossyImageCompressionMethod"))
    ratios = _values(source.get("LossyImageCompressionRatio"))
    ds.LossyImageCompression = "01"
    if methods and methods[-1] == method:
        return
    ds.LossyImageCompressionMethod = methods + [method] if methods else method
    if ratio is not None and len(ratios) == len(methods):  # ratios that pair with the methods only
        text = f"{ratio:.2f}"[:16]
        ds.LossyImageCompressionRatio = ratios + [text] if ratios else text


def _values(value: Any) -> list[str]:
    """A possibly multi-valued element's values as strings (none for an absent or empty one)."""
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes, int, float)):
        return [str(value)]
    return [str(v) for v in value]


def checked_pixels(pixels: np.ndarray, shape: tuple[int, int, int], fmt: PixelFormat) -> np.ndarray:
    """``pixels`` as ``(frames, rows, columns)`` (``(..., 3)`` for RGB), checked against the source's shape, dtype
    and BitsStored range."""
    arr = np.asarray(pixels)
    if fmt.is_colour:
        shape = (*shape, 3)  # type: ignore[assignment]
    if arr.ndim == len(shape) - 1:
        arr = arr[np.newaxis]
    if arr.shape != shape:
        raise ValueError(f"pixels have shape {arr.shape}, the source needs {shape}")
    if arr.dtype != fmt.dtype:
        raise ValueError(f"pixels have dtype {arr.dtype}, the source's format needs {fmt.dtype}")
    lo, hi = fmt.stored_range
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise ValueError(f"pixels {arr.min()}..{arr.max()} exceed BitsStored {fmt.bits_stored} range {lo}..{hi}")
    return arr


def pixel_data_element(arr: np.ndarray, fmt: PixelFormat) -> RawDataElement:
    """PixelData (native, little endian, padded to an even length)."""
    pixel_bytes = arr.astype(fmt.dtype.newbyteorder("<"), copy=False).tobytes()
    if len(pixel_bytes) % 2:
        pixel_bytes += b"\x00"
    return RawDataElement(Tag(0x7FE00010), "OW" if fmt.bits_allocated > 8 else "OB", len(pixel_bytes),
                          pixel_bytes, 0, False, True)


# ------------------------------------------------------------------------------------------------- encoded elements
# Elements of the derived instance put into its dataset already encoded (see dicom_node.encoding).
def _code_sequence_element(tag: int, code: tuple[str, str, str]) -> RawDataElement:
    """A code sequence of one item (CodeValue, CodingSchemeDesignator, CodeMeaning), encoded once."""
    return raw_element(DataElement(tag, "SQ", DicomSequence([_code(code)])), None)


def _contributing_equipment_element(info: DerivationInfo, contribution_datetime: str,
                                    charset: tuple[str, ...] | None) -> RawDataElement:
    item = _contributing_equipment_item(info, contribution_datetime)
    return raw_element(DataElement(0x0018A001, "SQ", DicomSequence([item])), charset)


def source_image_sequence(sop_class_uid: str, sop_instance_uid: str) -> RawDataElement:
    """SourceImageSequence with one item: the source's SOP class and instance and the purpose of reference."""
    item = b"".join(explicit_header(e.tag, "UI", e.length) + (e.value or b"") for e in (
        ui_element(0x00081150, sop_class_uid), ui_element(0x00081155, sop_instance_uid)))
    purpose = _code_sequence_element(0x0040A170, SOURCE_PURPOSE_CODE)
    item += explicit_header(0x0040A170, "SQ", purpose.length) + purpose.value  # type: ignore[operator]
    value = struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item
    return RawDataElement(Tag(0x00082112), "SQ", len(value), value, 0, False, True)


@dataclass
class DerivedSeriesSettings:
    """The ``[derived]`` configuration in the form the builder needs (see ``dicom_node.config.DerivedSettings``)."""

    series_number_offset: int = 1000
    description_suffix: str = " DN"
    transfer_syntax: str = "explicit-vr-little-endian"
    uid_root: str = ""
    trust_note: bool = False  # the worker sets it when the trust check runs (worker.trust_policy is not "off")

    @classmethod
    def from_config(cls, derived: Any) -> DerivedSeriesSettings:
        return cls(series_number_offset=int(derived.series_number_offset),
                   description_suffix=str(derived.description_suffix),
                   transfer_syntax=str(derived.transfer_syntax), uid_root=str(getattr(derived, "uid_root", "")))
