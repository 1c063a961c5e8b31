"""Checks of a configuration against the models the node can load, before anything runs.

A rule that names a misspelled model, a model made for another modality or body part, or a strength its model
does not allow passes the structural checks of :mod:`dicom_node.config`, yet every job of it would fail (or
denoise what the model was never made for). :func:`model_problems` finds these, each naming its key in the style
of the other configuration messages; ``config check``, ``rules test`` and ``serve`` use it.

Model folders are found as :func:`models.folder.find_model` finds them (configured ``models.directories`` first,
then the bundled models; a card's ``name`` first, then the folder name), but only ``card.toml`` is read, with
``tomllib``: neither torch nor the weights are loaded, so the check takes milliseconds.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import Config, Rule

CARD_FILE = "card.toml"
WEIGHTS_FILE = "weights.safetensors"

#: BodyPartExamined values (PS3.16 Annex L) tried against a rule's pattern to find body parts it would send to a
#: model whose card does not list them. Synonyms of a card's entries (BRAIN for HEAD) are deliberately absent.
PROBE_BODY_PARTS = ("CHEST", "ABDOMEN", "PELVIS", "CSPINE", "TSPINE", "LSPINE", "SPINE", "NECK", "SHOULDER",
                    "ARM", "HAND", "HIP", "LEG", "KNEE", "FOOT", "EXTREMITY", "HEART", "BREAST", "WHOLEBODY")


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder's card says, as far as rules are concerned."""

    name: str
    folder: Path
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    #: ``(low, high)`` strengths the card allows; ``(0.0, 1.0)`` when it declares none.
    strength_range: tuple[float, float] = (0.0, 1.0)
    has_weights: bool = True
    #: Why the card cannot be used (empty when it can).
    error: str = ""


def model_search_path(directories: Iterable[str]) -> list[Path]:
    """Configured folders first, then the bundled models (as :func:`models.folder.model_search_path`)."""
    folders = [Path(d).expanduser() for d in directories]
    spec = importlib.util.find_spec("models")
    if spec is not None and spec.submodule_search_locations:
        folders.append(Path(list(spec.submodule_search_locations)[0]) / "bundled")
    return folders


def _str_list(value: object) -> tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def read_model_info(folder: Path) -> ModelInfo:
    """The :class:`ModelInfo` of one model folder (``error`` says why its card cannot be used)."""
    has_weights = (folder / WEIGHTS_FILE).is_file()
    try:
        data = tomllib.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return ModelInfo(folder.name, folder, has_weights=has_weights, error=f"{folder / CARD_FILE}: {exc}")
    name = data.get("name")
    modalities = _str_list(data.get("modalities", []))
    body_parts = _str_list(data.get("body_parts", []))
    raw_range = data.get("strength_range", [0.0, 1.0])
    ok_range = (isinstance(raw_range, list) and len(raw_range) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw_range)
                and 0.0 <= raw_range[0] <= raw_range[1] <= 1.0)
    if not isinstance(name, str) or not name or modalities is None or body_parts is None or not ok_range:
        return ModelInfo(name if isinstance(name, str) and name else folder.name, folder, has_weights=has_weights,
                         error=f"{folder / CARD_FILE}: name, modalities, body_parts or strength_range is malformed")
    return ModelInfo(name, folder, modalities, body_parts, (float(raw_range[0]), float(raw_range[1])), has_weights)


def available_models(directories: Iterable[str]) -> list[ModelInfo]:
    """Every model folder (a folder with ``card.toml``) directly inside the search path's folders, in order."""
    found: list[ModelInfo] = []
    for base in model_search_path(directories):
        if not base.is_dir():
            continue
        for sub in sorted(p for p in base.iterdir() if (p / CARD_FILE).is_file()):
            found.append(read_model_info(sub))
    return found


def find_model_info(name: str, models: list[ModelInfo]) -> ModelInfo | None:
    """The model a rule's ``model = name`` loads: a folder path, else a card name, else a folder name."""
    direct = Path(name).expanduser()
    if (direct / CARD_FILE).is_file():
        return read_model_info(direct)
    for info in models:
        if info.name == name:
            return info
    for info in models:
        if info.folder.name == name:
            return info
    return None


def _toml_list(values: Iterable[str]) -> str:
    return ", ".join(f'"{v}"' for v in values)


def suggested_body_part_pattern(body_parts: Iterable[str]) -> str:
    """A ``BodyPartExamined`` pattern that matches exactly these values, in any case."""
    return "(?i)^(" + "|".join(re.escape(b.lower()) for b in body_parts) + ")$"


def _check_modality(rule: Rule, where: str, info: ModelInfo, problems: list[str]) -> None:
    wanted = rule.match.get("Modality")
    shown = ", ".join(info.modalities)
    if wanted is None:
        hint = (f'Modality = "{info.modalities[0]}"' if len(info.modalities) == 1
                else f"Modality = [{_toml_list(info.modalities)}]")
        problems.append(f"{where}.match.Modality: missing, so series of every modality go to model {info.name!r}, "
                        f"which is made for {shown} only (add {hint})")
        return
    options = wanted if isinstance(wanted, list) else [wanted]
    others = [o for o in options if isinstance(o, str) and o.strip() not in info.modalities]
    if others:
        problems.append(f"{where}.match.Modality: model {info.name!r} is made for {shown} series, "
                        f"not {', '.join(map(repr, others))}")


def _check_body_parts(rule: Rule, where: str, info: ModelInfo, problems: list[str]) -> None:
    if not info.body_parts:
        return
    shown = ", ".join(info.body_parts)
    wanted = rule.match.get("BodyPartExamined")
    if wanted is None:
        problems.append(f"{where}.match.BodyPartExamined: missing, so every body part goes to model "
                        f"{info.name!r}, whose card lists {shown} only (add BodyPartExamined = "
                        f"\"{suggested_body_part_pattern(info.body_parts)}\", or name a model for the others)")
        return
    patterns = wanted if isinstance(wanted, list) else [wanted]
    try:
        compiled = [re.compile(p) for p in patterns if isinstance(p, str)]
    except re.error:
        return  # already reported by the structural check
    if not any(c.search(part) for c in compiled for part in info.body_parts):
        problems.append(f"{where}.match.BodyPartExamined: {wanted!r} matches none of the body parts model "
                        f"{info.name!r} is made for ({shown})")
        return
    extra = [part for part in PROBE_BODY_PARTS
             if part not in info.body_parts and any(c.search(part) for c in compiled)]
    if extra:
        shown_extra = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        problems.append(f"{where}.match.BodyPartExamined: {wanted!r} also matches {shown_extra}, but model "
                        f"{info.name!r} is made for {shown} only (try "
                        f"\"{suggested_body_part_pattern(info.body_parts)}\")")


def rule_model_problems(rule: Rule, where: str, models: list[ModelInfo]) -> list[str]:
    """Why ``rule`` (at key ``where``, e.g. ``rules[2]``) cannot run with its model; empty when it can."""
    if not rule.model:
        return []
    problems: list[str] = []
    info = find_model_info(rule.model, models)
    if info is None:
        names = sorted({m.name for m in models if not m.error})
        known = ", ".join(names) or "none installed"
        close = difflib.get_close_matches(rule.model, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return [f"{where}.model: unknown model {rule.model!r} (known: {known}{hint})"]
    if info.error:
        return [f"{where}.model: model {rule.model!r} cannot be used: {info.error}"]
    if not info.has_weights:
        return [f"{where}.model: model {rule.model!r} has no {WEIGHTS_FILE} in {info.folder}"]
    _check_modality(rule, where, info, problems)
    _check_body_parts(rule, where, info, problems)
    low, high = info.strength_range
    if 0.0 <= rule.strength <= 1.0 and not low <= rule.strength <= high:
        problems.append(f"{where}.strength: {rule.strength:g} is outside [{low:g}, {high:g}], the range the card "
                        f"of model {info.name!r} allows")
    return problems


def model_problems(cfg: Config) -> list[str]:
    """Every problem of ``cfg``'s rules with the models the node can load, each naming its key."""
    if not any(rule.model for rule in cfg.rules):
        return []
    models = available_models(cfg.models.directories)
    problems: list[str] = []
    for i, rule in enumerate(cfg.rules):
        problems.extend(rule_model_problems(rule, f"rules[{i}]", models))
    return problems

