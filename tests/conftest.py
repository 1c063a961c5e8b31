"""Shared fixtures.

Real data lives in ``../shared/data`` beside the project (override with ``DICOM_NODE_SHARED_DATA``). A user's
clone may not have it: tests that need it skip there, but in CI (``CI=true``) its absence is an error.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import IN_CI, shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared real-data folder; skips outside CI when absent, fails in CI."""
    path = shared_data_dir()
    if not path.is_dir():
        if IN_CI:
            pytest.fail(f"shared data folder {path} is missing; CI must have it (set DICOM_NODE_SHARED_DATA)")
        pytest.skip(f"shared data folder {path} is absent (set DICOM_NODE_SHARED_DATA)")
    return path
