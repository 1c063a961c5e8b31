"""Helpers shared by tests: where the real data is, and finding the real peer programs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def shared_data_dir() -> Path:
    """The folder of real DICOM data (``$DICOM_NODE_SHARED_DATA`` or ``../shared/data``)."""
    return Path(os.environ.get("DICOM_NODE_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data")).resolve()


def require_program(name: str) -> str:
    """Return the path of an external program; fail (never skip) when it is missing."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; run `bash .ci/run` or install the Debian packages in README.md")
    return found


def pydicom_test_file(name: str) -> Path:
    """The path of one of the test files that ship with pydicom (``pydicom.data``)."""
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name)
    if not isinstance(found, str):
        raise FileNotFoundError(f"pydicom has no test file {name!r}")
    return Path(found)
