"""STOW-RS statuses: the node's C-STORE statuses as Failure Reasons, and the Store Instances Response.

Failure Reason (0008,1197) values follow PS3.18 Table I.2-2 (Store Instances Response Failure Reason Values):
``A7xx`` refused, out of resources; ``A9xx`` data set does not match its SOP class; ``Cxxx`` cannot understand;
``C122`` transfer syntax not supported; ``0110`` processing failure; ``0122`` SOP class not supported.

==============================================  ==========  ======================================================
what happened                                   C-STORE     STOW-RS Failure Reason
==============================================  ==========  ======================================================
disk below the watermark, write or DB failure   ``0xA700``  ``0xA700`` (A7xx: out of resources)
dataset structurally broken, part unreadable    ``0xC210``  ``0xC210`` (Cxxx: cannot understand)
a UID missing or not a valid UID                ``0xC211``  ``0xC211`` (Cxxx: cannot understand)
SOP Instance UID of file meta and dataset       ``0xC212``  ``0xC212`` (Cxxx: cannot understand)
differ
transfer syntax the node does not accept        (refused    ``0xC122`` (transfer syntax not supported)
                                                at assoc.)
part is not ``application/dicom``, the body     -           ``0x0110`` (processing failure)
ended inside it, or its study is not the
study of the request URL
==============================================  ==========  ======================================================

The C-STORE codes are kept as they are because each lies in the ``Cxxx`` / ``A7xx`` range PS3.18 gives the same
meaning, so a site reading either log sees one code per cause. The reason text goes into the response's
``Warning`` header (RFC 9111 5.5, as PS3.18 8.4 allows) and the node's log.

The response (PS3.18 10.5.3, Annex I) is DICOM JSON (``application/dicom+json``, PS3.18 F.2) by default, or the
Native DICOM Model XML (``application/dicom+xml``, PS3.19 A.1) when the client asks for it in ``Accept``.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from xml.sax.saxutils import escape

from dicom_node.receive import receiver

FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_TRANSFER_SYNTAX = 0xC122
FAILURE_PROCESSING = 0x0110

#: C-STORE status (dicom_node.receive.receiver) -> STOW-RS Failure Reason (PS3.18 Table I.2-2).
CSTORE_TO_FAILURE_REASON: dict[int, int] = {
    receiver.STATUS_OUT_OF_RESOURCES: FAILURE_OUT_OF_RESOURCES,
    receiver.STATUS_CANNOT_UNDERSTAND: 0xC210,
    receiver.STATUS_INVALID_UID: 0xC211,
    receiver.STATUS_UID_MISMATCH: 0xC212,
}

MEDIA_JSON = "application/dicom+json"
MEDIA_XML = "application/dicom+xml"

_TAGS = {
    "RetrieveURL": ("00081190", "UR"),
    "FailureReason": ("00081197", "US"),
    "WarningReason": ("00081196", "US"),
    "FailedSOPSequence": ("00081198", "SQ"),
    "ReferencedSOPSequence": ("00081199", "SQ"),
    "ReferencedSOPClassUID": ("00081150", "UI"),
    "ReferencedSOPInstanceUID": ("00081155", "UI"),
}


def failure_reason(cstore_status: int) -> int:
    """The STOW-RS Failure Reason for a C-STORE status the receive path answered (``0x0110`` if unknown)."""
    return CSTORE_TO_FAILURE_REASON.get(cstore_status, FAILURE_PROCESSING)


@dataclass
class InstanceOutcome:
    """What became of one part of a request."""

    sop_class_uid: str
    sop_instance_uid: str
    #: ``None``: stored; else the Failure Reason.
    failure: int | None
    reason: str = ""


def http_status(outcomes: list[InstanceOutcome]) -> HTTPStatus:
    """PS3.18 Table 10.5.3-1: 200 all stored, 202 some failed, 409 none stored."""
    stored = sum(1 for o in outcomes if o.failure is None)
    if stored == len(outcomes):
        return HTTPStatus.OK
    return HTTPStatus.ACCEPTED if stored else HTTPStatus.CONFLICT


def _items(outcomes: list[InstanceOutcome], failed: bool) -> list[list[tuple[str, Any]]]:
    items = []
    for o in outcomes:
        if (o.failure is not None) != failed:
            continue
        item: list[tuple[str, Any]] = []
        if o.sop_class_uid:
            item.append(("ReferencedSOPClassUID", o.sop_class_uid))
        if o.sop_instance_uid:
            item.append(("ReferencedSOPInstanceUID", o.sop_instance_uid))
        if failed:
            item.append(("FailureReason", o.failure))
        items.append(item)
    return items


def response_attributes(outcomes: list[InstanceOutcome]) -> list[tuple[str, Any]]:
    """The Store Instances Response Module's attributes (keyword, value); sequences as lists of items."""
    attributes: list[tuple[str, Any]] = []
    failed = _items(outcomes, failed=True)
    stored = _items(outcomes, failed=False)
    if failed:
        attributes.append(("FailedSOPSequence", failed))
    if stored:
        attributes.append(("ReferencedSOPSequence", stored))
    return attributes


def _json_value(keyword: str, value: Any) -> dict[str, Any]:
    tag, vr = _TAGS[keyword]
    if vr == "SQ":
        return {"vr": vr, "Value": [dict((_TAGS[k][0], _json_value(k, v)) for k, v in item) for item in value]}
    return {"vr": vr, "Value": [value]}


def to_json(attributes: list[tuple[str, Any]]) -> bytes:
    """DICOM JSON (PS3.18 F.2) of the response attributes."""
    return json.dumps({_TAGS[k][0]: _json_value(k, v) for k, v in attributes}).encode("utf-8")


def _xml_attribute(keyword: str, value: Any) -> str:
    tag, vr = _TAGS[keyword]
    head = f'<DicomAttribute tag="{tag}" vr="{vr}" keyword="{keyword}">'
    if vr == "SQ":
        inner = "".join(f'<Item number="{n}">' + "".join(_xml_attribute(k, v) for k, v in item) + "</Item>"
                        for n, item in enumerate(value, 1))
    else:
        inner = f'<Value number="1">{escape(str(value))}</Value>'
    return head + inner + "</DicomAttribute>"


def to_xml(attributes: list[tuple[str, Any]]) -> bytes:
    """Native DICOM Model XML (PS3.19 A.1) of the response attributes."""
    body = "".join(_xml_attribute(k, v) for k, v in attributes)
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">{body}</NativeDicomModel>\n'
            ).encode()


def response_media_type(accept: str) -> str | None:
    """The response media type for an Accept header: JSON unless only XML is asked for; ``None``: neither fits.

    ``application/json`` and ``*/*`` get DICOM JSON; an empty header too.
    """
    wanted = [part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()]
    if not wanted:
        return MEDIA_JSON
    for media in wanted:
        if media in (MEDIA_JSON, "application/json", "*/*", "application/*"):
            return MEDIA_JSON
        if media in (MEDIA_XML, "application/xml", "text/xml"):
            return MEDIA_XML
    return None


def render(outcomes: list[InstanceOutcome], media_type: str) -> bytes:
    """The response body for ``outcomes`` in ``media_type`` (:data:`MEDIA_JSON` or :data:`MEDIA_XML`)."""
    attributes = response_attributes(outcomes)
    return to_xml(attributes) if media_type == MEDIA_XML else to_json(attributes)


# ------------------------------------------------------------------------------------- parsing (the sending side)


@dataclass
class ParsedResponse:
    """Per-instance results read from a STOW-RS response body."""

    #: SOP Instance UID -> Warning Reason (0 when stored without warning).
    stored: dict[str, int]
    #: SOP Instance UID -> Failure Reason.
    failed: dict[str, int]


def _first(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def parse_json_response(body: bytes) -> ParsedResponse:
    """Read ReferencedSOPSequence / FailedSOPSequence of a DICOM JSON Store Instances Response.

    Raises
    ------
    ValueError
        When the body is not a DICOM JSON object.
    """
    data = json.loads(body or b"{}")
    if isinstance(data, list) and len(data) == 1:  # some servers wrap the one dataset in an array
        data = data[0]
    if not isinstance(data, dict):
        raise ValueError("the STOW-RS response is not a DICOM JSON object")
    stored: dict[str, int] = {}
    failed: dict[str, int] = {}
    for item in (data.get("00081199") or {}).get("Value") or []:
        uid = _first(item, "00081155")
        if uid:
            stored[str(uid)] = int(_first(item, "00081196") or 0)
    for item in (data.get("00081198") or {}).get("Value") or []:
        uid = _first(item, "00081155")
        if uid:
            failed[str(uid)] = int(_first(item, "00081197") or FAILURE_PROCESSING)
    return ParsedResponse(stored, failed)


def parse_xml_response(body: bytes) -> ParsedResponse:
    """Read ReferencedSOPSequence / FailedSOPSequence of a Native DICOM Model XML response.

    Raises
    ------
    ValueError
        When the body is not XML.
    """
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise ValueError(f"the STOW-RS response is not XML: {exc}") from exc

    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1]

    def value(item: Any, tag: str) -> str | None:
        for attr in item:
            if local(attr.tag) == "DicomAttribute" and attr.get("tag", "").upper() == tag:
                for v in attr:
                    if local(v.tag) == "Value":
                        return (v.text or "").strip()
        return None

    stored: dict[str, int] = {}
    failed: dict[str, int] = {}
    for attr in root:
        tag = attr.get("tag", "").upper()
        if local(attr.tag) != "DicomAttribute" or tag not in ("00081199", "00081198"):
            continue
        for item in attr:
            uid = value(item, "00081155")
            if not uid:
                continue
            if tag == "00081199":
                stored[uid] = int(value(item, "00081196") or 0)
            else:
                failed[uid] = int(value(item, "00081197") or FAILURE_PROCESSING)
    return ParsedResponse(stored, failed)
