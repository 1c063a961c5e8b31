"""A series is sent over several associations at once, and still arrives whole when the destination accepts
only one of them (a per-AE association limit). The destination is a pynetdicom storage SCP, so each stored
instance can be traced to the association that carried it (Orthanc, in test_pipeline.py, does not say), run in
its own process as a real peer would be."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import Config, Destination
from dicom_node.dimse.reactor import use_event_driven_requestors
from dicom_node.export.exporter import send_series
from tests.fixtures.synthetic import make_ct_series
from tests.peers import free_port, stop_process


class StorageSCP:
    """``tests/storage_scp.py`` in its own process; ``stored()`` lists (association number, SOP Instance UID)."""

    def __init__(self, tmp_path: Path, maximum_associations: int) -> None:
        self.port = free_port()
        self.record = tmp_path / f"stored-{self.port}.txt"
        self.record.touch()
        self.process = subprocess.Popen([sys.executable, "-m", "tests.storage_scp", str(self.port),
                                         str(maximum_associations), str(self.record)],
                                        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True)
        # Not wait_for_port: its bare TCP probe would take the only association slot until it timed out.
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "listening"

    def stored(self) -> list[tuple[int, str]]:
        return [(int(n), uid) for n, uid in (line.split() for line in self.record.read_text().splitlines())]

    def destination(self, associations: int) -> Destination:
        return Destination(name="lanes", ae_title="LANES", host="127.0.0.1", port=self.port,
                           associations=associations, timeout_seconds=10.0)

    def close(self) -> None:
        stop_process(self.process)


@pytest.fixture(autouse=True)
def association_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The associations ``Node.start`` would set up: event-driven unless DICOM_NODE_NODE__DIMSE_FAST_PATH is
    false (CI's second pass); pynetdicom's own name is restored afterwards, so no other test inherits it."""
    import pynetdicom.ae

    monkeypatch.setattr(pynetdicom.ae, "Association", pynetdicom.ae.Association)
    if os.environ.get("DICOM_NODE_NODE__DIMSE_FAST_PATH", "true").strip().lower() != "false":
        use_event_driven_requestors()


@pytest.fixture
def series(tmp_path: Path) -> list[tuple[int, str, Path]]:
    files = make_ct_series(tmp_path / "series", n_slices=48, rows=64, cols=64)
    return [(key, path.stem, path) for key, path in enumerate(files)]


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator:
    made: list[StorageSCP] = []

    def make(maximum_associations: int) -> StorageSCP:
        made.append(StorageSCP(tmp_path, maximum_associations))
        return made[-1]

    yield make
    for scp in made:
        scp.close()


def _uids(series: list[tuple[int, str, Path]]) -> list[str]:
    return [str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for _key, _sop, path in series]


def _send(dest: Destination, series: list[tuple[int, str, Path]]) -> tuple[str, dict[int, tuple[int | None, str]]]:
    answers: dict[int, tuple[int | None, str]] = {}

    def on_status(key: int, status: int | None, error: str) -> None:
        assert key not in answers, f"instance {key} answered twice"
        answers[key] = (status, error)

    return send_series(Config(), dest, series, on_status), answers


def test_two_associations_share_the_series_and_each_instance_is_sent_once(series, scp_factory) -> None:
    scp = scp_factory(maximum_associations=8)
    error, answers = _send(scp.destination(associations=2), series)
    assert error == ""
    assert answers == {key: (0, "") for key, _sop, _path in series}
    assert sorted(uid for _assoc, uid in scp.stored()) == sorted(_uids(series))
    per_association = Counter(assoc for assoc, _uid in scp.stored())
    assert len(per_association) == 2, per_association
    assert min(per_association.values()) > 0


def test_a_destination_that_accepts_one_association_still_gets_the_whole_series(series, scp_factory) -> None:
    scp = scp_factory(maximum_associations=1)
    error, answers = _send(scp.destination(associations=4), series)
    assert error == ""
    assert answers == {key: (0, "") for key, _sop, _path in series}
    assert sorted(uid for _assoc, uid in scp.stored()) == sorted(_uids(series))
    assert len({assoc for assoc, _uid in scp.stored()}) == 1


def test_one_association_sends_in_slice_order(series, scp_factory) -> None:
    scp = scp_factory(maximum_associations=8)
    error, _answers = _send(scp.destination(associations=1), series)
    assert error == ""
    assert len({assoc for assoc, _uid in scp.stored()}) == 1
    assert [uid for _assoc, uid in scp.stored()] == _uids(series)


def test_a_destination_that_refuses_every_association_fails_the_attempt_with_the_reason(series) -> None:
    dest = Destination(name="nobody", ae_title="NOBODY", host="127.0.0.1", port=free_port(), associations=2,
                       timeout_seconds=5.0)
    error, answers = _send(dest, series)
    assert "cannot connect" in error
    assert answers == {}
