"""The layout shows the stages: which package of ``dicom_node`` may import which, and where SQL is written.

The rule, written once here: a module may import its own package, the shared top-level modules (``config``,
``identity``, ``encoding``, the package itself for ``__version__``) and ``store/`` (the stages talk to each other
through the database); anything else it imports must be listed for its package in :data:`ALLOWED`. Every module is
parsed with :mod:`ast`, imports inside functions included, so a lazy import does not hide a dependency.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "dicom_node"

#: Top-level modules every package may import, and the package every stage talks through.
SHARED = {"config", "identity", "encoding", "__init__"}
STORE = "store"

#: Besides itself, SHARED and STORE: what each package (or top-level module) of ``dicom_node`` may import, as a
#: package name or a ``package.module``. A package or top-level module missing here fails the test: say where a new
#: one sits. An entry no module uses any more fails too, so the table only shrinks with the code.
ALLOWED: dict[str, set[str]] = {
    # The bottom: the spool, the job table and its queues, audit, leases, retention, the login throttle.
    "store": set(),
    # The DICOM network (pynetdicom's internals are fenced in here): nothing of the stages.
    "dimse": set(),
    "receive": {"dimse"},
    # Each stage counts its work in the process's Prometheus registry (the counters are defined once there).
    "assemble": {"ops.metrics"},
    # The worker reads the rule the assembler recorded for a receiving series (store/), it never routes itself.
    "denoise": {"ops.metrics"},
    # STOW-RS destinations are sent by dicomweb/stow_send, which shares its status mapping with the STOW-RS receive.
    "export": {"dimse", "dicomweb", "ops.metrics"},
    "dicomweb": {
        # STOW-RS stores through the C-STORE handler's own durable path, and maps its status codes.
        "receive.receiver",
        # STOW-RS requests are authenticated as the dashboard's are (tokens, password hashes).
        "web.auth",
    },
    "web": {
        "ops",  # health, metrics, reload: the dashboard shows and triggers them
        "dicomweb",  # STOW-RS is served on the web port
        "assemble.routing",  # "test the rules" on the dashboard explains a file against the rules ...
        "receive.receiver",  # ... with the attributes the receive stage would record for it
        "export.exporter",  # the dashboard's echo button checks a destination as the exporter would reach it
        "denoise.worker",  # PREVIEW_NAME: the preview file the worker writes into a job's outbox folder
    },
    # Process wiring: starts every stage and the web server; reload restarts the exporters.
    "ops": {"dimse", "receive", "assemble", "denoise", "export", "web"},
    # The command line drives everything.
    "cli": {"ops", "receive", "assemble", "denoise", "export", "web"},
    # Shared modules. Loading a configuration checks rules against the installed models and DICOMweb destinations
    # (imported inside the checks, so importing config alone pulls in neither).
    "config": {"denoise.model_check", "dicomweb.stow_send"},
    "identity": set(),
    # The DICOM byte format (elements, command sets, file meta): pydicom only.
    "encoding": set(),
    "__init__": set(),
    "__main__": {"cli"},
}

#: SQL lives in ``store/``, without exception: a module elsewhere that imports a sqlalchemy statement builder (or text)
#: fails the test. The stages call ``store/`` functions that take a connection; the caller owns the transaction.
SQL_BUILDERS = {"select", "insert", "update", "delete", "text"}


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name), the Alembic migrations left out."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PROJECT_ROOT).with_suffix("")
        if "migrations" in rel.parts:
            continue
        parts = rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _where(module: str) -> str:
    """The package of ``module`` under ``dicom_node`` (a top-level module stands for itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every import in ``path``, relative ones resolved."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, target] if target else base)
            yield node.lineno, target, [alias.name for alias in node.names]


def _targets(target: str, names: list[str]) -> list[str]:
    """The ``dicom_node`` modules an import reaches: ``from dicom_node.x import y`` is module ``x.y`` when that is a
    module, else ``x``."""
    if target != "dicom_node" and not target.startswith("dicom_node."):
        return []
    found = [f"{target}.{name}" for name in names if f"{target}.{name}" in MODULES]
    return found or [target]


def _allowed(source: str, target: str) -> str | None:
    """The ALLOWED entry that lets ``source`` import ``target`` ("" when the base rule does), or None."""
    mine, theirs = _where(source), _where(target)
    if theirs in (mine, STORE) or theirs in SHARED:
        return ""
    inner = ".".join(target.split(".")[1:3])
    for entry in ALLOWED.get(mine, set()):
        if entry == theirs or entry == inner or inner.startswith(entry + "."):
            return entry
    return None


def test_every_package_has_a_place_in_the_table() -> None:
    assert {_where(module) for module in MODULES} == set(ALLOWED)


def test_no_stage_imports_another_stage_except_as_allowed() -> None:
    problems, used = [], set()
    for module, path in MODULES.items():
        for line, target, names in _imports(module, path):
            for reached in _targets(target, names):
                entry = _allowed(module, reached)
                if entry is None:
                    problems.append(f"{path.relative_to(PROJECT_ROOT)}:{line}: {module} imports {reached}")
                elif entry:
                    used.add((_where(module), entry))
    assert not problems, "imports across stages that tests/unit/test_layout.py ALLOWED does not list:\n" + "\n".join(
        problems)
    unused = sorted(f"{package}: {entry}" for package, entries in ALLOWED.items() for entry in entries
                    if (package, entry) not in used)
    assert not unused, "ALLOWED entries no module needs any more (remove them):\n" + "\n".join(unused)


def test_sql_is_written_in_store_only() -> None:
    writers = set()
    for module, path in MODULES.items():
        if _where(module) == STORE:
            continue
        for _line, target, names in _imports(module, path):
            if (target == "sqlalchemy" or target.startswith("sqlalchemy.")) and SQL_BUILDERS & set(names):
                writers.add(module)
    assert writers == set(), "SQL outside store/: move it into a store/ function that takes the connection"


def test_test_fixtures_are_not_in_the_runtime_package() -> None:
    for module, path in MODULES.items():
        for line, target, _names in _imports(module, path):
            assert not target.startswith("tests"), f"{path}:{line}: {module} imports {target}"


def test_the_c_store_handler_never_imports_torch() -> None:
    """``receive/`` is imported by every process that accepts C-STORE; torch (seconds, gigabytes) must stay out of it,
    directly or through anything it imports. Checked in a fresh interpreter so other tests' imports do not count."""
    probe = "import sys, dicom_node.receive.receiver; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=PROJECT_ROOT,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, timeout=120, check=True)
    assert result.stdout.strip() == "False", "importing dicom_node.receive.receiver loaded torch"
