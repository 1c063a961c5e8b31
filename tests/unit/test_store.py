"""Job table, spool and the C-STORE handler's storage logic, without sockets."""

from __future__ import annotations

import datetime as dt
import io
import os
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import delete, inspect, select, update

from dicom_node.assemble.assembler import assemble_once
from dicom_node.config import config_from_mapping
from dicom_node.receive.receiver import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_INVALID_UID,
    STATUS_OUT_OF_RESOURCES,
    STATUS_UID_MISMATCH,
    Receiver,
    StoreRefused,
    reindex_spool,
    store_instance,
)
from dicom_node.store.database import make_engine, migrate, schema_head, schema_version, utcnow
from dicom_node.store.repository import status_counts
from dicom_node.store.schema import Base, Instance, Job, JobState, Series, SeriesState
from dicom_node.store.spool import Spool, is_valid_uid
from tests import malformed
from tests.fixtures.synthetic import make_ct_series

EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture()
def receiver(tmp_path: Path) -> Receiver:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    migrate(engine)
    return Receiver(Spool(tmp_path / "spool"), engine, min_free_bytes=0)


@pytest.fixture(scope="module")
def series_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_ct_series(tmp_path_factory.mktemp("series"), n_slices=4, rows=64, cols=64)


def send(receiver: Receiver, path: Path, body: bytes | None = None, affected: str | None = None) -> str:
    ds = dcmread(path)
    data = malformed.encode_dataset(ds) if body is None else body
    return store_instance(receiver, io.BytesIO(data), EXPLICIT_LE, ds.SOPClassUID,
                          affected or ds.SOPInstanceUID, "SCANNER", "DENOISE")


def spool_files(receiver: Receiver) -> list[Path]:
    return sorted(p for p in receiver.spool.root.rglob("*") if p.is_file())


def test_uid_validation() -> None:
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.2") and is_valid_uid("0.1")
    for bad in ("", "1.2.3/../../etc", "1..2", "1.02", "a.b", "1." * 40, None, "1.2.3 ", ".1"):
        assert not is_valid_uid(bad), bad


def test_migrations_match_the_models_and_rerun_cleanly(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    assert schema_version(engine) is None
    migrate(engine)
    migrate(engine)  # opening an up-to-date database changes nothing
    assert schema_version(engine) == schema_head()
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"schema.py changed without a migration: {diff}"
        assert {"patients", "studies", "series", "instances", "jobs", "exports"} <= set(inspect(conn).get_table_names())
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_store_writes_exact_bytes_and_row(receiver: Receiver, series_files: list[Path]) -> None:
    relative = send(receiver, series_files[0])
    stored = receiver.spool.absolute(relative)
    ds = dcmread(series_files[0])
    assert relative == f"spool/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    raw = stored.read_bytes()
    assert raw.endswith(malformed.encode_dataset(ds))
    back = dcmread(stored)
    assert back.file_meta.TransferSyntaxUID == EXPLICIT_LE and back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.SourceApplicationEntityTitle == "SCANNER"
    with receiver.engine.connect() as conn:
        row = conn.execute(select(Instance)).one()
        series = conn.execute(select(Series)).one()
    assert row.path == relative and row.size_bytes == len(raw) and row.receive_count == 1
    assert series.modality == "CT" and series.body_part == "HEAD" and series.slice_thickness == 1.0
    assert series.calling_ae == "SCANNER" and series.state == SeriesState.receiving
    assert not list(receiver.spool.incoming.iterdir())


def test_resend_is_idempotent(receiver: Receiver, series_files: list[Path]) -> None:
    first = send(receiver, series_files[1])
    second = send(receiver, series_files[1])
    assert first == second
    with receiver.engine.connect() as conn:
        rows = conn.execute(select(Instance)).all()
    assert len(rows) == 1 and rows[0].receive_count == 2
    assert len(spool_files(receiver)) == 1


@pytest.mark.parametrize("breaker", [malformed.truncated, malformed.huge_length, malformed.garbage_after_preamble,
                                     malformed.wrong_vr])
def test_malformed_is_refused_and_leaves_nothing(receiver: Receiver, series_files: list[Path], breaker) -> None:
    body = breaker(malformed.encode_dataset(dcmread(series_files[0])))
    with pytest.raises(StoreRefused) as info:
        send(receiver, series_files[0], body=body)
    assert info.value.status == STATUS_CANNOT_UNDERSTAND
    assert spool_files(receiver) == []


def test_uid_that_escapes_is_never_a_path(receiver: Receiver, series_files: list[Path], tmp_path: Path) -> None:
    bad = malformed.uid_with_dots(dcmread(series_files[0]))
    with pytest.raises(StoreRefused) as info:
        store_instance(receiver, io.BytesIO(malformed.encode_dataset(bad)), EXPLICIT_LE, bad.SOPClassUID,
                       bad.SOPInstanceUID, "SCANNER", "DENOISE")
    assert info.value.status == STATUS_INVALID_UID
    assert spool_files(receiver) == [] and not (tmp_path / "etc").exists()


def test_sop_uid_must_match_the_request(receiver: Receiver, series_files: list[Path]) -> None:
    with pytest.raises(StoreRefused) as info:
        send(receiver, series_files[0], affected="1.2.3.4")
    assert info.value.status == STATUS_UID_MISMATCH


def test_disk_watermark_refuses_with_a700(receiver: Receiver, series_files: list[Path]) -> None:
    receiver.min_free_bytes = receiver.spool.free_bytes() + 10**15
    with pytest.raises(StoreRefused) as info:
        send(receiver, series_files[0])
    assert info.value.status == STATUS_OUT_OF_RESOURCES and "watermark" in info.value.reason
    assert spool_files(receiver) == []


def test_write_failure_refuses_with_a700(receiver: Receiver, series_files: list[Path], monkeypatch) -> None:
    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", disk_full)
    with pytest.raises(StoreRefused) as info:
        send(receiver, series_files[0])
    assert info.value.status == STATUS_OUT_OF_RESOURCES and "No space left" in info.value.reason
    assert spool_files(receiver) == []
    with receiver.engine.connect() as conn:  # the row recorded while the fsync ran is gone again
        assert conn.execute(select(Instance.id)).all() == []


def test_database_failure_refuses_and_removes_the_file(receiver: Receiver, series_files: list[Path],
                                                       monkeypatch) -> None:
    def broken(*_args, **_kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr("dicom_node.receive.receiver.record_instance", broken)
    with pytest.raises(StoreRefused) as info:
        send(receiver, series_files[0])
    assert info.value.status == STATUS_OUT_OF_RESOURCES
    assert spool_files(receiver) == []


def test_quiet_series_completes_and_late_instance_makes_a_new_version(receiver: Receiver,
                                                                      series_files: list[Path]) -> None:
    cfg = config_from_mapping({"node": {"quiet_seconds": 60.0},
                               "rules": [{"name": "ct", "match": {"Modality": "CT"}, "model": "m"}]}, environ={})
    for path in series_files[:3]:
        send(receiver, path)
    assert assemble_once(receiver.engine, cfg, utcnow()) == []
    done = assemble_once(receiver.engine, cfg, utcnow() + dt.timedelta(seconds=61))
    assert len(done) == 1 and done[0].instance_count == 3 and done[0].version == 1 and done[0].rule == "ct"
    done_at = utcnow()
    send(receiver, series_files[3])  # a late instance
    with receiver.engine.connect() as conn:
        assert conn.execute(select(Series.state)).scalar_one() == SeriesState.receiving
    again = assemble_once(receiver.engine, cfg, utcnow() + dt.timedelta(seconds=61))
    assert again[0].version == 2 and again[0].instance_count == 4 and again[0].job_pk != done[0].job_pk
    with receiver.engine.connect() as conn:
        counts = status_counts(conn)
    assert counts.series == {"receiving": 0, "complete": 1, "purged": 0} and counts.instances == 4
    # Version 2 covers every instance of version 1, whose job had not started: it is superseded, not run twice.
    assert counts.jobs["queued"] == 1 and counts.jobs["cancelled"] == 1
    assert "supersedes queued job" in again[0].note

    # The whole series sent again, unchanged: a new version is recorded, but nothing new needs denoising.
    later = utcnow() + dt.timedelta(seconds=120)
    for path in series_files[:4]:
        send(receiver, path)
    with receiver.engine.connect() as conn:
        since = conn.execute(select(Series.receiving_since)).scalar_one()
    assert since is not None and since > done_at  # the re-send's receive time counts from the re-send, not v1
    third = assemble_once(receiver.engine, cfg, later + dt.timedelta(seconds=61))
    assert third[0].version == 3 and third[0].job_pk is None and "unchanged re-send" in third[0].note
    with receiver.engine.connect() as conn:
        assert status_counts(conn).jobs["queued"] == 1


def test_older_database_is_upgraded_in_place(tmp_path: Path, series_files: list[Path]) -> None:
    from alembic import command

    from dicom_node.store.database import _alembic_config

    engine = make_engine(f"sqlite:///{tmp_path / 'old.sqlite3'}")
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "0001")
    old = Receiver(Spool(tmp_path / "spool"), engine, 0)
    with engine.begin() as conn:  # a row written by the first version of the schema
        conn.exec_driver_sql(
            "INSERT INTO studies (study_uid, study_date, accession_number, created_at) "
            "VALUES ('1.2.3', '', '', '2026-01-01 00:00:00')")
    migrate(engine)
    assert schema_version(engine) == schema_head()
    send(old, series_files[0])
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM studies").scalar() == 2
        assert conn.execute(select(Series.route_note)).scalar_one() == ""


def test_reindex_spool_recovers_rows_and_removes_partials(receiver: Receiver, series_files: list[Path]) -> None:
    relative = send(receiver, series_files[0])
    with receiver.engine.begin() as conn:  # as if a power loss lost the last commit
        conn.execute(delete(Instance))
    (receiver.spool.incoming / "dead.part").write_bytes(b"half a file")
    assert reindex_spool(receiver) == 1
    with receiver.engine.connect() as conn:
        assert conn.execute(select(Instance.path)).scalar_one() == relative
    assert not list(receiver.spool.incoming.iterdir())
    assert reindex_spool(receiver) == 0


def test_reindex_spool_quarantines_a_cut_short_file_without_row(receiver: Receiver,
                                                                 series_files: list[Path]) -> None:
    """A write interrupted by a power loss after its rename can leave a short file in place and no row."""
    relative = send(receiver, series_files[0])
    whole = receiver.spool.absolute(relative)
    with receiver.engine.begin() as conn:
        conn.execute(delete(Instance))
    whole.write_bytes(whole.read_bytes()[:3000])  # cut inside the pixel data
    assert reindex_spool(receiver) == 0
    assert not whole.exists()
    assert [p.name for p in (receiver.spool.root.parent / "quarantine").iterdir()] == [
        f"{whole.parent.name}-{whole.name}"]
    with receiver.engine.connect() as conn:
        assert conn.execute(select(Instance.id)).all() == []


def test_next_due_follows_each_series_rule_quiet_time(receiver: Receiver, series_files: list[Path]) -> None:
    from dicom_node.assemble.assembler import seconds_until_next_due

    cfg = config_from_mapping({"node": {"quiet_seconds": 60},
                               "rules": [{"name": "ct", "match": {"Modality": "CT"}, "model": "m",
                                          "quiet_seconds": 20}]}, environ={})
    now = utcnow()
    assert seconds_until_next_due(receiver.engine, cfg, now) is None  # nothing is receiving
    send(receiver, series_files[0])
    left = seconds_until_next_due(receiver.engine, cfg, now)
    assert left is not None and 19.0 < left <= 20.5  # the rule's 20 s, not the node's 60 s
    overdue = seconds_until_next_due(receiver.engine, cfg, now + dt.timedelta(seconds=25))
    assert overdue is not None and overdue < 0
    assemble_once(receiver.engine, cfg, now + dt.timedelta(seconds=25))
    assert seconds_until_next_due(receiver.engine, cfg, now) is None  # complete: nothing waits


def test_doorbell_wakes_a_waiter_and_never_misses_an_earlier_ring() -> None:
    import threading
    import time

    from dicom_node.store.doorbell import Doorbell

    bell = Doorbell()
    seen = bell.rings
    bell.ring()  # rung while the waiter was looking for work: the wait must end at once
    assert bell.wait(seen, timeout=5.0)
    seen = bell.rings
    assert not bell.wait(seen, timeout=0.05)  # no ring: times out
    woke = threading.Event()
    seen = bell.rings

    def waiter() -> None:
        if bell.wait(seen, timeout=10.0):
            woke.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.1)
    bell.ring()
    thread.join(timeout=5.0)
    assert woke.is_set()


def test_idle_worker_reads_quiet_routed_series_ahead_and_the_scan_uses_them(
        receiver: Receiver, series_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import dicom_node.denoise.series as series_module
    from dicom_node.denoise.series import scan
    from dicom_node.denoise.worker import PREFETCH_AFTER_SECONDS, Worker

    cfg = config_from_mapping({"node": {"data_dir": str(tmp_path), "quiet_seconds": 60},
                               "rules": [{"name": "ct", "match": {"Modality": "CT"}, "model": "m"}]}, environ={})
    worker = Worker(cfg, receiver.engine, threading_event())
    for path in series_files:
        send(receiver, path)
    assert worker.prefetch_headers() == 0  # not routed yet: the assembler has not recorded its rule
    assert assemble_once(receiver.engine, cfg) == []  # still receiving, now with its rule recorded
    assert worker.prefetch_headers() == 0  # instances still arriving: reading now would compete with them
    time.sleep(PREFETCH_AFTER_SECONDS + 0.1)
    assert worker.prefetch_headers() == len(series_files)
    assert worker.prefetch_headers() == 0  # nothing is read twice
    reads: list[Path] = []
    real = series_module.read_instance_header
    def counted_read(path: Path) -> Any:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(series_module, "read_instance_header", counted_read)
    stored = spool_files(receiver)
    later = time.time_ns() + 10**9
    os.utime(stored[0], ns=(later, later))  # changed since it was read: read again
    found = scan(stored, worker.headers)
    assert len(found.series) == 1 and len(found.series[0].instances) == len(series_files)
    assert reads == [stored[0]]  # every other header came from the read-ahead
    assert len(worker.headers) == 0  # taken by the scan


def test_read_ahead_skips_unrouted_series_and_forgets_finished_ones(
        receiver: Receiver, series_files: list[Path], tmp_path: Path) -> None:
    import time

    from dicom_node.denoise.worker import PREFETCH_AFTER_SECONDS, Worker

    unrouted = config_from_mapping({"node": {"data_dir": str(tmp_path), "quiet_seconds": 60},
                                    "rules": [{"name": "mr", "match": {"Modality": "MR"}, "model": "m"}]},
                                   environ={})
    for path in series_files:
        send(receiver, path)
    time.sleep(PREFETCH_AFTER_SECONDS + 0.1)
    assemble_once(receiver.engine, unrouted)
    assert Worker(unrouted, receiver.engine, threading_event()).prefetch_headers() == 0
    cfg = config_from_mapping({"node": {"data_dir": str(tmp_path), "quiet_seconds": 60},
                               "rules": [{"name": "ct", "match": {"Modality": "CT"}, "model": "m"}]}, environ={})
    worker = Worker(cfg, receiver.engine, threading_event())
    assert worker.prefetch_headers() == 0  # the recorded rule is still the old configuration's (none)
    assemble_once(receiver.engine, cfg)  # a reloaded configuration: the assembler records the new rule
    assert worker.prefetch_headers() == len(series_files)
    assemble_once(receiver.engine, cfg, utcnow() + dt.timedelta(seconds=61))  # complete: a job is queued
    worker.prefetch_headers()
    assert len(worker.headers) == len(series_files)  # kept for the queued job
    with receiver.engine.begin() as conn:
        conn.execute(update(Job).values(state=JobState.cancelled))
    worker.prefetch_headers()
    assert len(worker.headers) == 0  # nobody will scan them: forgotten


def threading_event():  # noqa: ANN201
    import threading

    return threading.Event()
