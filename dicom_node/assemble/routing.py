"""Routing rules: which complete series to denoise, with which model, and where the result goes.

Rules are data from the configuration, tried in order; the first rule whose every match key fits the series
wins, and a rule without match keys matches everything (a fallback). The node's own output is never routed to a
denoiser (loop guard), even when it comes back through PACS. :func:`explain` says for each rule why it did or did
not match, for ``dicom-node rules test``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dicom_node.config import Rule

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesAttributes:
    """What rules match on, read from the job table or from a file's header."""

    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    manufacturer: str = ""
    image_type: tuple[str, ...] = ()
    slice_thickness: float | None = None
    calling_ae: str = ""
    called_ae: str = ""
    is_node_output: bool = False

    @classmethod
    def from_row(cls, row: Any) -> SeriesAttributes:
        """From a ``series`` row (or anything with the same attribute names)."""
        return cls(
            modality=row.modality or "", body_part=row.body_part or "",
            series_description=row.series_description or "", manufacturer=row.manufacturer or "",
            image_type=tuple(v.strip().upper() for v in (row.image_type or "").split("\\") if v.strip()),
            slice_thickness=row.slice_thickness, calling_ae=row.calling_ae or "", called_ae=row.called_ae or "",
            is_node_output=bool(row.is_node_output),
        )


def _alternatives(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def mismatches(rule: Rule, series: SeriesAttributes) -> list[str]:
    """Return why ``rule`` does not match ``series`` (an empty list when it matches)."""
    reasons: list[str] = []
    exact = {"Modality": series.modality, "CallingAETitle": series.calling_ae, "CalledAETitle": series.called_ae}
    regex = {"SeriesDescription": series.series_description, "BodyPartExamined": series.body_part,
             "Manufacturer": series.manufacturer}
    for key, wanted in rule.match.items():
        if key in exact:
            options = _alternatives(wanted)
            if exact[key].strip() not in [o.strip() for o in options]:
                reasons.append(f"{key} is {exact[key]!r}, not {' or '.join(map(repr, options))}")
        elif key in regex:
            options = _alternatives(wanted)
            if not any(re.search(pattern, regex[key]) for pattern in options):
                reasons.append(f"{key} {regex[key]!r} does not match {' or '.join(map(repr, options))}")
        elif key == "ImageType":
            missing = [v for v in _alternatives(wanted) if v.upper() not in series.image_type]
            if missing:
                shown = "\\".join(series.image_type)
                reasons.append(f"ImageType {shown!r} lacks {', '.join(missing)}")
        elif key == "SliceThickness":
            low, high = wanted
            if series.slice_thickness is None:
                reasons.append("SliceThickness is absent")
            elif not low <= series.slice_thickness <= high:
                reasons.append(f"SliceThickness {series.slice_thickness:g} mm is outside [{low:g}, {high:g}]")
    return reasons


@dataclass
class RouteDecision:
    """The outcome of routing one series."""

    rule: Rule | None
    #: Per rule tried: its name and why it did not match (empty for the winner).
    tried: list[tuple[str, list[str]]] = field(default_factory=list)
    #: Why nothing is done, when ``rule`` is ``None`` or only forwards.
    note: str = ""

    @property
    def denoise(self) -> bool:
        return self.rule is not None and bool(self.rule.model)


def route(rules: Sequence[Rule], series: SeriesAttributes) -> RouteDecision:
    """Pick the first matching rule; apply the loop guard."""
    tried: list[tuple[str, list[str]]] = []
    for rule in rules:
        reasons = mismatches(rule, series)
        tried.append((rule.name, reasons))
        if reasons:
            continue
        if series.is_node_output:
            return RouteDecision(None, tried, "made by dicom-node (loop guard): never denoised again")
        return RouteDecision(rule, tried)
    return RouteDecision(None, tried, "no rule matched")


def explain(rules: Sequence[Rule], series: SeriesAttributes) -> list[str]:
    """Human-readable lines: which rule matches and why each other rule did not."""
    decision = route(rules, series)
    lines = []
    for name, reasons in decision.tried:
        if not reasons:
            lines.append(f"  rule {name}: MATCHES")
        else:
            lines.append(f"  rule {name}: no ({'; '.join(reasons)})")
    untried = [r.name for r in rules][len(decision.tried):]
    for name in untried:
        lines.append(f"  rule {name}: not tried (an earlier rule matched)")
    if decision.rule is None:
        lines.append(f"  => not routed: {decision.note}")
    else:
        rule = decision.rule
        what = f"denoise with {rule.model} at strength {rule.strength:g}" if rule.model else "no denoising"
        where = ", ".join(rule.destinations) or "local output folder"
        extra = " and forward the original" if rule.forward_original else ""
        lines.append(f"  => {what}{extra}; send to {where}")
    return lines


def min_quiet_seconds(rules: Sequence[Rule], default: float) -> float:
    """The shortest quiet time any rule (or the default) asks for."""
    values = [default] + [r.quiet_seconds for r in rules if r.quiet_seconds is not None]
    return min(values)
