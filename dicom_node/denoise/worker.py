"""The denoising stage: claim a job, denoise its series into the outbox, queue its exports.

Models stay loaded between jobs (one engine per model name). A running job sends heartbeats; a job whose worker
died is taken up again after ``worker.stall_timeout_seconds``. The derived SeriesInstanceUID is derived from the
source series and job version, and SOP Instance UIDs from it and each source instance, so a job re-run after a
crash writes the same UIDs again (PACS sees one series, not two). The job's success and its exports are committed
in one transaction. A series the model refuses fails at once with the reason; other errors are retried.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import shutil
import socket
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from dicom_node.config import LOCAL_DESTINATION, Config
from dicom_node.denoise.derived import DerivedSeriesSettings, derived_series_uid
from dicom_node.denoise.errors import SeriesRefused
from dicom_node.denoise.pixels import stored_to_physical
from dicom_node.denoise.preview import preview_image, write_png
from dicom_node.denoise.series import HeaderCache
from dicom_node.denoise.trust_note import trust_note, write_trust_note
from dicom_node.ops import metrics
from dicom_node.store import audit
from dicom_node.store.database import utcnow
from dicom_node.store.doorbell import Doorbell
from dicom_node.store.queue import (
    ClaimedJob,
    RetryPolicy,
    claim_job,
    derived_series_uids,
    enqueue_export,
    fail_job,
    finish_job,
    heartbeat_job,
    job_last_error,
    receiving_series_routes,
    record_trust,
    requeue_stalled_jobs,
    series_by_pk,
    series_instance_paths,
    series_instances,
    series_with_open_jobs,
)

LOGGER = logging.getLogger(__name__)

#: The before/after/difference image of a job's middle slice, in ``outbox/job-<id>/``.
PREVIEW_NAME = "preview.png"
#: Frames of each series the trust check looks at (evenly spaced; dicom_node.denoise.trust).
TRUST_FRAMES = 16
#: The start of a held job's last_error (policy ``hold``); a `jobs retry` of such a job releases it.
HELD_PREFIX = "held by the trust check"
#: An idle worker reads ahead the headers of a series that will be denoised once no instance of it has arrived for
#: this long (its quiet time is running), so the job's scan finds them read (see ``HeaderCache``).
PREFETCH_AFTER_SECONDS = 0.5
#: Headers read ahead per pass; between passes the worker looks for a job again.
PREFETCH_BATCH = 64


def default_worker_id(role: str = "worker") -> str:
    """``host:pid:role``: unique per process, readable in ``dicom-node jobs list``."""
    return f"{socket.gethostname()}:{os.getpid()}:{role}"


def freeze_long_lived_objects() -> None:
    """Hide the objects that live as long as the process (torch, the networks) from Python's cyclic collector.

    With torch imported a full collection walks about 200,000 objects and holds the GIL for about 120 ms, and
    one runs every 30 s in pynetdicom's server loop and whenever allocations trigger one: each stalls the
    network between two layers. ``gc.freeze`` moves every object alive now into a permanent generation that
    collections skip (a collection first, so no garbage is kept for good).
    """
    gc.collect()
    gc.freeze()


class ModelCache:
    """Loaded models and their engines, by name, kept between jobs."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._engines: dict[str, Any] = {}
        self.lock = threading.Lock()

    def engine(self, name: str) -> Any:
        """The inference engine for model ``name`` (loaded and moved to the device on first use)."""
        with self.lock:
            if name not in self._engines:
                from dicom_node.denoise.engine import Engine  # noqa: PLC0415 - delays torch (denoise.engine)
                from models.folder import load_model, resolve_device  # noqa: PLC0415 - delays torch (models.folder)

                device = resolve_device(self.cfg.models.device)
                loaded = load_model(name, self.cfg.models.directories, device)
                self._engines[name] = Engine(loaded, device=device)
                LOGGER.info("model %s %s loaded on %s", loaded.card.name, loaded.card.version, device)
                freeze_long_lived_objects()
            return self._engines[name]

    def preload(self, names: Iterable[str]) -> None:
        """Load models now (at start-up), so the first series does not wait for torch and the weights.

        A model that cannot be loaded is logged and skipped: its jobs fail later with the reason, the others run.
        """
        for name in dict.fromkeys(n for n in names if n):
            try:
                self.engine(name)
            except Exception as exc:  # noqa: BLE001 - reported, and again per job
                LOGGER.error("model %s cannot be loaded: %s", name, exc)

    def loaded_names(self) -> list[str]:
        with self.lock:
            return sorted(self._engines)


class JobFailed(Exception):
    """A job failed for a reason that will not change on retry (the series or the model is at fault)."""


def run_job(cfg: Config, engine: Engine, models: ModelCache, job: ClaimedJob, worker_id: str,
            headers: HeaderCache | None = None) -> str:
    """Denoise one claimed job into ``outbox/job-<id>`` and queue its exports; return the derived series UID.

    Raises
    ------
    JobFailed
        When the series cannot be denoised with this model (the reason is the message).
    """
    from dicom_node.denoise.engine import denoise_series  # noqa: PLC0415 - delays torch (denoise.engine)
    from models.folder import ModelError  # noqa: PLC0415 - delays torch (models.folder)

    with engine.connect() as conn:
        series = series_by_pk(conn, job.series_pk)
        # Exactly the instances of this job's version: any that arrived later belong to the next version's job.
        paths = [cfg.data_path / p for p in series_instance_paths(conn, job.series_pk, job.last_instance_pk)]
    LOGGER.info("job %d: series %s version %d, %d instances", job.id, series.series_uid, job.version, len(paths))
    out_dir = cfg.outbox_path / f"job-{job.id}"
    if out_dir.exists():  # a crashed earlier attempt: start clean, the UIDs will be the same
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    stop_beat = threading.Event()

    def beat() -> None:
        while not stop_beat.wait(cfg.worker.heartbeat_seconds):
            try:
                with engine.begin() as conn:
                    if not heartbeat_job(conn, job.id, worker_id, utcnow()):
                        LOGGER.warning("job %d is no longer this worker's (cancelled or taken over); its output "
                                       "will be discarded", job.id)
            except Exception:
                LOGGER.exception("job %d: heartbeat failed", job.id)

    beater = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
    beater.start()
    try:
        try:
            model_engine = models.engine(job.model)
            card = model_engine.card
            derived_uid = derived_series_uid(series.series_uid, card.name, card.version, card.sha256,
                                             job.strength, cfg.derived.uid_root)
            settings = DerivedSeriesSettings.from_config(cfg.derived)
            settings.trust_note = cfg.worker.trust_policy != "off"
            with engine.connect() as conn:
                settings.description_suffix += derived_series_label(conn, job.series_pk, derived_uid)
            result = denoise_series(paths, model_engine, out_dir, strength=job.strength, settings=settings,
                                    series_instance_uid=derived_uid, keep_preview=True, durable=True,
                                    headers=headers, keep_samples=TRUST_FRAMES)
        except (SeriesRefused, ModelError) as exc:
            raise JobFailed(str(exc)) from exc
    finally:
        stop_beat.set()
        beater.join()
    write_preview(out_dir, result)
    # "off": no check at all (it costs 0.1-1.5 s of CPU per series, which matters beside a GPU's 3 s).
    trust = trust_check(result) if cfg.worker.trust_policy != "off" else None
    if settings.trust_note:  # the verdict into the files' DerivationDescription, before anything is exported
        write_trust_note(result.paths, trust_note(trust.verdict if trust is not None else None,
                                                  trust.score if trust is not None else None))
    # Derived files are named <SOPInstanceUID>.dcm (denoise_series), so the UIDs need no second read.
    instances = [(path.stem, path.relative_to(cfg.data_path).as_posix()) for path in result.paths]
    export_uid = result.series_instance_uid
    destinations = _rule_destinations(cfg, job.rule)
    policy = cfg.worker.trust_policy
    with engine.connect() as conn:
        earlier_error = job_last_error(conn, job.id)
    # An administrator's `jobs retry` of a held job releases it: it is sent as the "send" policy would.
    released = policy != "send" and earlier_error.startswith(HELD_PREFIX)
    held = None
    if trust is not None and trust.verdict == "fail":
        if policy == "send" or released:
            LOGGER.warning("job %d: the derived series failed the trust check (%s); sent anyway%s", job.id,
                           trust.describe(), " (released by an administrator)" if released else "")
        elif policy == "hold":
            held = f"{HELD_PREFIX}: {trust.describe()}"
            LOGGER.warning("job %d: %s; nothing exported (`dicom-node jobs retry %d` releases it)", job.id, held,
                           job.id)
            destinations = []
        else:  # send-source: the reader gets the original series, unchanged
            LOGGER.warning("job %d: the derived series failed the trust check (%s); the original series is sent "
                           "instead", job.id, trust.describe())
            with engine.connect() as conn:
                instances = series_instances(conn, job.series_pk, job.last_instance_pk)
            export_uid = series.series_uid
    elif trust is not None:
        LOGGER.info("job %d: trust check %s", job.id, trust.describe())
    with engine.begin() as conn:
        # A held job fails for good, so that it shows among the failed jobs and `jobs retry` can release it.
        done = (finish_job(conn, job.id, worker_id, result.series_instance_uid, utcnow()) if held is None
                else fail_job(conn, job.id, held, utcnow(), None, worker_id))
        if not done:
            LOGGER.warning("job %d was cancelled or taken over while running; its output is discarded", job.id)
            return result.series_instance_uid
        if trust is not None or held is not None:
            record_trust(conn, job.id, result.series_instance_uid, trust.score if trust is not None else None,
                         trust.verdict if trust is not None else "", trust.to_json() if trust is not None else "")
        if held is not None:
            audit.record(conn, "trust.held", worker_id, utcnow(), object_kind="job", object_id=job.id,
                         series_uid=series.series_uid, detail=held[:1000])
        for destination in destinations:
            # The original series' exports too belong to the job (its page and the dashboard show them there).
            enqueue_export(conn, export_uid, destination, instances, utcnow(), job_pk=job.id)
        if trust is not None and trust.verdict == "fail" and held is None:
            action = ("released by an administrator" if released else
                      "original series sent instead" if export_uid != result.series_instance_uid else "sent anyway")
            audit.record(conn, "trust.failed", worker_id, utcnow(), object_kind="job", object_id=job.id,
                         series_uid=series.series_uid, detail=f"{action}: {trust.describe()}"[:1000])
        audit.record(conn, "series.processed", worker_id, utcnow(), object_kind="job", object_id=job.id,
                     series_uid=series.series_uid,
                     detail=f"model {job.model}, strength {job.strength:g}, {result.frames} frames in "
                            f"{result.seconds:.1f} s, derived series {result.series_instance_uid}"
                            + (f", trust {trust.summary()}" if trust is not None else ""))
    metrics.observe_stage("denoise", result.seconds)
    if held is not None:
        metrics.JOBS_FINISHED.labels("held").inc()
        return result.series_instance_uid
    metrics.JOBS_FINISHED.labels("succeeded").inc()
    LOGGER.info("job %d: series %s denoised with %s in %.1f s (%d frames) -> %s, exports to %s", job.id,
                series.series_uid, job.model, result.seconds, result.frames, result.series_instance_uid,
                ", ".join(destinations))
    LOGGER.info("job %d stages: %s", job.id, result.describe_stages())
    return result.series_instance_uid


def trust_check(result: Any) -> Any:
    """Run the trust check on the frames ``denoise_series`` kept; log and count it; ``None`` when it cannot run.

    The check never fails a job: an error in it is logged and the series goes on as if unchecked.
    """
    samples = getattr(result, "samples", None)
    if not samples:
        return None
    from dicom_node.denoise.trust import check_frames  # noqa: PLC0415 - delays scipy (trust)

    try:
        shapes = {before.shape for before, _after, _fmt in samples}
        if len(shapes) != 1:  # frames of mixed sizes: check those of the first size
            samples = [s for s in samples if s[0].shape == samples[0][0].shape]
        valid = []
        for before, _after, fmt in samples:
            mask = fmt.padding_mask(before)
            valid.append(None if mask is None else ~mask)
        trust = check_frames([stored_to_physical(b, f) for b, _a, f in samples],
                             [stored_to_physical(a, f) for _b, a, f in samples],
                             hu=samples[0][2].rescale_type == "HU", pixel_spacing_mm=result.pixel_spacing_mm,
                             valid=valid)
    except Exception:  # noqa: BLE001 - a check that cannot run is no reason to lose the series
        LOGGER.exception("the trust check could not run")
        return None
    metrics.TRUST_VERDICTS.labels(trust.verdict).inc()
    metrics.TRUST_SCORE.observe(trust.score)
    return trust


def derived_series_label(conn: Any, series_pk: int, derived_uid: str) -> str:
    """What tells this derived series apart from the source's earlier derived series: "" for the first, else its
    ordinal ("2", "3"...), appended to ``derived.description_suffix`` (``CHEST DN``, then ``CHEST DN2``).

    A series that grew or was re-sent keeps its derived series (same UID, same label); only another model, model
    version or strength makes a new derived series, and the reader sees it as a separate, numbered one.
    """
    distinct = derived_series_uids(conn, series_pk)
    ordinal = distinct.index(derived_uid) + 1 if derived_uid in distinct else len(distinct) + 1
    return "" if ordinal == 1 else str(ordinal)


def write_preview(out_dir: Path, result: Any) -> Path | None:
    """Write ``preview.png`` (middle slice: before | after | difference) beside the derived files."""
    if getattr(result, "preview", None) is None:
        return None
    try:
        before, after, fmt = result.preview
        return write_png(out_dir / PREVIEW_NAME, preview_image(before, after, fmt))
    except Exception:  # a preview is a convenience; it never fails a job
        LOGGER.exception("cannot write the preview of %s", out_dir.name)
        return None


def _rule_destinations(cfg: Config, rule_name: str) -> list[str]:
    for rule in cfg.rules:
        if rule.name == rule_name:
            return list(rule.destinations) or [LOCAL_DESTINATION]
    # The rule was removed from the configuration since the job was queued: keep the result locally.
    return [LOCAL_DESTINATION]


class Worker(threading.Thread):
    """Claims and runs jobs until ``stop`` is set."""

    def __init__(self, cfg: Config, engine: Engine, stop: threading.Event, worker_id: str | None = None,
                 models: ModelCache | None = None, jobs_bell: Doorbell | None = None,
                 exports_bell: Doorbell | None = None) -> None:
        super().__init__(name="worker", daemon=True)
        self.jobs_bell = jobs_bell or Doorbell()  # rung by the assembler when it queues a job
        self.exports_bell = exports_bell  # rung here when a finished job has queued its exports
        self.cfg = cfg
        self.engine = engine
        self.stop_event = stop
        self.worker_id = worker_id or default_worker_id()
        self.models = models or ModelCache(cfg)
        self.policy = RetryPolicy(cfg.worker.max_attempts, cfg.worker.backoff_base_seconds,
                                  cfg.worker.backoff_max_seconds)
        self.headers = HeaderCache()

    def prefetch_headers(self) -> int:
        """Read ahead the headers of quiet series that a rule will send to a model; return how many were read.

        The rule is the one the assembler recorded for the receiving series (the worker does not route). Headers
        of series that are neither receiving nor waiting for a job are forgotten.
        """
        now = utcnow()
        to_read: list[Path] = []
        keep: list[Path] = []
        rules = {rule.name: rule for rule in self.cfg.rules}
        with self.engine.connect() as conn:
            for series_pk, rule_name, last_received_at in receiving_series_routes(conn):
                rule = rules.get(rule_name)
                if rule is None or not rule.model:
                    continue
                paths = [self.cfg.data_path / p for p in series_instance_paths(conn, series_pk)]
                keep.extend(paths)
                if last_received_at <= now - dt.timedelta(seconds=PREFETCH_AFTER_SECONDS):
                    to_read.extend(paths)
            for series_pk in series_with_open_jobs(conn):
                keep.extend(self.cfg.data_path / p for p in series_instance_paths(conn, series_pk))
        self.headers.forget(keep)
        return self.headers.prefetch(to_read, limit=PREFETCH_BATCH) if to_read else 0

    def run_once(self) -> bool:
        """Requeue stalled jobs, then run at most one job; return whether one ran."""
        with self.engine.begin() as conn:
            stalled = requeue_stalled_jobs(conn, utcnow(), self.cfg.worker.stall_timeout_seconds)
        if stalled:
            LOGGER.warning("jobs %s had no heartbeat for %.0f s; queued again", stalled,
                           self.cfg.worker.stall_timeout_seconds)
        with self.engine.begin() as conn:
            job = claim_job(conn, self.worker_id, utcnow())
        if job is None:
            return False
        LOGGER.info("job %d claimed (model %s, strength %g, attempt %d)", job.id, job.model, job.strength,
                    job.attempts)
        try:
            run_job(self.cfg, self.engine, self.models, job, self.worker_id, self.headers)
        except JobFailed as exc:
            LOGGER.error("job %d failed: %s", job.id, exc)
            with self.engine.begin() as conn:
                fail_job(conn, job.id, str(exc), utcnow(), None, self.worker_id)
                audit.record(conn, "job.failed", self.worker_id, utcnow(), object_kind="job", object_id=job.id,
                             detail=str(exc)[:1000])
            metrics.JOBS_FINISHED.labels("failed").inc()
        except Exception as exc:
            retry = not self.policy.gives_up(job.attempts)
            when = utcnow() + dt.timedelta(seconds=self.policy.delay(job.attempts)) if retry else None
            LOGGER.exception("job %d: attempt %d failed%s", job.id, job.attempts,
                             "; will retry" if retry else "; giving up")
            with self.engine.begin() as conn:
                fail_job(conn, job.id, f"{type(exc).__name__}: {exc}", utcnow(), when, self.worker_id)
                if not retry:
                    audit.record(conn, "job.failed", self.worker_id, utcnow(), object_kind="job", object_id=job.id,
                                 detail=f"{type(exc).__name__}: {exc}"[:1000])
            metrics.JOBS_FINISHED.labels("retried" if retry else "failed").inc()
        return True

    def run(self) -> None:
        # Loaded in this thread, which runs every job (its OpenMP team and allocator arena stay warm).
        self.models.preload(rule.model for rule in self.cfg.rules)
        while not self.stop_event.is_set():
            seen = self.jobs_bell.rings
            try:
                ran = self.run_once()
            except Exception:
                LOGGER.exception("worker loop error; retrying")
                ran = False
            if ran and self.exports_bell is not None:
                self.exports_bell.ring()
            if not ran:
                try:
                    if self.prefetch_headers():
                        continue  # more may be left: look for a job first, then read on
                except Exception:  # a convenience: the job's scan reads whatever was not read ahead
                    LOGGER.exception("reading headers ahead failed")
                self.jobs_bell.wait(seen, self.cfg.worker.poll_seconds)
