"""Reloading the configuration of a running node (SIGHUP, or the dashboard) without a restart.

The new file is validated exactly as ``dicom-node config check`` validates it (models included where this process
routes series or runs models); an invalid file is refused with every problem and the running configuration is kept.
A valid one is applied to the running :class:`~dicom_node.config.Config` object in place, key by key, so every
stage (assembler, worker, exporters, web app), which all hold that one object, reads the new values at its next
pass, and associations in progress go on undisturbed. Only keys that the stages read while they run are applied
(:data:`LIVE_KEYS`: rules, destinations, quiet times, models, derived-series naming, web users and tokens,
retention...); the others (ports, bind addresses, data directory, database, TLS files...) are reported as needing a
restart and keep their running values. A new destination gets its exporter at once; models named by new rules are
loaded in the background. Each reload is written to the audit log as ``config.reloaded`` with the sections changed.

:func:`save_rules_and_destinations` rewrites the ``[[rules]]`` and ``[[destinations]]`` of a configuration file
(for the dashboard's editor) after checking that nothing else in the file changes, atomically and keeping the old
file as ``FILE.bak`` (:mod:`dicom_node.ops.config_edit`, as ``dicom-node web add-user`` does).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import re
import threading
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dicom_node.config import Config, ConfigError, config_from_mapping, load_config
from dicom_node.export.exporter import Exporter, destinations_to_serve
from dicom_node.ops.config_edit import replace_keeping_backup
from dicom_node.store import audit
from dicom_node.store.database import utcnow

LOGGER = logging.getLogger(__name__)

#: Keys a running node takes up without a restart (the stages read them at each pass). ``rules`` and
#: ``destinations`` are taken as a whole. Every other key that differs is reported as needing a restart.
LIVE_KEYS: dict[str, frozenset[str]] = {
    "node": frozenset({"quiet_seconds", "log_level"}),
    "web": frozenset({"users", "tokens", "session_hours", "show_patient_data", "login_max_failures",
                      "login_max_failures_per_address", "login_window_minutes", "login_lockout_minutes"}),
    "models": frozenset({"directories"}),
    "derived": frozenset({"series_number_offset", "description_suffix", "transfer_syntax", "uid_root"}),
    "worker": frozenset({"heartbeat_seconds", "stall_timeout_seconds", "poll_seconds"}),
    "export": frozenset({"stall_timeout_seconds", "poll_seconds"}),
    "retention": frozenset({"unrouted_days", "processed_days"}),
    "audit": frozenset({"retention_days"}),
    "dicomweb": frozenset({"sources", "max_request_gb"}),
}
LIST_SECTIONS = ("destinations", "rules")

#: One reload at a time per process (SIGHUP and the dashboard may ask together).
_RELOAD_LOCK = threading.RLock()


@dataclass
class ReloadResult:
    """What a reload changed."""

    source: str
    #: Sections whose values differ between the running configuration and the file (``rules``, ``web``...).
    changed: list[str] = field(default_factory=list)
    #: Keys taken up now (``rules``, ``node.quiet_seconds``...).
    applied: list[str] = field(default_factory=list)
    #: Keys that differ but keep their running value until the node is restarted (``node.port``...).
    needs_restart: list[str] = field(default_factory=list)
    #: Destinations whose exporter was started by this reload.
    new_exporters: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log and the dashboard."""
        if not self.changed:
            return f"configuration reloaded from {self.source}: nothing changed"
        text = f"configuration reloaded from {self.source}: changed {', '.join(self.changed)}"
        if self.applied:
            text += f"; applied {', '.join(self.applied)}"
        if self.needs_restart:
            text += f"; needs a restart: {', '.join(self.needs_restart)} (running values kept)"
        return text


def _differences(running: Config, new: Config) -> list[tuple[str, str | None]]:
    """``(section, key)`` of every value that differs (``key`` is ``None`` for ``rules`` and ``destinations``)."""
    out: list[tuple[str, str | None]] = []
    for f in dataclasses.fields(Config):
        if f.name == "source":
            continue
        old_value, new_value = getattr(running, f.name), getattr(new, f.name)
        if f.name in LIST_SECTIONS:
            if [dataclasses.asdict(x) for x in old_value] != [dataclasses.asdict(x) for x in new_value]:
                out.append((f.name, None))
            continue
        for sub in dataclasses.fields(old_value):
            if getattr(old_value, sub.name) != getattr(new_value, sub.name):
                out.append((f.name, sub.name))
    return out


def apply_config(running: Config, new: Config) -> ReloadResult:
    """Apply the live keys of ``new`` to ``running`` in place; report what differs and what needs a restart."""
    result = ReloadResult(source=new.source)
    differences = _differences(running, new)
    result.changed = sorted({section for section, _key in differences})
    for section, key in differences:
        name = section if key is None else f"{section}.{key}"
        if key is None or key in LIVE_KEYS.get(section, frozenset()):
            result.applied.append(name)
        else:
            result.needs_restart.append(name)
    if "destinations" in result.applied:
        # Destinations first, and the union of old and new while the rules change over, so that no stage ever
        # sees a rule naming a destination it cannot find.
        known = {d.name for d in new.destinations}
        running.destinations = list(new.destinations) + [d for d in running.destinations if d.name not in known]
    if "rules" in result.applied:
        running.rules = list(new.rules)
    if "destinations" in result.applied:
        running.destinations = list(new.destinations)
    for name in result.applied:
        section, _, key = name.partition(".")
        if key:
            setattr(getattr(running, section), key, getattr(getattr(new, section), key))
    if "node.log_level" in result.applied:
        logging.getLogger().setLevel(getattr(logging, running.node.log_level.upper(), logging.INFO))
    return result


def load_for(node: Any, path: str | None = None) -> Config:
    """Load and validate the node's configuration file as ``serve`` would (``ConfigError`` when invalid)."""
    source = path or node.cfg.source
    if source == "defaults":
        raise ConfigError(["the node runs on built-in defaults (no --config file): there is nothing to reload"],
                          "defaults")
    return load_config(source, check_models=bool(node.roles & {"receive", "worker"}))


def reload_node(node: Any, actor: str, new: Config | None = None, note: str = "") -> ReloadResult:
    """Reload ``node``'s configuration file (or apply ``new``, already validated) and record it in the audit log.

    Raises
    ------
    ConfigError
        When the file is invalid; nothing is changed then.
    """
    with _RELOAD_LOCK:
        new = new if new is not None else load_for(node)
        result = apply_config(node.cfg, new)
        _start_new_exporters(node, result)
        web = getattr(node, "web", None)
        app = getattr(web, "app", None)
        if app is not None and "web" in result.changed:
            ended = app.auth.update(node.cfg.web.users, node.cfg.web.tokens, node.cfg.web.session_hours)
            if ended:
                LOGGER.info("%d dashboard session(s) ended: their user was removed or changed", ended)
        models = getattr(node, "models", None)
        if models is not None and "rules" in result.applied:
            wanted = [r.model for r in node.cfg.rules if r.model and r.model not in models.loaded_names()]
            if wanted:
                threading.Thread(target=models.preload, args=(wanted,), name="model-preload", daemon=True).start()
        with node.engine.begin() as conn:
            detail = {"source": new.source, "changed": result.changed, "applied": result.applied,
                      "needs_restart": result.needs_restart, "sections": audit.section_hashes(node.cfg)}
            if note:
                detail["note"] = note
            audit.record(conn, "config.reloaded", actor, utcnow(), object_kind="config", detail=json.dumps(detail))
    LOGGER.info("%s (by %s)", result.summary(), actor)
    return result


def _start_new_exporters(node: Any, result: ReloadResult) -> None:
    if "destinations" not in result.applied or "export" not in node.roles:
        return
    serving = {t.destination for t in node.threads if isinstance(t, Exporter)}
    for name in destinations_to_serve(node.cfg):
        if name in serving:
            continue
        exporter = Exporter(node.cfg, node.engine, name, node.stop_event, node.identity.worker_id("export"),
                            bell=node.exports_bell)
        exporter.start()
        node.threads.append(exporter)
        result.new_exporters.append(name)
        LOGGER.info("exporter for new destination %s started", name)


# ----------------------------------------------------------------------------------------------- the editor

_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")


def file_digest(text: str) -> str:
    """A short digest of a configuration file's text: the editor refuses to save over a file changed meanwhile."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def toml_value(value: Any) -> str:
    """``value`` (string, number, boolean, list, table) as a TOML value; tables inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def rules_and_destinations_toml(raw: dict[str, Any]) -> str:
    """The ``[[destinations]]`` and ``[[rules]]`` tables of a parsed configuration, as TOML text."""
    blocks = []
    for section in LIST_SECTIONS:
        for item in raw.get(section, []) or []:
            lines = [f"[[{section}]]"] + [f"{_toml_key(k)} = {toml_value(v)}" for k, v in item.items()]
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + ("\n" if blocks else "")


class EditRefused(ValueError):
    """The edited text cannot be saved; ``problems`` says why (each naming its key where there is one)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _without_list_tables(text: str) -> str:
    """``text`` without its ``[[rules]]``/``[[destinations]]`` tables (and their ``[rules.match]`` sub-tables)."""
    out: list[str] = []
    skipping = False
    pending: list[str] = []  # comments and blank lines at the end of a removed table: they may head the next one
    for line in text.splitlines(keepends=True):
        match = _HEADER.match(line)
        if match:
            root = match.group(1).strip().split(".")[0].strip("\"' ")
            was_skipping, skipping = skipping, root in LIST_SECTIONS
            if was_skipping and not skipping:
                out.extend(pending)
            pending = []
        if not skipping:
            out.append(line)
        elif not match:
            stripped = line.strip()
            pending = pending + [line] if not stripped or stripped.startswith("#") else []
    return "".join(out)


def edited_file_text(old_text: str, edited: str) -> tuple[str, dict[str, Any]]:
    """The configuration file ``old_text`` with its rules and destinations replaced by the TOML ``edited``.

    Returns the new text and its parsed table. Raises :class:`EditRefused` when ``edited`` is not TOML, holds
    anything but ``[[rules]]`` and ``[[destinations]]``, or the file cannot be rewritten without changing
    something else.
    """
    try:
        new_lists = tomllib.loads(edited)
    except tomllib.TOMLDecodeError as exc:
        raise EditRefused([f"not valid TOML: {exc}"]) from exc
    other = sorted(set(new_lists) - set(LIST_SECTIONS))
    if other:
        raise EditRefused([f"{key}: only [[rules]] and [[destinations]] tables can be edited here" for key in other])
    old_raw = tomllib.loads(old_text)
    kept = _without_list_tables(old_text).rstrip("\n")
    new_text = (kept + "\n\n" if kept else "") + rules_and_destinations_toml(new_lists)
    try:
        new_raw = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError:
        new_raw = None
    expected = {k: v for k, v in old_raw.items() if k not in LIST_SECTIONS}
    expected.update({k: new_lists[k] for k in LIST_SECTIONS if new_lists.get(k)})
    if new_raw != expected:
        raise EditRefused(["the file sets rules or destinations in a form this editor cannot rewrite "
                           "(e.g. an inline array); edit the file itself and reload"])
    return new_text, new_raw


def save_rules_and_destinations(node: Any, edited: str, expected_digest: str, actor: str) -> ReloadResult:
    """Validate the edited rules and destinations, write them into the node's file, and reload it.

    Raises
    ------
    EditRefused
        When the text or the configuration it makes is invalid, or the file changed since it was read; the file
        and the running configuration are left as they are.
    """
    source = node.cfg.source
    if source == "defaults":
        raise EditRefused(["the node runs on built-in defaults (no --config file): there is no file to edit"])
    path = Path(source).resolve()  # a symbolic link stays; the file it points to is edited
    if path == Path(str(resources.files("dicom_node").joinpath("example.toml"))).resolve():
        raise EditRefused([f"{source} is the example shipped with dicom-node; run the node on your own copy "
                           f"(dicom-node config example > dicom-node.toml) to edit it here"])
    with _RELOAD_LOCK:
        old_text = path.read_text(encoding="utf-8")
        if expected_digest and file_digest(old_text) != expected_digest:
            raise EditRefused([f"{path} was changed since the editor was opened; open it again"])
        new_text, new_raw = edited_file_text(old_text, edited)
        try:
            new_cfg = config_from_mapping(new_raw, str(path), check_models=bool(node.roles & {"receive", "worker"}))
        except ConfigError as exc:
            raise EditRefused(exc.problems) from exc
        try:
            backup = replace_keeping_backup(path, new_text)  # atomic, mode and owner kept, old file as FILE.bak
        except OSError as exc:
            raise EditRefused([f"cannot write {path}: {exc.strerror or exc}"]) from exc
        return reload_node(node, actor, new_cfg,
                           note=f"rules and destinations edited on the dashboard; backup {backup}")
