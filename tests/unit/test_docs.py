"""The conformance statement and operator guide say what the code does (kept in step by these checks)."""

from __future__ import annotations

import re
import tomllib

from pynetdicom.presentation import AllStoragePresentationContexts

from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.ops.service import ROLES
from dicom_node.receive.receiver import ACCEPTED_TRANSFER_SYNTAXES
from tests.helpers import PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs"


def test_conformance_statement_matches_the_scp() -> None:
    text = (DOCS / "conformance-statement.md").read_text()
    for uid in ACCEPTED_TRANSFER_SYNTAXES:
        assert f"| {uid} |" in text, uid
    assert IMPLEMENTATION_CLASS_UID in text and IMPLEMENTATION_VERSION_NAME in text
    assert f"{len(AllStoragePresentationContexts)} classes" in text
    for status in ("0000", "A700", "C210", "C211", "C212"):
        assert f"| {status} |" in text


def test_operator_guide_covers_every_role_and_command() -> None:
    text = (DOCS / "operator-guide.md").read_text()
    for role in ROLES:
        assert f"| `{role}` |" in text
    for command in ("db migrate-to", "web hash-password", "web new-token", "dicom-node audit", "dicom-node health"):
        assert command in text, command


def _run_command(readme: str) -> str:
    """The README's one command that sets up and starts the node (the line of "Run it" that runs `serve`)."""
    section = readme.split("## Run it", 1)[1].split("\n## ", 1)[0]
    (line,) = [line for line in section.splitlines() if line.startswith("python3 -m venv") and " serve " in line]
    return line


def test_readme_install_works_on_a_fresh_cpu_machine() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    command = _run_command(readme)
    section = readme.split("## Run it", 1)[1].split("\n## ", 1)[0]
    # Debian's python3 has no venv module until python3-venv is installed.
    assert "apt install python3-venv" in section
    # torch from PyTorch's CPU-only index, before the project (whose torch>=2.2 it then satisfies).
    steps = command.split(" && ")
    torch_step = next(i for i, s in enumerate(steps) if "pip install torch" in s)
    assert steps[torch_step].endswith("--index-url https://download.pytorch.org/whl/cpu")
    assert torch_step < next(i for i, s in enumerate(steps) if s.endswith("pip install -e ."))
    # The configuration it serves exists before `serve` runs (made by an earlier step, or shipped).
    config = steps[-1].split("--config ", 1)[1].split()[0]
    assert any(s.endswith(f"> {config}") for s in steps[:-1]) or (PROJECT_ROOT / config).is_file()
    # A dashboard user is created in the same configuration, and the dashboard's address is given.
    assert any(s.startswith(".venv/bin/dicom-node web add-user ") and s.endswith(f"--config {config}")
               for s in steps)
    assert "http://127.0.0.1:8080/" in section


def test_docs_cite_only_files_that_exist() -> None:
    for path in (DOCS / "operator-guide.md", PROJECT_ROOT / "README.md"):
        for name in re.findall(r"\b([A-Z][A-Z_]+\.md)\b", path.read_text()):
            assert list(PROJECT_ROOT.rglob(name)), f"{path.name} cites {name}, which does not exist"


def test_pip_install_lines_name_extras_the_project_has() -> None:
    """`pip install "dicom-node[postgres]"` fetches from PyPI, where dicom-node is not: install from the source folder,
    with extras pyproject.toml defines."""
    extras = set(tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    texts = [PROJECT_ROOT / "README.md", DOCS / "operator-guide.md", *sorted((PROJECT_ROOT / "deploy").iterdir())]
    seen = 0
    for path in texts:
        if not path.is_file():
            continue
        for spec in re.findall(r"""pip install [^\n]*?["']?([\w./-]*)\[(\w+)\]""", path.read_text()):
            seen += 1
            target, extra = spec
            assert extra in extras, f"{path.name}: extra {extra!r} is not in pyproject.toml ({extras})"
            assert target.startswith((".", "/")), f"{path.name}: {target}[{extra}] is a registry name, not a path"
    assert seen >= 3
