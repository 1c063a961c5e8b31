"""Scale-out benchmark: series per minute with 1, 2 and 3 CPU worker processes on PostgreSQL, and one process on
SQLite, in one run; prints the scaling ratios.

Every configuration gets the same work: ``--series`` synthetic CT series (``--slices`` slices of ``--size`` pixels
squared) denoised by the same small random-weight CNN (a stand-in for a real model; no weights are downloaded) and
exported to the local output folder. The series are first received by a receive-only process, so every job is
queued before any worker starts; the jobs are held back (``not_before`` in the future) until every worker has
started and run one warm-up job (torch import and model load), then released at once. The time is from the release
to the last export finished, read from the job table; the CPU the worker processes used meanwhile is printed
beside it (cores busy on average), with the time their threads were runnable but waiting for a CPU: together they
show when the machine, not the node, is the limit. Each worker process runs torch with one thread
(``OMP_NUM_THREADS=1``), so N workers use N cores: on a machine with fewer free cores than workers the ratio
says so. PostgreSQL is a private server started for the run (``fsync=off``).

    .venv/bin/python bench/scaleout.py [--series 24] [--slices 16] [--size 256] [--workers 1,2,3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select, text, update  # noqa: E402

from dicom_node.store.database import make_engine, utcnow  # noqa: E402
from dicom_node.store.schema import Export, Job  # noqa: E402
from tests.fixtures.images import make_tiny_model  # noqa: E402
from tests.fixtures.synthetic import make_ct_series  # noqa: E402
from tests.peers import free_port, node_command, require, stop_process, storescu, wait_for_port  # noqa: E402
from tests.postgres import postgres_server  # noqa: E402

FAR = dt.datetime(2100, 1, 1)
MODEL_ARGUMENTS = {"channels": [32, 64], "blocks": 2}


def write_config(path: Path, model_dir: Path) -> Path:
    path.write_text(
        "[node]\nquiet_seconds = 0.5\nmin_free_disk_gb = 0.1\n"
        f"[models]\ndirectories = [{json.dumps(str(model_dir))}]\ndevice = \"cpu\"\n"
        "[worker]\nheartbeat_seconds = 2.0\nstall_timeout_seconds = 60.0\npoll_seconds = 0.1\n"
        "[export]\npoll_seconds = 0.1\n[web]\nport = 0\n"
        '[[rules]]\nname = "ct"\nmatch = { Modality = "CT" }\nmodel = "bench-cnn"\nquiet_seconds = 0.5\n')
    return path


class Run:
    """The processes of one configuration."""

    def __init__(self, base: Path, config: Path, database_url: str) -> None:
        self.base, self.config = base, config
        self.data = base / "data"
        self.port = free_port()
        self.env = {**os.environ, "DICOM_NODE_NODE__DATA_DIR": str(self.data), "DICOM_NODE_NODE__PORT": str(self.port),
                    "DICOM_NODE_NODE__DATABASE_URL": database_url, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.procs: list[subprocess.Popen] = []
        self.engine = make_engine(database_url or f"sqlite:///{self.data / 'dicom-node.sqlite3'}")

    def start(self, role: str, name: str) -> subprocess.Popen:
        log = open(self.base / f"{name}.log", "ab")
        proc = subprocess.Popen([*node_command(), "serve", "--role", role, "--config", str(self.config)],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        deadline = time.monotonic() + 120
        while "started (roles" not in (self.base / f"{name}.log").read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start:\n{(self.base / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.1)
        return proc

    def stop(self, proc: subprocess.Popen | None = None) -> None:
        for p in ([proc] if proc else list(self.procs)):
            stop_process(p)
            self.procs.remove(p)

    def count(self, model: Any, state: str) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(model).where(model.state == state)).scalar_one()

    def wait(self, what: str, condition: Callable[[], object], timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what} (logs in {self.base})")
            for p in self.procs:
                if p.poll() is not None:
                    raise SystemExit(f"a node process exited with {p.returncode} (logs in {self.base})")
            time.sleep(0.1)


def cpu_seconds(procs: list[subprocess.Popen]) -> float:
    """User + system CPU seconds used so far by ``procs`` (from /proc; 0 where unavailable)."""
    total = 0.0
    for proc in procs:
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def runqueue_wait_seconds(procs: list[subprocess.Popen]) -> float:
    """Seconds the threads of ``procs`` were runnable but waited for a CPU (/proc/PID/task/*/schedstat)."""
    total = 0.0
    for proc in procs:
        for stat in Path(f"/proc/{proc.pid}/task").glob("*/schedstat"):
            try:
                total += int(stat.read_text().split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                pass
    return total


def measure(label: str, base: Path, config: Path, database_url: str, workers: int, warmup: list[list[Path]],
            series: list[list[Path]]) -> float:
    """Run one configuration; return series per minute."""
    base.mkdir(parents=True)
    run = Run(base, config, database_url)
    try:
        receiver = run.start("receive", "receiver")
        wait_for_port(run.port, process=receiver)
        total = len(warmup) + len(series)
        for group in (warmup, series):
            result = storescu(run.port, "DENOISE", [f for s in group for f in s])
            if result.returncode != 0:
                raise SystemExit(f"storescu failed: {result.stderr[-2000:]}")
        run.wait("all jobs queued", lambda: run.count(Job, "queued") == total)
        with run.engine.begin() as conn:
            conn.execute(update(Job).values(not_before=FAR))
            ids = list(conn.execute(select(Job.id).order_by(Job.id)).scalars())
        warm_ids, measured_ids = ids[:len(warmup)], ids[len(warmup):]
        if database_url:
            run.start("export", "exporter")
            worker_procs = [run.start("worker", f"worker{i}") for i in range(workers)]
        else:
            run.stop(receiver)
            worker_procs = [run.start("all", "node")]  # one process: receive, worker, export
        with run.engine.begin() as conn:
            conn.execute(update(Job).where(Job.id.in_(warm_ids)).values(not_before=utcnow()))
        run.wait("warm-up jobs", lambda: run.count(Job, "succeeded") == len(warm_ids))
        with run.engine.begin() as conn:
            released = utcnow()
            conn.execute(update(Job).where(Job.id.in_(measured_ids)).values(not_before=released))
        cpu_start, wait_start = cpu_seconds(worker_procs), runqueue_wait_seconds(worker_procs)
        run.wait("every export", lambda: run.count(Export, "succeeded") == total)
        cpu_used = cpu_seconds(worker_procs) - cpu_start
        waited = runqueue_wait_seconds(worker_procs) - wait_start
        with run.engine.connect() as conn:
            last = conn.execute(select(func.max(Export.finished_at))).scalar_one()
            per_worker = conn.execute(select(Job.worker_id, func.count()).where(Job.id.in_(measured_ids))
                                      .group_by(Job.worker_id)).all()
            failed = conn.execute(text("SELECT count(*) FROM jobs WHERE attempts > 1")).scalar()
        if last is None:
            raise SystemExit("no export finished")
        seconds = (last - released).total_seconds()
        rate = len(series) / seconds * 60
        spread = ", ".join(str(n) for _w, n in sorted(per_worker, key=lambda r: -r[1]))
        print(f"{label:34} {seconds:7.1f} s  {rate:6.1f} series/min  (jobs per worker: {spread}; retried {failed}; "
              f"worker CPU {cpu_used:.0f} s = {cpu_used / seconds:.2f} cores busy, {waited:.0f} s runnable but "
              f"waiting for a CPU)", flush=True)
        return rate
    finally:
        run.stop()
        run.engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=24)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", default="1,2,3")
    args = parser.parse_args()
    require("storescu")
    counts = [int(n) for n in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="dicom-node-bench-") as tmp:
        root = Path(tmp)
        models = root / "models"
        make_tiny_model(models, name="bench-cnn", identity=False, seed=1, arguments=MODEL_ARGUMENTS)
        config = write_config(root / "node.toml", models)
        warm_n = max(counts)
        made = [make_ct_series(root / "series" / f"{i:03d}", n_slices=args.slices, rows=args.size, cols=args.size,
                               seed=i) for i in range(args.series + warm_n)]
        print(f"{args.series} series of {args.slices} x {args.size}x{args.size} CT, CNN {MODEL_ARGUMENTS}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
        rates: dict[str, float] = {}
        with postgres_server() as pg:
            for n in counts:
                url = pg.create_database(f"bench_{n}")
                rates[f"pg{n}"] = measure(f"PostgreSQL, {n} worker process(es)", root / f"pg{n}", config, url, n,
                                          made[:n], made[warm_n:])
        rates["sqlite"] = measure("SQLite, one process (all roles)", root / "sqlite", config, "", 1,
                                  made[:1], made[warm_n:])
        print(f"load average {os.getloadavg()[0]:.1f} at end")
        first = rates[f"pg{counts[0]}"]
        for n in counts[1:]:
            print(f"scaling PostgreSQL {n} vs {counts[0]} worker(s): {rates[f'pg{n}'] / first:.2f}x")
        print(f"PostgreSQL {counts[0]} worker vs SQLite one process: {first / rates['sqlite']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
