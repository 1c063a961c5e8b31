"""Prometheus metrics of one node process, served at ``/metrics``.

Two kinds of values:

* counted by this process as it works (instances received, bytes, associations, export failures, stage
  durations as histograms), kept in :data:`REGISTRY`;
* read from the job table at scrape time (series completed, jobs and exports per state, age of the oldest queued
  job). Only a process with the ``web`` role reports these, so that a Prometheus summing over every process of a
  scaled-out site does not count them several times.

No metric carries patient data or UIDs as labels. The C-STORE handler never imports this module; the service
reads the :class:`~dicom_node.receive.receiver.Receiver` counters at scrape time.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_node.store.database import utcnow
from dicom_node.store.overview import destination_troubles, queue_summary

LOGGER = logging.getLogger(__name__)

#: The registry every metric of this package lives in (not the client's global one, so tests stay isolated).
REGISTRY = CollectorRegistry(auto_describe=True)

ASSOCIATIONS = Counter("dicom_node_associations", "DICOM associations handled by the SCP, by outcome",
                       ["outcome"], registry=REGISTRY)
EXPORT_FAILURES = Counter("dicom_node_export_failures", "Export attempts that did not deliver the whole series",
                          ["destination"], registry=REGISTRY)
EXPORTS_DELIVERED = Counter("dicom_node_exports_delivered", "Series delivered completely to a destination",
                            ["destination"], registry=REGISTRY)
CONNECTIONS_CLOSED = Counter("dicom_node_connections_closed",
                             "TCP connections to the DICOM port closed before they associated, by reason "
                             "(host_not_allowed, too_many_pending, request_timeout, closed_by_peer, tls_failed)",
                             ["reason"], registry=REGISTRY)
JOBS_FINISHED = Counter("dicom_node_jobs_finished", "Denoising jobs finished by this process, by outcome",
                        ["outcome"], registry=REGISTRY)
TRUST_VERDICTS = Counter("dicom_node_trust_verdicts", "Trust checks of derived series, by verdict",
                         ["verdict"], registry=REGISTRY)
TRUST_SCORE = Histogram("dicom_node_trust_score", "Trust check score of each derived series (1: only noise removed)",
                        registry=REGISTRY, buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0))
STAGE_SECONDS = Histogram(
    "dicom_node_stage_duration_seconds",
    "Seconds per series and stage: receive (first to last instance), denoise (job run), "
    "export (one attempt to one destination)",
    ["stage"], registry=REGISTRY,
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
)


def observe_stage(stage: str, seconds: float) -> None:
    """Record how long ``stage`` took for one series (negative durations from clock steps are dropped)."""
    if seconds >= 0:
        STAGE_SECONDS.labels(stage).observe(seconds)


def count_association(outcome: str) -> None:
    """Count an association event (``accepted``, ``rejected``, ``aborted``, ``released``)."""
    ASSOCIATIONS.labels(outcome).inc()


def count_closed_connection(reason: str) -> None:
    """Count a connection the SCP closed before it associated (see ``dimse.reactor.ConnectionGate``)."""
    CONNECTIONS_CLOSED.labels(reason).inc()


def record_export(destination: str, state: str, seconds: float) -> None:
    """Record the end of one export attempt."""
    observe_stage("export", seconds)
    if state == "succeeded":
        EXPORTS_DELIVERED.labels(destination).inc()
    else:
        EXPORT_FAILURES.labels(destination).inc()


def gpu_samples() -> list[tuple[int, float | None, int, int]]:
    """``(index, utilisation 0-1 or None, memory used, memory total)`` per GPU, when torch is loaded and sees one.

    Torch is never imported here: a receive-only process has no GPU to report.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        out = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            try:
                util: float | None = torch.cuda.utilization(index) / 100.0
            except Exception:  # needs pynvml; the memory is still worth reporting
                util = None
            out.append((index, util, int(total - free), int(total)))
        return out
    except Exception:
        LOGGER.debug("cannot read GPU state", exc_info=True)
        return []


class NodeCollector(Collector):
    """Values read at scrape time from the running node (receiver counters, disk, models, job table)."""

    def __init__(self, node: Any, database_metrics: bool) -> None:
        self.node = node
        self.database_metrics = database_metrics

    def collect(self) -> Iterator[Metric]:
        receiver = getattr(self.node, "receiver", None)
        if receiver is not None:
            with receiver.lock:
                received, refused, size = receiver.received, receiver.refused, receiver.bytes_received
            yield CounterMetricFamily("dicom_node_instances_received", "Instances stored and acknowledged",
                                      value=received)
            yield CounterMetricFamily("dicom_node_instances_refused", "C-STORE requests answered with a failure",
                                      value=refused)
            yield CounterMetricFamily("dicom_node_received_bytes", "Bytes of datasets stored", value=size)
        cfg = self.node.cfg
        try:
            disk = shutil.disk_usage(cfg.data_path)
            yield GaugeMetricFamily("dicom_node_disk_free_bytes", "Free space in the data directory", value=disk.free)
        except OSError:
            pass
        models = getattr(self.node, "models", None)
        if models is not None:
            yield GaugeMetricFamily("dicom_node_models_loaded", "Models loaded in this process",
                                    value=len(models.loaded_names()))
        gpus = gpu_samples()
        if gpus:
            util = GaugeMetricFamily("dicom_node_gpu_utilization_ratio", "GPU utilisation (0-1)", labels=["gpu"])
            mem = GaugeMetricFamily("dicom_node_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
            total = GaugeMetricFamily("dicom_node_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
            for index, u, used, size_total in gpus:
                if u is not None:
                    util.add_metric([str(index)], u)
                mem.add_metric([str(index)], used)
                total.add_metric([str(index)], size_total)
            yield from (util, mem, total)
        if self.database_metrics and getattr(self.node, "engine", None) is not None:
            yield from self._database()

    def _database(self) -> Iterator[Metric]:
        try:
            with self.node.engine.connect() as conn:
                summary = queue_summary(conn, utcnow())
                troubles = destination_troubles(conn)
        except Exception:
            LOGGER.warning("cannot read the job table for metrics", exc_info=True)
            return
        yield CounterMetricFamily("dicom_node_series_completed", "Series completions (each version counts)",
                                  value=summary["series_completed"])
        for name, helptext in (("jobs", "Denoising jobs by state"), ("exports", "Exports by state")):
            family = GaugeMetricFamily(f"dicom_node_{name}", helptext, labels=["state"])
            for state, count in summary[name].items():
                family.add_metric([state], count)
            yield family
            age = GaugeMetricFamily(f"dicom_node_oldest_queued_{name[:-1]}_age_seconds",
                                    f"Age of the oldest queued {name[:-1]} (0 when none)",
                                    value=summary[f"oldest_queued_{name[:-1]}_seconds"])
            yield age
        # Per destination: exports queued again after a failed attempt (a PACS that is down shows here at once,
        # long before its exports give up and become failed).
        retrying = GaugeMetricFamily("dicom_node_exports_retrying", "Exports retrying after a failed attempt",
                                     labels=["destination"])
        by_name = {t.destination: t.retrying for t in troubles}
        for dest in self.node.cfg.destinations:
            retrying.add_metric([dest.name], by_name.pop(dest.name, 0))
        for name, count in by_name.items():  # a destination removed from the configuration meanwhile
            retrying.add_metric([name], count)
        yield retrying


def exposition(node: Any, database_metrics: bool) -> bytes:
    """The Prometheus text exposition of this process's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Forward(REGISTRY))
    registry.register(NodeCollector(node, database_metrics))
    return generate_latest(registry)


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        return iter(self.registry.collect())
