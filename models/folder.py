"""Model folders: ``weights.safetensors`` plus ``card.toml``, and the one loader that builds a network from them.

A model folder describes itself, so loading never drifts from training::

    ct-cnn/
        weights.safetensors     the state dict (safetensors: no pickle, so loading runs no code)
        card.toml               name, version, architecture and its arguments, modalities, body parts,
                                normalisation, noise it was trained for, data, metrics, sha256 of the weights

Normalisation (the card's ``[normalization]`` table) maps the series' physical values to the network's input:
``x_net = (clip(value) - offset) / scale``. ``input_unit`` says what ``value`` is:

``"HU"``
    CT Hounsfield units (stored values through RescaleSlope/Intercept); only CT series fit.
``"modality"``
    the output of the Modality LUT stage (rescale when present, stored values otherwise); any modality the card
    lists.

``mode = "fixed"`` uses the card's ``offset`` and ``scale``; ``mode = "per-image"`` takes them from each image's
``percentiles`` (``offset = p_low``, ``scale = p_high - p_low``), for MR and X-ray whose values have no
absolute meaning. MONOCHROME1 images are inverted (``invert_monochrome1``) so the network always sees
"bright = more signal".

This module imports torch and safetensors but neither ``dicom_node`` nor ``training``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import logging
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.networks import UnknownArchitecture, build_network, is_denoiser

LOGGER = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.toml"
CARD_FORMAT = 1
INPUT_UNITS = ("HU", "modality")
NORMALIZATION_MODES = ("fixed", "per-image")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelError(Exception):
    """Base class of every model-folder problem; the message says what is wrong and where."""


class CardError(ModelError):
    """``card.toml`` is missing, not TOML, or has a missing or invalid key."""


class ModelIntegrityError(ModelError):
    """The weights do not match the card (sha256 differs, or tensors do not fit the architecture)."""


class ModelNotFound(ModelError):
    """No model folder with the requested name in the searched folders."""


class ModelMismatch(ModelError):
    """The model's card does not fit the series (modality, unit or normalisation)."""


@dataclass
class Normalization:
    """How physical values become network inputs: ``x_net = (clip(value) - offset) / scale``.

    Attributes
    ----------
    input_unit
        ``"HU"`` (CT only) or ``"modality"`` (the Modality LUT output: rescaled values, or stored values).
    mode
        ``"fixed"`` (``offset``/``scale`` below) or ``"per-image"`` (from each image's ``percentiles``).
    offset, scale
        Fixed-mode constants, in ``input_unit``.
    clip
        ``[low, high]`` in ``input_unit`` applied before scaling (fixed mode), or ``None``.
    percentiles
        ``[low, high]`` percentiles (0-100) of the image's non-padding pixels, for per-image mode.
    invert_monochrome1
        Feed MONOCHROME1 images inverted (``max - value``) so the network sees bright = more signal.
    """

    input_unit: str = "HU"
    mode: str = "fixed"
    offset: float = 0.0
    scale: float = 1.0
    clip: list[float] | None = None
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    invert_monochrome1: bool = True

    def problems(self) -> list[str]:
        """Why this normalisation is invalid (empty when it is valid)."""
        out = []
        if self.input_unit not in INPUT_UNITS:
            out.append(f"normalization.input_unit: {self.input_unit!r} is not one of {', '.join(INPUT_UNITS)}")
        if self.mode not in NORMALIZATION_MODES:
            out.append(f"normalization.mode: {self.mode!r} is not one of {', '.join(NORMALIZATION_MODES)}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            out.append(f"normalization.scale: must be a positive finite number, not {self.scale!r}")
        if not (isinstance(self.offset, (int, float)) and math.isfinite(self.offset)):
            out.append(f"normalization.offset: must be a finite number, not {self.offset!r}")
        if self.clip is not None and (len(self.clip) != 2 or not self.clip[0] < self.clip[1]):
            out.append(f"normalization.clip: must be [low, high] with low < high, not {self.clip!r}")
        p = self.percentiles
        if len(p) != 2 or not 0 <= p[0] < p[1] <= 100:
            out.append(f"normalization.percentiles: must be [low, high] within 0-100, not {p!r}")
        return out


@dataclass
class ModelCard:
    """What a model is, what it expects and how it was made (``card.toml``).

    Attributes
    ----------
    name, version
        Identify the model (``name`` is what rules and ``--model`` refer to).
    architecture, arguments
        The registered architecture (:mod:`models.networks`) and its keyword arguments.
    modalities, body_parts
        DICOM Modality values the model fits, and BodyPartExamined values it was trained on (an empty list means
        any; ``dicom-node config check`` refuses a rule that would send other body parts to the model).
    strength_range
        ``[low, high]`` within ``[0, 1]``: the strengths a rule may use with this model (``None``: any).
    normalization
        See :class:`Normalization`.
    noise
        The noise it was trained for (free-form: model, dose fraction, sigma ...).
    training, metrics
        Data summary and measured metrics (free-form tables).
    sha256
        Hex digest of ``weights.safetensors``; written by :func:`save_model_folder`.
    samples_per_pixel
        1: the network sees grey values (MONOCHROME1/2, or the grey B-mode of an ultrasound image); 3: colour, as
        RGB (YBR and palette sources are converted to RGB first).
    context
        Neighbouring slices or frames fed on each side of the one denoised (0: one frame alone). The network's
        input then has ``(2 * context + 1) * samples_per_pixel`` channels, frames in order; at the ends of a
        series the nearest frame is repeated.
    """

    name: str
    version: str
    architecture: str
    arguments: dict[str, Any] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=list)
    body_parts: list[str] = field(default_factory=list)
    strength_range: list[float] | None = None
    normalization: Normalization = field(default_factory=Normalization)
    noise: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    sha256: str = ""
    samples_per_pixel: int = 1
    context: int = 0
    created: str = ""
    format: int = CARD_FORMAT

    # ---------------------------------------------------------------- validation

    def problems(self) -> list[str]:
        """Why this card is invalid (empty when it is valid)."""
        out = []
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            out.append(f"name: {self.name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if not isinstance(self.version, str) or not self.version:
            out.append("version: must be a non-empty string")
        if not is_denoiser(self.architecture):
            out.append(f"architecture: {self.architecture!r} is not a registered denoiser")
        if not self.modalities:
            out.append("modalities: must list at least one DICOM Modality (for example [\"CT\"])")
        out.extend(self.normalization.problems())
        r = self.strength_range
        if r is not None and not (isinstance(r, list) and len(r) == 2
                                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)
                                  and 0.0 <= r[0] <= r[1] <= 1.0):
            out.append(f"strength_range: must be [low, high] with 0 <= low <= high <= 1, not {r!r}")
        if self.normalization.input_unit == "HU" and any(m != "CT" for m in self.modalities):
            out.append("normalization.input_unit: HU only fits CT, but modalities lists "
                       + ", ".join(m for m in self.modalities if m != "CT"))
        if self.samples_per_pixel not in (1, 3):
            out.append(f"samples_per_pixel: must be 1 (grey) or 3 (colour), not {self.samples_per_pixel!r}")
        if not isinstance(self.context, int) or isinstance(self.context, bool) or not 0 <= self.context <= 8:
            out.append(f"context: must be an integer from 0 to 8 (neighbouring frames per side), not {self.context!r}")
        if self.sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            out.append(f"sha256: {self.sha256!r} is not a lowercase hex sha256 digest")
        if self.format != CARD_FORMAT:
            out.append(f"format: {self.format!r} is not supported (this node reads format {CARD_FORMAT})")
        return out

    def validate(self, where: str = "card") -> None:
        """Raise :class:`CardError` listing every problem."""
        problems = self.problems()
        if problems:
            raise CardError(f"{where} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))

    def check_fits(self, modality: str, unit: str | None = None) -> None:
        """Refuse (raise :class:`ModelMismatch`) a series the model was not made for.

        Parameters
        ----------
        modality
            The series' Modality (0008,0060).
        unit
            What the series' Modality LUT produces: ``"HU"`` for CT in Hounsfield units, another RescaleType
            (``"US"``, ``"OD"`` ...) or ``None`` when unknown.
        """
        if modality not in self.modalities:
            raise ModelMismatch(
                f"model {self.name} {self.version} is for {', '.join(self.modalities)} series, "
                f"not {modality or 'unknown'}"
            )
        if self.normalization.input_unit == "HU":
            if modality != "CT":
                raise ModelMismatch(
                    f"model {self.name} expects Hounsfield units, which only CT has ({modality} series)"
                )
            if unit not in (None, "HU"):
                raise ModelMismatch(
                    f"model {self.name} expects Hounsfield units, but the series' rescale type is {unit}"
                )

    # ---------------------------------------------------------------- TOML

    def to_dict(self) -> dict[str, Any]:
        """The card as plain data (what ``card.toml`` holds)."""
        data = dataclasses.asdict(self)
        norm = data["normalization"]
        if norm["clip"] is None:
            del norm["clip"]
        if data["strength_range"] is None:
            del data["strength_range"]
        return data

    def to_toml(self) -> str:
        """The card as TOML text."""
        return dumps_toml(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "card") -> ModelCard:
        """Build a card from parsed TOML, reporting unknown and missing keys together."""
        problems = []
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                problems.append(f"{key}: unknown key (known: {', '.join(sorted(known))})")
        for key in ("name", "version", "architecture"):
            if key not in data:
                problems.append(f"{key}: required key is missing")
        raw_norm = data.get("normalization", {})
        norm_known = {f.name for f in dataclasses.fields(Normalization)}
        if not isinstance(raw_norm, Mapping):
            problems.append("normalization: must be a table")
            raw_norm = {}
        for key in raw_norm:
            if key not in norm_known:
                problems.append(f"normalization.{key}: unknown key (known: {', '.join(sorted(norm_known))})")
        if problems:
            raise CardError(f"{where} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
        norm_args: dict[str, Any] = {
            k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in raw_norm.items()
        }
        norm = Normalization(**norm_args)
        kwargs = {k: v for k, v in data.items() if k != "normalization"}
        for key in ("modalities", "body_parts", "strength_range"):
            if key in kwargs:
                kwargs[key] = list(kwargs[key])
        card = cls(normalization=norm, **kwargs)
        card.validate(where)
        return card

    @classmethod
    def from_toml(cls, text: str, where: str = "card") -> ModelCard:
        """Parse ``card.toml`` text."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise CardError(f"{where} is not valid TOML: {exc}") from exc
        return cls.from_dict(data, where)

    @property
    def short_hash(self) -> str:
        """The first 12 hex digits of the weights' sha256."""
        return self.sha256[:12]


@dataclass
class LoadedModel:
    """A network in eval mode on its device, with the card it was built from."""

    network: nn.Module
    card: ModelCard
    device: torch.device
    path: Path

    @property
    def name(self) -> str:
        return self.card.name

    def check_fits(self, modality: str, unit: str | None = None) -> None:
        """See :meth:`ModelCard.check_fits`."""
        self.card.check_fits(modality, unit)


# ------------------------------------------------------------------------------------------------- TOML writing


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_str(key)


def _toml_str(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any) -> str:
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # numpy scalars from metrics
        value = value.item() if getattr(value, "ndim", 0) == 0 else value.tolist()
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")


def dumps_toml(data: Mapping[str, Any]) -> str:
    """Write a mapping of scalars, lists and nested mappings as TOML (tables for nested mappings)."""
    lines: list[str] = []

    def emit(table: Mapping[str, Any], prefix: str) -> None:
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping) and v is not None]
        tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
        if prefix and (scalars or not tables):
            lines.append(f"\n[{prefix}]")
        for k, v in scalars:
            lines.append(f"{_toml_key(str(k))} = {_toml_value(v)}")
        for k, v in tables:
            emit(v, f"{prefix}.{_toml_key(str(k))}" if prefix else _toml_key(str(k)))

    emit(data, "")
    return "\n".join(lines).lstrip("\n") + "\n"


# ------------------------------------------------------------------------------------------------- save and load


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_channels(card: ModelCard, network: nn.Module) -> None:
    """Raise :class:`CardError` unless ``network``'s image channels fit the card's ``samples_per_pixel``/``context``.

    A grey network run on colour, or a 3-slice network fed one slice, would fail deep inside torch (or, worse, run
    on the wrong channels); the card is the contract the engine reads, so the two must agree.
    """
    expected_in = (2 * card.context + 1) * card.samples_per_pixel
    channels = (getattr(network, "in_channels", 1), getattr(network, "out_channels", 1))
    if channels != (expected_in, card.samples_per_pixel):
        raise CardError(f"model {card.name}: the network takes {channels[0]} channel(s) and gives {channels[1]}, but "
                        f"the card (samples_per_pixel {card.samples_per_pixel}, context {card.context}) needs "
                        f"{expected_in} and {card.samples_per_pixel}")


def save_model_folder(network: nn.Module, card: ModelCard, path: str | os.PathLike[str]) -> ModelCard:
    """Write ``network``'s weights and ``card`` (with the weights' sha256) to the folder ``path``.

    The card is validated first, and the network must be buildable from it (same architecture and arguments:
    its state dict must load into ``build_network(card.architecture, **card.arguments)``), so a folder that
    loads is guaranteed.

    Returns
    -------
    ModelCard
        The card as written (read back from ``card.toml``), with ``sha256`` (and ``created`` when empty) filled in.
    """
    card = dataclasses.replace(card, normalization=dataclasses.replace(card.normalization))
    card.sha256 = ""
    card.validate(f"card of {card.name!r}")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in network.state_dict().items()}
    probe = build_network(card.architecture, **card.arguments)
    try:
        probe.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelIntegrityError(
            f"the network's weights do not fit {card.architecture} with arguments {card.arguments}: {exc}"
        ) from exc
    check_channels(card, probe)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"name": card.name, "version": card.version,
                                         "architecture": card.architecture})
    os.replace(tmp, folder / WEIGHTS_FILE)
    card.sha256 = sha256_file(folder / WEIGHTS_FILE)
    if not card.created:
        card.created = _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()
    tmp_card = folder / (CARD_FILE + ".tmp")
    tmp_card.write_text(card.to_toml(), encoding="utf-8")
    os.replace(tmp_card, folder / CARD_FILE)
    LOGGER.info("saved model %s %s to %s (sha256 %s)", card.name, card.version, folder, card.short_hash)
    return read_card(folder)  # exactly what a loader will see (numpy scalars and paths become plain values)


def update_card(card: ModelCard, path: str | os.PathLike[str]) -> ModelCard:
    """Rewrite only ``card.toml`` of the model folder ``path`` (new metrics, say); the weights are not touched.

    The card must describe the weights already there (same sha256), so a model's identity, which derived series
    UIDs are made from, never changes by re-scoring it.

    Returns
    -------
    ModelCard
        The card as written (read back).
    """
    folder = Path(path)
    actual = sha256_file(folder / WEIGHTS_FILE)
    if card.sha256 != actual:
        raise ModelIntegrityError(f"{folder}: the card is for weights {card.sha256[:12]}, the folder holds "
                                  f"{actual[:12]}")
    card.validate(f"card of {card.name!r}")
    tmp_card = folder / (CARD_FILE + ".tmp")
    tmp_card.write_text(card.to_toml(), encoding="utf-8")
    os.replace(tmp_card, folder / CARD_FILE)
    return read_card(folder)


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read and validate ``card.toml`` of the model folder ``path``."""
    card_path = Path(path) / CARD_FILE
    try:
        text = card_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CardError(f"cannot read {card_path}: {exc.strerror or exc}") from exc
    return ModelCard.from_toml(text, str(card_path))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when torch sees a GPU, else CPU; ``"cuda"`` without a GPU raises ``ModelError``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was requested but torch sees no CUDA GPU")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"invalid device {device!r}: {exc}") from exc


def load_model_folder(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Build the network a model folder describes, check the weights' hash, load them and set eval mode.

    Raises
    ------
    CardError
        The card is missing or invalid.
    ModelIntegrityError
        The weights are missing, their sha256 differs from the card's, or they do not fit the architecture.
    """
    folder = Path(path)
    card = read_card(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelIntegrityError(f"model {card.name}: {weights} is missing")
    if not card.sha256:
        raise ModelIntegrityError(f"model {card.name}: {folder / CARD_FILE} has no sha256 of the weights")
    actual = sha256_file(weights)
    if actual != card.sha256:
        raise ModelIntegrityError(
            f"model {card.name}: weights sha256 {actual[:12]}... does not match the card's {card.sha256[:12]}... "
            f"({weights} was changed or corrupted)"
        )
    try:
        network = build_network(card.architecture, **card.arguments)
    except (UnknownArchitecture, TypeError, ValueError) as exc:
        raise CardError(f"model {card.name}: cannot build {card.architecture} with {card.arguments}: {exc}") from exc
    check_channels(card, network)
    try:
        state = load_file(str(weights))
        network.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors raises its own error types; report them all the same way
        raise ModelIntegrityError(f"model {card.name}: weights do not fit {card.architecture}: {exc}") from exc
    dev = resolve_device(device)
    network = network.to(dev).eval()
    for p in network.parameters():
        p.requires_grad_(False)
    LOGGER.info("loaded model %s %s (%s, sha256 %s) on %s", card.name, card.version, card.architecture,
                card.short_hash, dev)
    return LoadedModel(network=network, card=card, device=dev, path=folder)


# ------------------------------------------------------------------------------------------------- finding models


def bundled_models_dir() -> Path:
    """The folder of models shipped with the package (``models/bundled``; may not exist)."""
    return Path(str(resources.files("models").joinpath("bundled")))


def model_search_path(directories: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """The configured folders (first) and the bundled folder; later entries lose name clashes."""
    out = [Path(d).expanduser() for d in directories]
    out.append(bundled_models_dir())
    return out


@dataclass
class ModelEntry:
    """One model folder found on the search path: its card, or why it could not be read."""

    path: Path
    card: ModelCard | None
    error: str = ""


def list_models(directories: Iterable[str | os.PathLike[str]] = ()) -> list[ModelEntry]:
    """Every model folder (a folder with ``card.toml``) directly inside the search path's folders."""
    entries: list[ModelEntry] = []
    for base in model_search_path(directories):
        if not base.is_dir():
            continue
        for sub in sorted(p for p in base.iterdir() if (p / CARD_FILE).is_file()):
            try:
                entries.append(ModelEntry(sub, read_card(sub)))
            except ModelError as exc:
                entries.append(ModelEntry(sub, None, str(exc)))
    return entries


def find_model(name: str, directories: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """The folder of the model called ``name`` (its card's name or its folder name), or a folder path itself.

    Raises
    ------
    ModelNotFound
        Naming the searched folders and the models found there.
    """
    direct = Path(name).expanduser()
    if (direct / CARD_FILE).is_file():
        return direct
    entries = list_models(directories)
    for entry in entries:
        if entry.card is not None and entry.card.name == name:
            return entry.path
    for entry in entries:
        if entry.path.name == name:
            return entry.path
    searched = ", ".join(str(p) for p in model_search_path(directories))
    found = ", ".join(sorted(e.card.name for e in entries if e.card is not None)) or "none"
    raise ModelNotFound(f"no model named {name!r} (searched {searched}; found: {found})")


def load_model(name: str, directories: Sequence[str | os.PathLike[str]] = (),
               device: str | torch.device = "cpu") -> LoadedModel:
    """Find the model called ``name`` on the search path and load it (see :func:`load_model_folder`)."""
    return load_model_folder(find_model(name, directories), device)
