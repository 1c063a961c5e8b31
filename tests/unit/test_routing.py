"""Routing rules: first match wins, each match key, fallback, loop guard, explanations."""

from __future__ import annotations

from dicom_node.assemble.routing import SeriesAttributes, explain, min_quiet_seconds, route
from dicom_node.config import config_from_mapping

RULES = config_from_mapping({
    "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    "rules": [
        {"name": "scout", "match": {"SeriesDescription": "(?i)scout|localizer"}, "forward_original": True,
         "destinations": ["pacs"]},
        {"name": "ct-thin-head", "match": {"Modality": "CT", "BodyPartExamined": "(?i)head|brain",
                                           "SliceThickness": [0.5, 3.0], "ImageType": ["ORIGINAL", "AXIAL"],
                                           "Manufacturer": ["GE", "Philips"], "CallingAETitle": ["CT1", "CT2"]},
         "model": "ct-cnn", "strength": 0.8, "destinations": ["pacs"], "quiet_seconds": 5.0},
        {"name": "ct-any", "match": {"Modality": "CT"}, "model": "ct-cnn-small"},
        {"name": "fallback", "match": {}, "forward_original": True, "destinations": ["pacs"], "quiet_seconds": 30.0},
    ],
}, environ={}).rules

HEAD = SeriesAttributes(modality="CT", body_part="HEAD", series_description="Brain 1mm", manufacturer="GE MEDICAL",
                        image_type=("ORIGINAL", "PRIMARY", "AXIAL"), slice_thickness=1.0, calling_ae="CT1")


def test_first_matching_rule_wins() -> None:
    decision = route(RULES, HEAD)
    assert decision.rule is not None and decision.rule.name == "ct-thin-head" and decision.denoise
    assert [name for name, _ in decision.tried] == ["scout", "ct-thin-head"]


def test_each_key_can_reject() -> None:
    cases = {
        "SliceThickness 5 mm is outside": HEAD.__class__(**{**HEAD.__dict__, "slice_thickness": 5.0}),
        "SliceThickness is absent": HEAD.__class__(**{**HEAD.__dict__, "slice_thickness": None}),
        "BodyPartExamined 'CHEST'": HEAD.__class__(**{**HEAD.__dict__, "body_part": "CHEST"}),
        "ImageType 'DERIVED\\\\SECONDARY' lacks ORIGINAL, AXIAL":
            HEAD.__class__(**{**HEAD.__dict__, "image_type": ("DERIVED", "SECONDARY")}),
        "Manufacturer 'SIEMENS'": HEAD.__class__(**{**HEAD.__dict__, "manufacturer": "SIEMENS"}),
        "CallingAETitle is 'MR1'": HEAD.__class__(**{**HEAD.__dict__, "calling_ae": "MR1"}),
    }
    for expected, series in cases.items():
        decision = route(RULES, series)
        assert decision.rule is not None and decision.rule.name == "ct-any", expected
        reasons = dict(decision.tried)["ct-thin-head"]
        assert any(expected in r for r in reasons), (expected, reasons)


def test_fallback_and_scouts_forward_only() -> None:
    mr = route(RULES, SeriesAttributes(modality="MR", series_description="T1"))
    assert mr.rule is not None and mr.rule.name == "fallback" and not mr.denoise
    scout = route(RULES, SeriesAttributes(modality="CT", series_description="Scout"))
    assert scout.rule is not None and scout.rule.name == "scout" and not scout.denoise


def test_no_rule_matches() -> None:
    decision = route(RULES[1:3], SeriesAttributes(modality="MR"))
    assert decision.rule is None and decision.note == "no rule matched"


def test_loop_guard_never_denoises_node_output() -> None:
    ours = HEAD.__class__(**{**HEAD.__dict__, "is_node_output": True})
    decision = route(RULES, ours)
    assert decision.rule is None and "loop guard" in decision.note


def test_explain_and_quiet_time() -> None:
    lines = explain(RULES, SeriesAttributes(modality="CT", slice_thickness=5.0))
    assert lines[0].startswith("  rule scout: no (SeriesDescription")
    assert lines[1].startswith("  rule ct-thin-head: no (") and "SliceThickness 5 mm" in lines[1]
    assert lines[2] == "  rule ct-any: MATCHES" and lines[3] == "  rule fallback: not tried (an earlier rule matched)"
    assert lines[4] == "  => denoise with ct-cnn-small at strength 1; send to local output folder"
    assert min_quiet_seconds(RULES, 10.0) == 5.0


def test_from_row_splits_image_type() -> None:
    class Row:
        modality, body_part, series_description, manufacturer = "CT", "", "", ""
        image_type, slice_thickness, calling_ae, called_ae, is_node_output = "original\\primary", 2.0, "", "", 0

    attrs = SeriesAttributes.from_row(Row)
    assert attrs.image_type == ("ORIGINAL", "PRIMARY") and attrs.slice_thickness == 2.0
