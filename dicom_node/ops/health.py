"""Health checks behind ``/healthz`` (alive) and ``/readyz`` (ready for work), and the dashboard's health panel.

Checks: the database answers and its schema is current; free disk in the data directory is above the C-STORE
watermark; every model a rule names is found (a model folder with a card and weights); the stage threads of this
process are alive. The model check reads folders only and never imports torch, so a receive-only or web-only
process stays light.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import logging
import shutil
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.config import Config
from dicom_node.ops.metrics import gpu_samples
from dicom_node.store.database import schema_head, schema_version, utcnow
from dicom_node.store.overview import destination_troubles

LOGGER = logging.getLogger(__name__)


@dataclass
class Check:
    """One check's outcome.

    ``ok`` with ``degraded`` means the node works but something needs attention (a destination that keeps
    failing): ``/readyz`` still answers 200, with ``"status": "degraded"``, and the dashboard shows it.
    """

    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)
    degraded: bool = False

    @property
    def state(self) -> str:
        """``ok``, ``degraded`` or ``failed``."""
        return "failed" if not self.ok else "degraded" if self.degraded else "ok"


def overall_state(checks: list[Check]) -> str:
    """The node's state from its checks: ``failed`` if any failed, else ``degraded`` if any is, else ``ok``."""
    states = {c.state for c in checks}
    return "failed" if "failed" in states else "degraded" if "degraded" in states else "ok"


def model_folders(cfg: Config) -> list[Path]:
    """The folders searched for model folders: configured ones first, then the bundled models."""
    folders = [Path(d).expanduser() for d in cfg.models.directories]
    spec = importlib.util.find_spec("models")
    if spec is not None and spec.submodule_search_locations:
        folders.append(Path(list(spec.submodule_search_locations)[0]) / "bundled")
    return folders


def check_database(engine: Any) -> Check:
    """The database answers and is at the newest schema revision."""
    started = time.perf_counter()
    try:
        version = schema_version(engine)
    except Exception as exc:
        return Check("database", False, f"unreachable: {type(exc).__name__}: {str(exc)[:200]}")
    head = schema_head()
    ms = (time.perf_counter() - started) * 1000
    dialect = engine.dialect.name
    if version != head:
        return Check("database", False, f"{dialect} schema at {version}, expected {head}", {"ms": ms})
    return Check("database", True, f"{dialect}, schema {version}, answered in {ms:.0f} ms", {"ms": ms})


def check_disk(cfg: Config) -> Check:
    """Free space in the data directory against ``node.min_free_disk_gb``."""
    try:
        usage = shutil.disk_usage(cfg.data_path)
    except OSError as exc:
        return Check("disk", False, f"cannot read {cfg.data_path}: {exc.strerror or exc}")
    watermark = int(cfg.node.min_free_disk_gb * 1024**3)
    gib = 1024**3
    detail = f"{usage.free / gib:.1f} GiB free of {usage.total / gib:.1f} GiB (watermark {watermark / gib:.1f} GiB)"
    return Check("disk", usage.free >= watermark, detail,
                 {"free_bytes": usage.free, "total_bytes": usage.total, "watermark_bytes": watermark})


def check_models(cfg: Config, loaded: list[str] | None = None) -> Check:
    """Every model named by a rule has a folder with ``card.toml`` and weights."""
    wanted = sorted({rule.model for rule in cfg.rules if rule.model})
    folders = model_folders(cfg)
    missing = []
    for name in wanted:
        if not any((f / name / "card.toml").is_file() and any((f / name).glob("*.safetensors")) for f in folders):
            missing.append(name)
    loaded_text = f"; loaded here: {', '.join(loaded)}" if loaded else ""
    if missing:
        return Check("models", False, f"not found: {', '.join(missing)}{loaded_text}",
                     {"wanted": wanted, "missing": missing, "loaded": loaded or []})
    return Check("models", True, f"{len(wanted)} model(s) named by rules found{loaded_text}",
                 {"wanted": wanted, "loaded": loaded or []})


def check_gpu() -> Check:
    """GPUs torch sees in this process, with memory (only when torch is already loaded)."""
    gpus = gpu_samples()
    if not gpus:
        return Check("gpu", True, "none in use by this process (CPU)")
    parts = []
    for index, util, used, total in gpus:
        u = f", {util * 100:.0f} % busy" if util is not None else ""
        parts.append(f"cuda:{index} {used / 1024**3:.1f}/{total / 1024**3:.1f} GiB{u}")
    return Check("gpu", True, "; ".join(parts), {"gpus": gpus})


#: How long a TCP probe of a destination is reused before the destination is probed again.
PROBE_TTL_SECONDS = 30.0
_probes: dict[tuple[str, int], tuple[float, str]] = {}
_probes_lock = threading.Lock()


def probe_destination(host: str, port: int, timeout: float = 2.0) -> str:
    """Open (and close) a TCP connection to a destination; return "" when it connects, else the reason.

    Results are kept for :data:`PROBE_TTL_SECONDS`, so a dashboard refreshing every few seconds does not knock on
    the PACS each time. A connection only shows that something listens; exports show whether it accepts images.
    """
    key = (host, port)
    now = time.monotonic()
    with _probes_lock:
        cached = _probes.get(key)
        if cached is not None and now - cached[0] < PROBE_TTL_SECONDS:
            return cached[1]
    try:
        with socket.create_connection((host, port), timeout=timeout):
            reason = ""
    except OSError as exc:
        reason = f"cannot connect to {host}:{port} ({exc.strerror or exc})"
    with _probes_lock:
        _probes[key] = (now, reason)
    return reason


def _destination_address(dest: Any) -> tuple[str, int]:
    """Host and TCP port a destination listens on (a DICOMweb destination's from its URL)."""
    if getattr(dest, "type", "dimse") == "dicomweb":
        parts = urllib.parse.urlsplit(dest.url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return "", 0
        return parts.hostname or "", port
    return dest.host, dest.port


def check_destinations(cfg: Config, engine: Any, probe: bool = True) -> Check:
    """Destinations that refuse connections or whose exports keep failing make the node ``degraded``.

    Looks at the job table (exports retrying after a failed attempt, exports failed in the last 24 hours) and, for
    DIMSE destinations, whether a TCP connection opens. The node still receives and denoises meanwhile: nothing
    is lost, the exports wait, so this degrades the node rather than failing it.
    """
    try:
        with engine.connect() as conn:
            troubles = {t.destination: t for t in destination_troubles(conn, utcnow() - dt.timedelta(hours=24))}
    except Exception as exc:  # the database check reports the database itself
        return Check("destinations", True, f"unknown (database: {type(exc).__name__})")
    problems: list[str] = []
    data: dict[str, Any] = {}
    for dest in cfg.destinations:
        reasons = []
        host, port = _destination_address(dest)
        unreachable = probe_destination(host, port) if probe and host else ""
        if unreachable:
            reasons.append(unreachable)
        trouble = troubles.get(dest.name)
        if trouble is not None:
            if trouble.retrying:
                since = f" since {trouble.since:%Y-%m-%d %H:%M} UTC" if trouble.since else ""
                reasons.append(f"{trouble.retrying} export(s) retrying{since}")
            if trouble.failed:
                reasons.append(f"{trouble.failed} export(s) failed in the last 24 h")
            if trouble.last_error and not unreachable:
                reasons.append(f"last error: {trouble.last_error[:200]}")
        data[dest.name] = {"ok": not reasons, "problems": reasons}
        if reasons:
            where = dest.url if dest.type == "dicomweb" else f"{dest.ae_title}@{dest.host}:{dest.port}"
            problems.append(f"{dest.name} ({where}): {'; '.join(reasons)}")
    if problems:
        return Check("destinations", True, " | ".join(problems), data, degraded=True)
    if not cfg.destinations:
        return Check("destinations", True, "none configured: derived series go to the output folder", data)
    return Check("destinations", True, f"{len(cfg.destinations)} destination(s) reachable, no export failing", data)


def check_threads(threads: list[Any]) -> Check:
    """The stage threads of this process are alive."""
    dead = [t.name for t in threads if not t.is_alive()]
    if dead:
        return Check("stages", False, f"stopped: {', '.join(dead)}")
    return Check("stages", True, ", ".join(t.name for t in threads) or "none")


def run_checks(node: Any) -> list[Check]:
    """Every check for a running :class:`~dicom_node.ops.service.Node`."""
    cfg = node.cfg
    models = getattr(node, "models", None)
    checks = [check_database(node.engine), check_disk(cfg)]
    if node.roles & {"worker", "web"}:
        checks.append(check_models(cfg, models.loaded_names() if models is not None else None))
    if node.roles & {"export", "web"}:
        checks.append(check_destinations(cfg, node.engine))
    checks.append(check_gpu())
    checks.append(check_threads(node.threads))
    return checks


def liveness(checks: list[Check]) -> bool:
    """Alive: the database answers and no stage thread died (disk and models only affect readiness)."""
    return all(c.ok for c in checks if c.name in ("database", "stages"))
