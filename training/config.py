"""One TOML file per training run (copied into the run folder).

Example (``training/configs/ct-cnn.toml`` is a full one)::

    name = "ct-cnn"            # model name, run folder runs/<name>/
    version = "1.0"
    mode = "supervised"        # supervised | gan | self-supervised
    modality = "CT"
    seed = 0

    [model]
    architecture = "unet-res"
    arguments = {}
    init = ""                  # a model folder to start from (the GAN starts from the CNN)

    [data]
    root = ""                  # default $DICOM_NODE_SHARED_DATA or ../shared/data; relative paths resolve there
    train = ["ct/ge-head-7mm", "ct/philips-head-phantom-highdose-2.5mm"]
    validation = ["ct/philips-head-phantom-lowdose-5mm"]
    pairs = "simulated"        # simulated | real | self-supervised
    patch = 64
    batch = 16

    [noise]                    # see training.data.NoiseSettings
    kind = "ct"
    dose_range = [0.1, 0.5]

    [train]
    steps = 3000
    lr = 2e-4

    [evaluate]
    data = ["ct/philips-head-phantom-lowdose-1mm"]
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.config import build_section
from training.data import NoiseSettings


class TrainingConfigError(ValueError):
    """A training config is missing a key, has an unknown one, or a value out of range."""


@dataclass
class ModelSection:
    architecture: str = "unet-res"
    arguments: dict[str, Any] = field(default_factory=dict)
    init: str = ""


@dataclass
class DataSection:
    root: str = ""
    train: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)
    pairs: str = "simulated"
    real_pairs: list[list[str]] = field(default_factory=list)  # [[low, full], ...]
    self_supervised: str = "noise2sim"
    patch: int = 64
    batch: int = 16
    max_slices: int = 0  # per series, evenly spread; 0 = all
    validation_patches: int = 64
    noise_cache: str = ""  # folder to keep simulated noisy slices in (shared by runs with the same noise)
    workers: int = -1  # processes that cut patches; -1 = none on the CPU, up to 8 beside a GPU
    # A patient-level split file (training/splits/ct.toml, or its name "ct"): train and validation then come from
    # it (train: its "train" patients, plus its "noise" patients for self-supervised pairs); see training.splits.
    split: str = ""


@dataclass
class TrainSection:
    steps: int = 1000
    lr: float = 2e-4
    lr_min: float = 1e-6
    warmup: int = 100
    weight_decay: float = 0.0
    loss: str = "l1"  # l1 | mse | multiscale-l1 | l1-colour-mean (training.loops.pixel_loss)
    ema: float = 0.999
    grad_clip: float = 1.0
    amp: bool = True  # mixed precision (bfloat16) on CUDA only
    threads: int = 0  # torch threads on CPU; 0 = leave torch's default
    device: str = "auto"
    log_every: int = 10
    validate_every: int = 200
    checkpoint_every: int = 200
    n2n_gamma: float = 2.0  # Neighbor2Neighbor regulariser weight
    # > 0: stop after about this many minutes of training, with the learning-rate schedule fitted to the steps
    # the measured speed allows (train.steps stays the upper bound).
    time_limit_minutes: float = 0.0


@dataclass
class GanSection:
    critic: str = "patch-critic"
    critic_arguments: dict[str, Any] = field(default_factory=lambda: {"channels": 32, "layers": 3})
    adversarial_weight: float = 2e-3
    gp_weight: float = 10.0
    critic_steps: int = 2
    critic_lr: float = 1e-4
    critic_input_scale: float = 1.0  # the critic sees normalised images times this (HU/1000 noise is tiny)
    critic_highpass: float = 0.0  # > 0: the critic sees clamp(x - box5(x), +-this) (texture only), times the scale
    critic_warmup: int = 0  # first steps train the critic only (the generator starts from the trained CNN)
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])


@dataclass
class EvaluateSection:
    data: list[str] = field(default_factory=list)
    real_low_dose: list[str] = field(default_factory=list)
    dose_fraction: float = 0.25
    window: list[float] = field(default_factory=lambda: [-160.0, 240.0])
    baseline: str = "bm3d"
    max_slices: int = 8


@dataclass
class TrainingConfig:
    name: str
    version: str = "1.0"
    mode: str = "supervised"
    modality: str = "CT"
    body_parts: list[str] = field(default_factory=list)
    description: str = ""
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    noise: NoiseSettings = field(default_factory=NoiseSettings)
    train: TrainSection = field(default_factory=TrainSection)
    gan: GanSection = field(default_factory=GanSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    recipe: dict[str, Any] = field(default_factory=dict)  # modality-specific settings (training.modalities)
    source: str = field(default="", metadata={"toml": False})  # the file it was read from (not a TOML key)

    def data_root(self) -> Path:
        from training.data import shared_data_dir

        return Path(self.data.root).expanduser() if self.data.root else shared_data_dir()

    def data_path(self, relative: str) -> Path:
        p = Path(relative).expanduser()
        if p.is_absolute():
            return p
        if self.source and (Path(self.source).parent / p).exists() and not self.data.root:
            return Path(self.source).parent / p
        return self.data_root() / p


_SECTIONS = {"model": ModelSection, "data": DataSection, "noise": NoiseSettings, "train": TrainSection,
             "gan": GanSection, "evaluate": EvaluateSection}


def config_from_dict(data: dict[str, Any], source: str = "") -> TrainingConfig:
    """Check a parsed TOML table (every key and its type, then the values) into a :class:`TrainingConfig`.

    Raises
    ------
    TrainingConfigError
        Listing each unknown, missing or mistyped key (``train.steps: must be integer, not str ('ten')``), or
        what :func:`apply_split` or :func:`validate` finds wrong with the values.
    """
    problems: list[str] = []
    cfg = build_section(TrainingConfig, data, "", problems)
    if cfg is None or problems:
        raise TrainingConfigError(f"{source or 'config'} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
    cfg.source = source
    apply_split(cfg)
    validate(cfg)
    return cfg


def apply_split(cfg: TrainingConfig) -> None:
    """Fill ``data.train`` and ``data.validation`` from ``data.split`` (they must not be given as well)."""
    from training.splits import SplitError, load_split

    if not cfg.data.split:
        return
    where = cfg.source or "config"
    if cfg.data.train or cfg.data.validation:
        raise TrainingConfigError(f"{where}: data.split gives train and validation; remove data.train and "
                                  "data.validation (or data.split)")
    try:
        split = load_split(cfg.data.split)
    except SplitError as exc:
        raise TrainingConfigError(f"{where}: data.split: {exc}") from exc
    roles = ("train", "noise") if cfg.data.pairs == "self-supervised" else ("train",)
    cfg.data.train = split.folders(*roles)
    cfg.data.validation = split.folders("validation")


def load_config(path: str | os.PathLike) -> TrainingConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TrainingConfigError(f"{path}: {exc}") from exc
    return config_from_dict(data, str(path.resolve()))


def validate(cfg: TrainingConfig) -> None:
    problems = []
    if cfg.mode not in {"supervised", "gan", "self-supervised"}:
        problems.append(f"mode: {cfg.mode!r} is not supervised, gan or self-supervised")
    if cfg.data.pairs not in {"simulated", "real", "self-supervised"}:
        problems.append(f"data.pairs: {cfg.data.pairs!r} is not simulated, real or self-supervised")
    if cfg.mode == "self-supervised" and cfg.data.pairs != "self-supervised":
        problems.append("mode self-supervised needs data.pairs = \"self-supervised\"")
    if cfg.train.loss not in {"l1", "mse", "multiscale-l1", "l1-colour-mean"}:
        problems.append(f"train.loss: {cfg.train.loss!r} is not l1, mse, multiscale-l1 or l1-colour-mean")
    if cfg.train.steps < 1 or cfg.data.batch < 1 or cfg.data.patch < 8:
        problems.append("train.steps and data.batch must be >= 1, data.patch >= 8")
    if cfg.train.time_limit_minutes < 0:
        problems.append("train.time_limit_minutes must be >= 0 (0 = no limit)")
    if not 0 <= cfg.train.ema < 1:
        problems.append("train.ema must be in [0, 1)")
    lo, hi = cfg.noise.dose_range
    if not 0 < lo <= hi <= 1:
        problems.append(f"noise.dose_range: {cfg.noise.dose_range} must be within (0, 1]")
    if cfg.noise.dose_sampling not in ("uniform", "log-uniform"):
        problems.append(f"noise.dose_sampling: {cfg.noise.dose_sampling!r} is not uniform or log-uniform")
    if cfg.noise.electronic_model not in ("scaled", "variance"):
        problems.append(f"noise.electronic_model: {cfg.noise.electronic_model!r} is not scaled or variance")
    if not 0 < cfg.noise.bowtie_edge <= 1:
        problems.append(f"noise.bowtie_edge: {cfg.noise.bowtie_edge} must be within (0, 1]")
    from training.noise import KERNELS

    unknown_kernels = [k for k in cfg.noise.kernels if k not in KERNELS]
    if unknown_kernels:
        problems.append(f"noise.kernels: unknown {', '.join(unknown_kernels)} (known: {', '.join(KERNELS)})")
    if cfg.mode == "gan" and not cfg.model.init:
        problems.append("mode gan needs model.init (the trained CNN's model folder)")
    if problems:
        raise TrainingConfigError(f"{cfg.source or 'config'} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def config_to_toml(cfg: TrainingConfig) -> str:
    """The full config (with defaults filled in) as TOML: what the run folder keeps."""
    d = dataclasses.asdict(cfg)
    d.pop("source", None)
    if d["data"].get("split"):  # train and validation come from the split file again when this is read back
        d["data"]["train"], d["data"]["validation"] = [], []
    lines = []
    for key, value in d.items():
        if key not in _SECTIONS and value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for key in _SECTIONS:
        lines.append(f"\n[{key}]")
        for k, v in d[key].items():
            if v is not None:  # TOML has no null: an absent key means the default (None)
                lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"
