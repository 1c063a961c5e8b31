"""Patient-level data splits kept in a file (``training/splits/ct.toml``), read by training and evaluation alike.

A split lists every patient (or phantom) of a modality's real data with its folders and one role:

``train``
    clean targets for simulated lower dose and self-supervised pairs;
``validation``
    held out: checkpoint selection, default strength and every reported figure;
``noise``
    real low-dose scans: noise calibration, noise power spectrum checks and self-supervised pairs, never a clean
    supervised target.

Splitting by patient, not by series or slice, keeps two series of one patient (two time points, a reformat
beside its axial series) from straddling training and validation.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("train", "validation", "noise")

#: The split files shipped with the project, by name.
SPLITS_DIR = Path(__file__).resolve().parent / "splits"


class SplitError(ValueError):
    """A split file is malformed: unknown role, a patient or folder listed twice, a missing key."""


@dataclass(frozen=True)
class Patient:
    """One patient (or phantom) of a split: its folders (relative to the shared data) and role."""

    id: str
    role: str
    folders: tuple[str, ...]
    body_part: str = ""


@dataclass
class Split:
    """A patient-level split read from a TOML file (see the module docstring)."""

    name: str
    patients: list[Patient] = field(default_factory=list)
    source: str = ""

    def folders(self, *roles: str) -> list[str]:
        """The folders of every patient with one of ``roles``, in file order."""
        for role in roles:
            if role not in ROLES:
                raise SplitError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
        return [f for p in self.patients if p.role in roles for f in p.folders]

    def patients_with(self, role: str) -> list[Patient]:
        return [p for p in self.patients if p.role == role]

    def role_of_folder(self, folder: str) -> str | None:
        for p in self.patients:
            if folder in p.folders:
                return p.role
        return None


def resolve_split_path(path: str | os.PathLike) -> Path:
    """``path`` as given when it exists, else a split shipped in ``training/splits`` (``ct`` or ``ct.toml``)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    shipped = SPLITS_DIR / (p.name if p.suffix == ".toml" else f"{p.name}.toml")
    if shipped.exists():
        return shipped
    raise SplitError(f"split file {path} not found (nor {shipped})")


def load_split(path: str | os.PathLike) -> Split:
    """Read and check a split file.

    Raises
    ------
    SplitError
        Unknown keys or roles, a patient id or folder that appears twice (a patient in two splits).
    """
    p = resolve_split_path(path)
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SplitError(f"{p}: {exc}") from exc
    problems: list[str] = []
    unknown = sorted(set(data) - {"name", "version", "patients"})
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)}")
    patients: list[Patient] = []
    seen_ids: dict[str, int] = {}
    seen_folders: dict[str, str] = {}
    for i, raw in enumerate(data.get("patients", [])):
        where = f"patients[{i}]"
        extra = sorted(set(raw) - {"id", "role", "folders", "body_part"})
        if extra:
            problems.append(f"{where}: unknown key(s) {', '.join(extra)}")
        pid, role, folders = str(raw.get("id", "")), str(raw.get("role", "")), raw.get("folders", [])
        if not pid:
            problems.append(f"{where}: id is missing")
        if role not in ROLES:
            problems.append(f"{where} ({pid}): role {role!r} is not one of {', '.join(ROLES)}")
        if not folders or not all(isinstance(f, str) and f for f in folders):
            problems.append(f"{where} ({pid}): folders must be a non-empty list of paths")
            folders = []
        if pid in seen_ids:
            problems.append(f"{where}: patient {pid} is listed twice (also patients[{seen_ids[pid]}])")
        seen_ids[pid] = i
        for f in folders:
            norm = str(Path(f)).rstrip("/")
            if norm in seen_folders:
                problems.append(f"{where} ({pid}): folder {f} is also listed for patient {seen_folders[norm]}")
            seen_folders[norm] = pid
        patients.append(Patient(pid, role, tuple(str(Path(f)) for f in folders), str(raw.get("body_part", ""))))
    for a, owner_a in seen_folders.items():
        for b, owner_b in seen_folders.items():
            if a != b and Path(b).is_relative_to(Path(a)):
                problems.append(f"folder {b} ({owner_b}) lies inside {a} ({owner_a})")
    if problems:
        raise SplitError(f"{p} is invalid:\n" + "\n".join(f"  - {q}" for q in problems))
    return Split(name=str(data.get("name", p.stem)), patients=patients, source=str(p))


def image_folders(root: str | os.PathLike, modality_dir: str) -> list[str]:
    """Folders under ``root/modality_dir`` that hold files directly (the leaves a split must cover), relative
    to ``root``; ``README*`` files do not count."""
    base = Path(root)
    out = []
    for d in sorted((base / modality_dir).rglob("*")):
        if d.is_dir() and any(f.is_file() and not f.name.upper().startswith("README") for f in d.iterdir()):
            out.append(str(d.relative_to(base)))
    return out


def uncovered_folders(split: Split, root: str | os.PathLike, modality_dir: str = "ct") -> list[str]:
    """Data folders under ``root/modality_dir`` that no patient of ``split`` lists (empty: full coverage)."""
    listed = {Path(f) for p in split.patients for f in p.folders}
    return [f for f in image_folders(root, modality_dir)
            if not any(Path(f) == x or Path(f).is_relative_to(x) for x in listed)]
