"""Scale-out on a real PostgreSQL: separate receive, worker and export processes sharing one data directory.

Three worker processes and one receiver; 30 small series sent by several storescu at once; one worker is killed
with SIGKILL while it runs a job. Every series must be denoised and delivered to Orthanc exactly once, and no job
may stay stuck. Also: ``dicom-node db migrate-to`` copies an SQLite job table into PostgreSQL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text

from dicom_node.store.schema import AuditEvent, Export, Instance, Job, Series
from tests.fixtures.images import make_tiny_model
from tests.fixtures.synthetic import make_ct_series
from tests.helpers import require_program
from tests.integration.test_pipeline import CT_RULE, pacs, wait_until, write_config
from tests.peers import DCMTK_ENV, free_port, node_command, orthanc, orthanc_get, stop_process, wait_for_port
from tests.postgres import PostgresServer, postgres_bin, postgres_server


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    if postgres_bin() is None:
        pytest.fail("PostgreSQL is not installed; install the Debian package postgresql (see .ci/run)")
    require_program("Orthanc")
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    make_tiny_model(folder, name="tiny-ct", identity=False, seed=3)
    return folder


class Processes:
    """Node processes of one test, each with its own log; all stopped at the end."""

    def __init__(self, base: Path, env: dict[str, str], config: Path) -> None:
        self.base, self.env, self.config = base, env, config
        self.procs: list[subprocess.Popen] = []

    def start(self, role: str, name: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.base / f"{name}.log", "ab")
        proc = subprocess.Popen([*node_command(), "serve", "--role", role, "--config", str(self.config)],
                                env={**self.env, **(extra_env or {})}, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def wait_started(self, name: str, proc: subprocess.Popen, timeout: float = 90) -> None:
        log = self.base / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if "started (roles" in log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise AssertionError(f"{name} did not start:\n{log.read_text()[-3000:]}")

    def stop_all(self) -> None:
        for proc in self.procs:
            stop_process(proc)


@contextlib.contextmanager
def processes(base: Path, env: dict[str, str], config: Path) -> Iterator[Processes]:
    group = Processes(base, env, config)
    try:
        yield group
    finally:
        group.stop_all()


def test_three_workers_one_receiver_on_postgresql(tmp_path: Path, pg: PostgresServer, model_dir: Path) -> None:
    url = pg.create_database("scaleout")
    series_files = [make_ct_series(tmp_path / f"s{i:02d}", n_slices=6, rows=64, cols=64, seed=i,
                                   series_description=f"SERIES {i}") for i in range(30)]
    data_dir = tmp_path / "shared-data"
    port = free_port()
    with orthanc(tmp_path / "orthanc") as pacs_peer:
        config = write_config(tmp_path / "node.toml", model_dir, [pacs(pacs_peer)],
                              [{**CT_RULE, "forward_original": False}])
        text_cfg = config.read_text().replace("heartbeat_seconds = 1.0", "heartbeat_seconds = 0.5") \
            .replace("stall_timeout_seconds = 5.0", "stall_timeout_seconds = 3.0", 1)
        config.write_text(text_cfg)
        env = {**os.environ, "DICOM_NODE_NODE__PORT": str(port), "DICOM_NODE_NODE__DATA_DIR": str(data_dir),
               "DICOM_NODE_NODE__DATABASE_URL": url, "DICOM_NODE_NODE__MIN_FREE_DISK_GB": "0.1",
               "DICOM_NODE_WEB__PORT": "0", "OMP_NUM_THREADS": "1"}
        engine = create_engine(url)
        with processes(tmp_path, env, config) as group:
            receiver = group.start("receive", "receiver")
            exporter = group.start("export", "exporter")
            workers = [group.start("worker", f"worker{i}") for i in range(3)]
            wait_for_port(port, timeout=90, process=receiver)
            group.wait_started("exporter", exporter)
            for i, proc in enumerate(workers):
                group.wait_started(f"worker{i}", proc)

            # Five scanners at once, six series each.
            senders = []
            for k in range(5):
                files = [f for series in series_files[k * 6:(k + 1) * 6] for f in series]
                senders.append(subprocess.Popen(
                    ["storescu", "-aet", f"SCANNER{k}", "-aec", "DENOISE", "127.0.0.1", str(port),
                     *map(str, files)], env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))

            # Kill whichever worker is caught running a job.
            pids = {proc.pid: proc for proc in workers}
            victim_job = None
            deadline = time.monotonic() + 120
            while victim_job is None and time.monotonic() < deadline:
                with engine.connect() as conn:
                    for job_id, worker_id in conn.execute(select(Job.id, Job.worker_id)
                                                          .where(Job.state == "running")):
                        pid = int(worker_id.split(":")[1])
                        if pid in pids:
                            pids[pid].send_signal(signal.SIGKILL)
                            pids[pid].wait()
                            victim_job = job_id
                            break
                time.sleep(0.02)
            assert victim_job is not None, "no worker was ever seen running a job"
            for sender in senders:
                out, _ = sender.communicate(timeout=300)
                assert sender.returncode == 0, out.decode(errors="replace")[-2000:]

            def all_done() -> bool:
                with engine.connect() as conn:
                    jobs = conn.execute(select(Job.state, func.count()).group_by(Job.state)).all()
                    exports = conn.execute(select(Export.state, func.count()).group_by(Export.state)).all()
                states = {s.value if hasattr(s, "value") else s: n for s, n in jobs}
                export_states = {s.value if hasattr(s, "value") else s: n for s, n in exports}
                return states == {"succeeded": 30} and export_states == {"succeeded": 30}

            wait_until(all_done, 240, "30 jobs and 30 exports succeeded")
            with engine.connect() as conn:
                assert conn.execute(select(func.count(Instance.id))).scalar() == 180
                assert conn.execute(select(func.count(Series.id))).scalar() == 30
                jobs = conn.execute(select(Job.__table__)).all()
                # Every series exactly one job (version 1): nothing processed twice as a new version.
                assert sorted(j.series_pk for j in jobs) == sorted(set(j.series_pk for j in jobs))
                assert all(j.version == 1 for j in jobs)
                victim = [j for j in jobs if j.id == victim_job][0]
                assert victim.attempts >= 2 and victim.state.value == "succeeded"
                by_worker = {j.worker_id.split(":")[1] for j in jobs}
                processed = conn.execute(select(func.count()).select_from(AuditEvent)
                                         .where(AuditEvent.action == "series.processed")).scalar()
                assert processed == 30
                unfinished = conn.execute(text("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')"))
                assert unfinished.scalar() == 0
            assert len(by_worker) >= 2, f"jobs were not spread over workers: {by_worker}"
            # Orthanc has each derived series once, complete.
            orthanc_series = orthanc_get(pacs_peer, "/series?expand")
            assert len(orthanc_series) == 30
            for s in orthanc_series:
                assert len(s["Instances"]) == 6
                assert s["MainDicomTags"]["SeriesDescription"].endswith(" DN")
            stats = orthanc_get(pacs_peer, "/statistics")
            assert stats["CountInstances"] == 180
        engine.dispose()


def test_migrate_sqlite_job_table_to_postgresql(tmp_path: Path, pg: PostgresServer, model_dir: Path) -> None:
    """A node runs on SQLite, its database is copied to PostgreSQL, and a node on PostgreSQL carries on."""
    from dicom_node.store.database import make_engine, migrate, utcnow
    from dicom_node.store.queue import enqueue_job
    from dicom_node.store.repository import InstanceFacts, record_instance

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    sqlite = make_engine(f"sqlite:///{data_dir / 'dicom-node.sqlite3'}")
    migrate(sqlite)
    with sqlite.begin() as conn:
        for i in range(5):
            facts = InstanceFacts(study_uid="1.2.3", series_uid=f"1.2.3.{i}", sop_instance_uid=f"1.2.3.{i}.1",
                                  sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                  transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT", patient_name="DOE^J")
            record_instance(conn, facts, f"spool/x/{i}.dcm", 100, utcnow())
        enqueue_job(conn, 1, 1, "ct", "tiny-ct", 1.0, utcnow())
    sqlite.dispose()
    url = pg.create_database("migrated")
    env = {**os.environ, "DICOM_NODE_NODE__DATA_DIR": str(data_dir)}
    result = subprocess.run([*node_command(), "db", "migrate-to", url], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "instances" in result.stdout and "5 row(s)" in result.stdout
    # A second copy into the same (now full) database is refused.
    again = subprocess.run([*node_command(), "db", "migrate-to", url], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 1 and "must be empty" in again.stderr
    engine = make_engine(url)
    with engine.begin() as conn:
        assert conn.execute(select(func.count(Instance.id))).scalar() == 5
        assert conn.execute(select(func.count(Job.id))).scalar() == 1
        # Sequences were moved past the copied keys: new rows get new keys.
        new_job = enqueue_job(conn, 2, 1, "ct", "tiny-ct", 1.0, utcnow())
        assert new_job == 2
    engine.dispose()
