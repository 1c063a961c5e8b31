"""Health checks behind ``/healthz`` (alive) and ``/readyz`` (ready for work), and the dashboard's health panel.

Checks: the database answers and its schema is current; free disk in the data directory is above the C-STORE
watermark; every model a rule names is found (a model folder with a card and weights); the stage threads of this
process are alive. The model check reads folders only and never imports torch, so a receive-only or web-only
process stays light.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.config import Config

LOGGER = logging.getLogger(__name__)


@dataclass
class Check:
    """One check's outcome."""

    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def model_folders(cfg: Config) -> list[Path]:
    """The folders searched for model folders: configured ones first, then the bundled models."""
    folders = [Path(d).expanduser() for d in cfg.models.directories]
    spec = importlib.util.find_spec("models")
    if spec is not None and spec.submodule_search_locations:
        folders.append(Path(list(spec.submodule_search_locations)[0]) / "bundled")
    return folders


def check_database(engine: Any) -> Check:
    """The database answers and is at the newest schema revision."""
    from alembic.script import ScriptDirectory

    from dicom_node.store.database import MIGRATIONS_DIR, schema_version

    started = time.perf_counter()
    try:
        version = schema_version(engine)
    except Exception as exc:
        return Check("database", False, f"unreachable: {type(exc).__name__}: {str(exc)[:200]}")
    from alembic.config import Config as AlembicConfig

    alembic_cfg = AlembicConfig()
    alembic_cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(alembic_cfg).get_current_head()
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
    from dicom_node.metrics import gpu_samples

    gpus = gpu_samples()
    if not gpus:
        return Check("gpu", True, "none in use by this process (CPU)")
    parts = []
    for index, util, used, total in gpus:
        u = f", {util * 100:.0f} % busy" if util is not None else ""
        parts.append(f"cuda:{index} {used / 1024**3:.1f}/{total / 1024**3:.1f} GiB{u}")
    return Check("gpu", True, "; ".join(parts), {"gpus": gpus})


def check_threads(threads: list[Any]) -> Check:
    """The stage threads of this process are alive."""
    dead = [t.name for t in threads if not t.is_alive()]
    if dead:
        return Check("stages", False, f"stopped: {', '.join(dead)}")
    return Check("stages", True, ", ".join(t.name for t in threads) or "none")


def run_checks(node: Any) -> list[Check]:
    """Every check for a running :class:`~dicom_node.service.Node`."""
    cfg = node.cfg
    models = getattr(node, "models", None)
    checks = [check_database(node.engine), check_disk(cfg)]
    if node.roles & {"worker", "web"}:
        checks.append(check_models(cfg, models.loaded_names() if models is not None else None))
    checks.append(check_gpu())
    checks.append(check_threads(node.threads))
    return checks


def liveness(checks: list[Check]) -> bool:
    """Alive: the database answers and no stage thread died (disk and models only affect readiness)."""
    return all(c.ok for c in checks if c.name in ("database", "stages"))
