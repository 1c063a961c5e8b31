"""Job and export queues: atomic claims, heartbeats, stalls, retries with backoff, operator actions."""

from __future__ import annotations

import datetime as dt
import random
import threading
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update

from dicom_node.store.database import make_engine, migrate, utcnow
from dicom_node.store.queue import (
    ProcessIdentity,
    RetryPolicy,
    cancel,
    claim_export,
    claim_job,
    end_process,
    enqueue_export,
    enqueue_job,
    fail_job,
    finish_export,
    finish_job,
    heartbeat_job,
    job_covering,
    pending_export_instances,
    record_instance_status,
    register_process,
    renew_lease,
    requeue_orphans,
    requeue_stalled_jobs,
    retry,
    series_instance_paths,
    supersede_queued_jobs,
    version_instances,
)
from dicom_node.store.schema import Export, ExportState, Job, JobState, NodeProcess, Series, Study


@pytest.fixture()
def engine(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    migrate(engine)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(insert(Study).values(id=1, study_uid="1.2", study_date="", accession_number="",
                                                     created_at=now))
        for i in range(1, 21):
            conn.execute(insert(Series).values(
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


def test_claims_of_a_process_whose_lease_ran_out_are_requeued_whatever_its_pid(engine) -> None:
    """A restarted container is PID 1 again: its predecessor's claims must not look like its own."""
    now = utcnow()
    dead = ProcessIdentity("node-1", 1, "a" * 16)  # killed with kill -9: the lease is no longer renewed
    alive = ProcessIdentity("node-1", 7, "b" * 16)  # another live process, same host
    successor = ProcessIdentity("node-1", 1, "c" * 16)  # the restart: same host, same pid, new token
    with engine.begin() as conn:
        for key in (1, 2, 3):
            enqueue_job(conn, key, 1, "r", "m", 1.0, now)
        register_process(conn, dead, "all", now - dt.timedelta(seconds=30), 15.0)
        register_process(conn, alive, "worker", now, 15.0)
        claim_job(conn, dead.worker_id("worker"), now)
        claim_job(conn, alive.worker_id("worker"), now)
        key = enqueue_export(conn, "1.2.9", "pacs", [], now)
        claim_export(conn, "pacs", dead.worker_id("export"), now)

        register_process(conn, successor, "all", now, 15.0)
        assert requeue_orphans(conn, successor, now) == ["job 1", "export " + str(key)]
        jobs = {j.id: j for j in conn.execute(select(Job.__table__)).all()}
        assert jobs[1].state == JobState.queued and "lease" in jobs[1].last_error
        assert jobs[2].state == JobState.running  # the live process keeps its claim
        # The dead start's row is removed; the live ones stay.
        assert {t for t in conn.execute(select(NodeProcess.token)).scalars()} == {alive.token, successor.token}

        # A clean stop ends the lease: its work is taken over at once, not after the lease time.
        end_process(conn, alive)
        assert requeue_orphans(conn, successor, now) == ["job 2"]
        # A renewal of a removed lease says so (the process then registers again).
        assert not renew_lease(conn, alive, now, 15.0) and renew_lease(conn, successor, now, 15.0)


def test_legacy_claims_without_a_token_fall_back_to_the_host_and_pid(engine) -> None:
    now = utcnow()
    me = ProcessIdentity("hostA", __import__("os").getpid(), "d" * 16)
    with engine.begin() as conn:
        for key in (1, 2, 3):
            enqueue_job(conn, key, 1, "r", "m", 1.0, now)
        claim_job(conn, "hostA:999999999:worker", now)  # a pid that cannot exist
        claim_job(conn, f"hostA:{me.pid}:worker", now)  # our own pid: a predecessor's claim, so dead
        claim_job(conn, "hostB:1:worker", now)  # another host: left to the stall timeout
        assert requeue_orphans(conn, me, now) == ["job 1", "job 2"]


def test_a_version_covers_exactly_its_instances_and_an_unchanged_resend_needs_no_job(engine) -> None:
    from dicom_node.store.schema import Instance

    now = utcnow()

    def add(conn, uid: str) -> None:
        conn.execute(insert(Instance).values(
            sop_instance_uid=uid, series_pk=1, sop_class_uid="1.2", transfer_syntax_uid="1.2", path=f"{uid}.dcm",
            size_bytes=1, received_at=now, receive_count=1))

    with engine.begin() as conn:
        for n in range(3):
            add(conn, f"1.9.{n}")
        v1 = version_instances(conn, 1)
        job1 = enqueue_job(conn, 1, 1, "r", "m", 1.0, now, v1)
        add(conn, "1.9.3")  # arrives after version 1 completed
        assert series_instance_paths(conn, 1, v1.last_instance_pk) == ["1.9.0.dcm", "1.9.1.dcm", "1.9.2.dcm"]
        v2 = version_instances(conn, 1)
        assert v2.count == 4 and v2.digest != v1.digest
        assert job_covering(conn, 1, "m", 1.0, v2.digest) is None  # grown: a new job is needed
        job2 = enqueue_job(conn, 1, 2, "r", "m", 1.0, now, v2)
        assert supersede_queued_jobs(conn, 1, job2, 2, now) == [job1]
        old = conn.execute(select(Job.__table__).where(Job.id == job1)).one()
        assert old.state == JobState.cancelled and "superseded by version 2" in old.last_error
        # The same four instances again (a re-send): covered by job 2 while it is queued, running or succeeded.
        assert job_covering(conn, 1, "m", 1.0, version_instances(conn, 1).digest).id == job2
        assert job_covering(conn, 1, "m", 0.5, v2.digest) is None  # another strength is a genuine new version
        assert job_covering(conn, 1, "other", 1.0, v2.digest) is None
        claim = claim_job(conn, "w", now)
        assert claim.id == job2 and claim.last_instance_pk == v2.last_instance_pk
        fail_job(conn, job2, "boom", now, None, "w")
        assert job_covering(conn, 1, "m", 1.0, v2.digest) is None  # after a failure a re-send tries again


def test_fail_job_with_a_worker_id_leaves_a_job_taken_over_meanwhile_alone(engine) -> None:
    now = utcnow()
    with engine.begin() as conn:
        key = enqueue_job(conn, 1, 1, "r", "m", 1.0, now)
        claim_job(conn, "w1", now)
        assert not fail_job(conn, key, "late failure of a dead worker", now, None, "w2")
        assert conn.execute(select(Job.state).where(Job.id == key)).scalar_one() == JobState.running
        assert fail_job(conn, key, "real failure", now, None, "w1")


def test_the_worker_waits_as_the_configured_job_retry_policy_says(engine, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import dicom_node.denoise.worker as worker_module
    from dicom_node.config import config_from_mapping

    cfg = config_from_mapping({"node": {"data_dir": str(tmp_path)},
                               "worker": {"max_attempts": 2, "backoff_base_seconds": 1000.0,
                                          "backoff_max_seconds": 1500.0}}, environ={})

    def transient_failure(*args, **kwargs):
        raise OSError("disk busy")

    monkeypatch.setattr(worker_module, "run_job", transient_failure)
    worker = worker_module.Worker(cfg, engine, threading.Event(), worker_id="w1")
    with engine.begin() as conn:
        key = enqueue_job(conn, 1, 1, "r", "m", 1.0, utcnow())
    before = utcnow()
    assert worker.run_once()
    with engine.begin() as conn:
        row = conn.execute(select(Job.__table__).where(Job.id == key)).one()
    # First failure: uniform in [base/2, base] seconds (the old hard-coded policy waited at most 10 s).
    assert row.state == JobState.queued and "disk busy" in row.last_error
    assert 500.0 <= (row.not_before - before).total_seconds() <= 1000.0 + 60.0
    with engine.begin() as conn:  # the back-off has passed: attempt 2 of 2 fails for good
        conn.execute(update(Job).where(Job.id == key).values(not_before=utcnow()))
    assert worker.run_once()
    with engine.begin() as conn:
        assert conn.execute(select(Job.state).where(Job.id == key)).scalar_one() == JobState.failed


def test_a_new_export_of_a_grown_series_does_not_send_what_the_destination_already_accepted(engine) -> None:
    now = utcnow()
    with engine.begin() as conn:
        first = enqueue_export(conn, "1.2.3", "pacs", [("1.1", "a.dcm"), ("1.2", "b.dcm")], now)
        accepted, refused = pending_export_instances(conn, first)
        record_instance_status(conn, accepted[0], 0x0000, "", now)
        record_instance_status(conn, refused[0], 0xA700, "out of resources", now)
        other = enqueue_export(conn, "1.2.3", "other", [("1.1", "a.dcm")], now)  # another destination: sent
        grown = enqueue_export(conn, "1.2.3", "pacs", [("1.1", "a2.dcm"), ("1.2", "b2.dcm"), ("1.3", "c2.dcm")],
                               now)
        assert [uid for _, uid, _ in pending_export_instances(conn, grown)] == ["1.2", "1.3"]
        assert [uid for _, uid, _ in pending_export_instances(conn, other)] == ["1.1"]
