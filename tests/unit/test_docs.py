"""The conformance statement and operator guide say what the code does (kept in step by these checks)."""

from __future__ import annotations

from pynetdicom.presentation import AllStoragePresentationContexts

from dicom_node.receive import ACCEPTED_TRANSFER_SYNTAXES, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.service import ROLES
from tests.helpers import PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs"


def test_conformance_statement_matches_the_scp() -> None:
    text = (DOCS / "conformance-statement.md").read_text()
    for uid in ACCEPTED_TRANSFER_SYNTAXES:
        assert f"| {uid} |" in text, uid
    assert IMPLEMENTATION_CLASS_UID in text and IMPLEMENTATION_VERSION_NAME in text
    assert f"{len(AllStoragePresentationContexts)} classes" in text
    for status in ("0000", "A700", "C210", "C211", "C212"):
        assert f"| {status} |" in text


def test_operator_guide_covers_every_role_and_command() -> None:
    text = (DOCS / "operator-guide.md").read_text()
    for role in ROLES:
        assert f"| `{role}` |" in text
    for command in ("db migrate-to", "web hash-password", "web new-token", "dicom-node audit", "dicom-node health"):
        assert command in text, command
