"""Job and export queues: atomic claims, heartbeats, stalls, retries with backoff, operator actions."""

from __future__ import annotations

import datetime as dt
import random
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.store.database import make_engine, migrate, utcnow
from dicom_node.store.queue import (
    RetryPolicy,
    cancel,
    claim_export,
    claim_job,
    enqueue_export,
    enqueue_job,
    fail_job,
    finish_export,
    finish_job,
    heartbeat_job,
    pending_export_instances,
    record_instance_status,
    requeue_orphans,
    requeue_stalled_jobs,
    retry,
)
from dicom_node.store.schema import Export, ExportState, Job, JobState, Series, Study


@pytest.fixture()
def engine(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    migrate(engine)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(Study.__table__.insert().values(id=1, study_uid="1.2", study_date="", accession_number="",
                                                     created_at=now))
        for i in range(1, 21):
            conn.execute(Series.__table__.insert().values(
                id=i, series_uid=f"1.2.{i}", study_pk=1, modality="CT", series_description="", body_part="",
                manufacturer="", image_type="", calling_ae="", called_ae="", is_node_output=False,
                state="complete", completion_count=1, first_received_at=now, last_received_at=now))
    yield engine
    engine.dispose()


def test_retry_policy_is_capped_exponential_with_jitter() -> None:
    policy = RetryPolicy(max_attempts=5, base_seconds=2.0, max_seconds=30.0)
    rng = random.Random(1)
    for attempt, cap in ((1, 2.0), (2, 4.0), (3, 8.0), (5, 30.0), (9, 30.0)):
        delays = [policy.delay(attempt, rng) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays) and max(delays) - min(delays) > 0
    assert not policy.gives_up(4) and policy.gives_up(5)


def test_concurrent_claims_never_share_a_job(engine) -> None:
    now = utcnow()
    with engine.begin() as conn:
        for i in range(1, 21):
            enqueue_job(conn, i, 1, "r", "m", 1.0, now)
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        while True:
            with engine.begin() as conn:
                job = claim_job(conn, name, utcnow())
            if job is None:
                return
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(1, 21))


def test_job_lifecycle_heartbeat_stall_and_failures(engine) -> None:
    now = utcnow()
    with engine.begin() as conn:
        a = enqueue_job(conn, 1, 1, "r", "m", 1.0, now)
        b = enqueue_job(conn, 2, 1, "r", "m", 1.0, now + dt.timedelta(hours=1))  # not yet runnable
        job = claim_job(conn, "w1", now)
        assert job is not None and job.id == a and job.attempts == 1
        assert claim_job(conn, "w2", now) is None
        assert heartbeat_job(conn, a, "w1", now) and not heartbeat_job(conn, a, "w2", now)
        # The worker dies: its job is taken up again after the timeout.
        assert requeue_stalled_jobs(conn, now + dt.timedelta(seconds=30), 60) == []
        assert requeue_stalled_jobs(conn, now + dt.timedelta(seconds=61), 60) == [a]
        job = claim_job(conn, "w2", now + dt.timedelta(seconds=62))
        assert job is not None and job.attempts == 2
        assert not finish_job(conn, a, "w1", "1.2.3", now)  # the dead worker can no longer finish it
        fail_job(conn, a, "model refused the series", now, None)
        row = conn.execute(select(Job.__table__).where(Job.id == a)).one()
        assert row.state == JobState.failed and row.last_error == "model refused the series"
        assert retry(conn, "job", a, now) and not retry(conn, "job", b, now)
        assert cancel(conn, "job", b, now)
        assert conn.execute(select(Job.state).where(Job.id == b)).scalar_one() == JobState.cancelled


def test_export_records_each_instance_and_resends_only_failures(engine) -> None:
    now = utcnow()
    policy = RetryPolicy(3, 1.0, 10.0)
    with engine.begin() as conn:
        key = enqueue_export(conn, "1.2.3", "pacs", [("1.1", "a.dcm"), ("1.2", "b.dcm")], now)
        enqueue_export(conn, "1.2.4", "other", [("1.3", "c.dcm")], now)
        claimed = claim_export(conn, "pacs", "e1", now)
        assert claimed is not None and claimed.id == key and claim_export(conn, "pacs", "e2", now) is None
        first, second = pending_export_instances(conn, key)
        record_instance_status(conn, first[0], 0x0000, "", now)
        record_instance_status(conn, second[0], 0xA700, "out of resources", now)
        state = finish_export(conn, key, now, "", now + dt.timedelta(seconds=policy.delay(1)), False)
        assert state == ExportState.queued
        assert [p[1] for p in pending_export_instances(conn, key)] == ["1.2"]
        row = conn.execute(select(Export.__table__).where(Export.id == key)).one()
        assert (row.sent_count, row.failed_count) == (1, 1) and "1 of 2" in row.last_error
        later = now + dt.timedelta(seconds=20)
        claimed = claim_export(conn, "pacs", "e1", later)
        assert claimed is not None and claimed.attempts == 2
        record_instance_status(conn, second[0], 0x0000, "", later)
        assert finish_export(conn, key, later, "", None, False) == ExportState.succeeded


def test_export_gives_up_after_max_attempts(engine) -> None:
    now = utcnow()
    with engine.begin() as conn:
        key = enqueue_export(conn, "1.2.3", "pacs", [("1.1", "a.dcm")], now)
        claim_export(conn, "pacs", "e1", now)
        state = finish_export(conn, key, now, "association failed (no connection)", None, True)
        assert state == ExportState.failed
        assert retry(conn, "export", key, now)
        assert claim_export(conn, "pacs", "e1", now).attempts == 1


def test_orphans_of_dead_processes_are_requeued(engine) -> None:
    now = utcnow()
    with engine.begin() as conn:
        enqueue_job(conn, 1, 1, "r", "m", 1.0, now)
        enqueue_job(conn, 2, 1, "r", "m", 1.0, now)
        claim_job(conn, "hostA:999999999:worker", now)  # a pid that cannot exist
        claim_job(conn, f"hostA:{__import__('os').getpid()}:worker", now)  # this process: alive
        assert requeue_orphans(conn, "hostA", now) == ["job 1"]
        assert requeue_orphans(conn, "hostB", now) == []
