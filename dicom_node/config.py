"""The node's configuration: one TOML file, validated at start-up, overridable by environment variables.

Every key has a default except destinations and rules. A single key is overridden by an environment variable
``DICOM_NODE_<SECTION>__<KEY>`` (for example ``DICOM_NODE_NODE__PORT=11113``); its value is read as a TOML value
when it parses as one (``11113``, ``true``, ``["A", "B"]``) and as a plain string otherwise. Destinations and rules
are arrays of tables and are only set in the file.

Validation collects every problem and reports them together, each naming the key and why it is wrong, so an
administrator fixes a file in one pass.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import operator
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pydantic

LOGGER = logging.getLogger(__name__)

ENV_PREFIX = "DICOM_NODE_"

#: Tags (and pseudo-tags) a routing rule may match on; later stages interpret them.
RULE_MATCH_KEYS = frozenset(
    {
        "Modality",
        "BodyPartExamined",
        "SeriesDescription",
        "ImageType",
        "SliceThickness",
        "Manufacturer",
        "CallingAETitle",
        "CalledAETitle",
    }
)
#: The pseudo-destination of rules that name none: derived series are copied to ``<data_dir>/output``.
LOCAL_DESTINATION = "local"

#: Match keys whose value is a regular expression.
RULE_REGEX_KEYS = frozenset({"SeriesDescription", "BodyPartExamined", "Manufacturer"})


class ConfigError(ValueError):
    """The configuration is invalid; ``problems`` lists each bad key and why."""

    def __init__(self, problems: list[str], source: str = "configuration") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class NodeSettings:
    """The ``[node]`` section: identity, network, storage and database."""

    ae_title: str = "DENOISE"
    port: int = 11112
    bind_address: str = "0.0.0.0"
    data_dir: str = "var"
    database_url: str = ""
    max_associations: int = 16
    min_free_disk_gb: float = 5.0
    #: Largest P-DATA PDU we accept; large PDUs cut per-PDU Python overhead (PS3.8 D.3.3.2). 0 = no limit.
    max_pdu_size: int = 1048576
    #: Seconds without a new instance after which a series counts as complete (rules may override).
    quiet_seconds: float = 10.0
    #: Seconds an idle association is kept open before it is aborted.
    network_timeout: float = 60.0
    #: Seconds a new connection has for its TLS handshake and its A-ASSOCIATE-RQ before it is closed.
    association_request_timeout: float = 5.0
    #: The event-driven association reactor and direct DIMSE encoders (dimse/reactor.py); false: stock pynetdicom.
    dimse_fast_path: bool = True
    log_level: str = "INFO"


@dataclass
class SecuritySettings:
    """The ``[security]`` section: allow-lists and DICOM TLS (PS3.15 Annex B.1)."""

    allowed_calling_ae_titles: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    #: Connections one host may have open that are not associated yet (more are closed at accept).
    max_pending_per_host: int = 8
    tls: bool = False
    certificate: str = ""
    private_key: str = ""
    trusted_cas: str = ""
    require_client_certificate: bool = False


@dataclass
class WebSettings:
    """The ``[web]`` section: dashboard, ``/metrics`` and health checks."""

    port: int = 8080
    bind_address: str = "127.0.0.1"
    #: Dashboard users: ``{ name, role = "read" | "admin", password_hash }`` (``dicom-node web hash-password``).
    users: list[dict[str, Any]] = field(default_factory=list)
    #: API tokens: ``{ name, role, token_sha256 }``, sent as ``Authorization: Bearer <token>``.
    tokens: list[dict[str, Any]] = field(default_factory=list)
    #: Hours a dashboard login lasts.
    session_hours: float = 12.0
    #: Show patient names and IDs to users with the admin role (never to read-only users).
    show_patient_data: bool = False
    #: Failed logins of one user name within ``login_window_minutes`` that lock it for ``login_lockout_minutes``.
    login_max_failures: int = 5
    #: Failed logins from one client address (any user names) within the window that lock that address.
    login_max_failures_per_address: int = 20
    login_window_minutes: float = 15.0
    login_lockout_minutes: float = 15.0


@dataclass
class AuditSettings:
    """The ``[audit]`` section: the audit log of configuration changes, operator actions and series."""

    #: Days audit events are kept (0: forever).
    retention_days: float = 365.0


@dataclass
class ModelSettings:
    """The ``[models]`` section: where model folders are found and where they run."""

    #: Extra folders holding model folders; the bundled models are always found.
    directories: list[str] = field(default_factory=list)
    #: ``auto`` uses CUDA when torch sees a GPU, the CPU otherwise.
    device: str = "auto"
    #: Keep freed CPU memory for reuse (glibc allocator tuning, see ``dicom_node.denoise.cpu_memory``): CPU inference
    #: about a third faster, at the cost of keeping the peak heap.
    keep_freed_cpu_memory: bool = True


@dataclass
class DerivedSettings:
    """The ``[derived]`` section: how derived series are numbered and named."""

    series_number_offset: int = 1000
    description_suffix: str = " DN"
    #: Transfer syntax of the derived files: ``explicit-vr-little-endian`` or ``rle-lossless``.
    transfer_syntax: str = "explicit-vr-little-endian"
    #: The site's own UID root for derived Series and SOP Instance UIDs ("": pydicom's root
    #: ``1.2.826.0.1.3680043.8.498``).
    uid_root: str = ""


@dataclass
class WorkerSettings:
    """The ``[worker]`` section: the denoising stage."""

    #: Run the denoising worker in ``serve`` (turn off on receive-only hosts).
    enabled: bool = True
    #: Seconds between heartbeats of a running job.
    heartbeat_seconds: float = 10.0
    #: A running job whose heartbeat is older than this is taken up again (its worker died).
    stall_timeout_seconds: float = 120.0
    #: Attempts for a job that fails for a transient reason; a series the model refuses fails at once.
    max_attempts: int = 3
    #: Capped exponential backoff with jitter between attempts: base * 2**(attempt-1), at most
    #: ``backoff_max_seconds``.
    backoff_base_seconds: float = 10.0
    backoff_max_seconds: float = 300.0
    poll_seconds: float = 1.0
    #: A process renews its lease every third of this; once a lease has run out, the process is taken for dead
    #: and the jobs and exports it was running are taken over by the others (or by its successor at start-up).
    lease_seconds: float = 15.0
    #: What a derived series that fails the trust check does: ``send`` (export it, with a warning), ``hold``
    #: (export nothing; the job fails with "held by the trust check" until ``dicom-node jobs retry`` releases it)
    #: or ``send-source`` (export the original series instead).
    trust_policy: str = "send"


@dataclass
class ExportSettings:
    """The ``[export]`` section: sending series to destinations."""

    #: Attempts before an export is marked failed (``dicom-node jobs retry`` starts it again).
    max_attempts: int = 10
    #: Capped exponential backoff with jitter: base * 2**(attempt-1), at most ``backoff_max_seconds``.
    backoff_base_seconds: float = 5.0
    backoff_max_seconds: float = 600.0
    #: An export running without progress for this long is taken up again (its exporter died).
    stall_timeout_seconds: float = 300.0
    poll_seconds: float = 1.0


@dataclass
class RetentionSettings:
    """The ``[retention]`` section: how long received and derived files are kept."""

    #: Days a series that matched no rule stays in the spool (0 = keep forever).
    unrouted_days: float = 7.0
    #: Days a series is kept after all its exports succeeded (0 = keep forever).
    processed_days: float = 7.0


#: Most associations one export opens to a destination at once.
MAX_ASSOCIATIONS_PER_DESTINATION = 8


#: Destination types: ``dimse`` sends by C-STORE, ``dicomweb`` by STOW-RS (PS3.18 10.5).
DESTINATION_TYPES = ("dimse", "dicomweb")
#: Keys a destination of each type must have (checked on the raw table, so a missing one is named as missing).
DESTINATION_REQUIRED_KEYS = {"dimse": ("ae_title", "host", "port"), "dicomweb": ("url",)}
#: Authentication of a ``dicomweb`` destination.
DICOMWEB_AUTH = ("none", "bearer", "basic")


@dataclass
class Destination:
    """One ``[[destinations]]`` table: a peer that receives derived series by C-STORE (``type = "dimse"``, the
    default: ``ae_title``, ``host``, ``port`` required) or by STOW-RS (``type = "dicomweb"``: ``url`` required)."""

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    tls: bool = False
    calling_ae_title: str = ""
    timeout_seconds: float = 30.0
    #: Associations one series is sent over at once (instances are shared out as each association frees up).
    associations: int = 2
    type: str = "dimse"
    #: ``dicomweb``: the service's base URL (``https://pacs/dicom-web``); instances go to ``{url}/studies``.
    url: str = ""
    #: ``dicomweb``: ``none``, ``bearer`` (token from ``token_file`` or ``token_env``) or ``basic``.
    auth: str = "none"
    token_file: str = ""
    token_env: str = ""
    username: str = ""
    password_file: str = ""
    #: ``dicomweb``: PEM bundle of the CA(s) to verify the server with (default: the system's).
    ca_file: str = ""
    verify_tls: bool = True
    #: ``dicomweb``: instances per STOW-RS request.
    batch_size: int = 50


@dataclass
class Rule:
    """One ``[[rules]]`` table: which series to denoise, with which model, and where to send the result."""

    name: str
    match: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    strength: float = 1.0
    destinations: list[str] = field(default_factory=list)
    quiet_seconds: float | None = None
    forward_original: bool = False


@dataclass
class DicomwebSettings:
    """The ``[dicomweb]`` section: STOW-RS (PS3.18 10.5) on the web port, ``POST /dicomweb/studies``."""

    enabled: bool = False
    #: Clients allowed to store: ``{ name, token_sha256 }`` (``Authorization: Bearer``) or
    #: ``{ name, password_hash }`` (HTTP basic, user name = ``name``); ``ae_title`` (default: ``name``, cut to 16
    #: characters) is recorded as the instances' calling AE title, for rules matching ``CallingAETitle``.
    sources: list[dict[str, Any]] = field(default_factory=list)
    #: Largest request body accepted (413 above it); 0: no limit but the disk watermark.
    max_request_gb: float = 4.0


@dataclass
class Config:
    """The whole validated configuration."""

    node: NodeSettings = field(default_factory=NodeSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    web: WebSettings = field(default_factory=WebSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    derived: DerivedSettings = field(default_factory=DerivedSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    dicomweb: DicomwebSettings = field(default_factory=DicomwebSettings)
    destinations: list[Destination] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    #: Where the configuration came from (a path, or ``defaults``).
    source: str = "defaults"

    @property
    def data_path(self) -> Path:
        """The data directory as an absolute path."""
        return Path(self.node.data_dir).expanduser().resolve()

    @property
    def spool_path(self) -> Path:
        return self.data_path / "spool"

    @property
    def outbox_path(self) -> Path:
        return self.data_path / "outbox"

    @property
    def output_path(self) -> Path:
        """Where derived series go when their rule names no destination."""
        return self.data_path / "output"

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL: the configured one, or SQLite in the data directory."""
        if self.node.database_url:
            return self.node.database_url
        return f"sqlite:///{self.data_path / 'dicom-node.sqlite3'}"

    def destination(self, name: str) -> Destination:
        """Return the destination called ``name``; raise ``KeyError`` naming the known ones."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none"
        raise KeyError(f"no destination named {name!r} (configured: {known})")


_SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "security": SecuritySettings,
    "web": WebSettings,
    "models": ModelSettings,
    "derived": DerivedSettings,
    "worker": WorkerSettings,
    "export": ExportSettings,
    "retention": RetentionSettings,
    "audit": AuditSettings,
    "dicomweb": DicomwebSettings,
}

_AE_ALLOWED = re.compile(r"^[\x20-\x7e]*$")


def validate_ae_title(value: str) -> str | None:
    """Return why ``value`` is not a valid AE title (PS3.5 6.2, VR AE), or ``None`` when it is."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not value.strip():
        return "must not be empty or only spaces"
    if len(value) > 16:
        return f"{value!r} is {len(value)} characters long; an AE title has at most 16"
    if "\\" in value:
        return f"{value!r} contains a backslash, which an AE title may not"
    if not _AE_ALLOWED.match(value):
        return f"{value!r} contains control or non-ASCII characters"
    return None


#: TOML tables are checked strictly: "11112" is no integer and ``true`` no number (an integer is a number, though),
#: and a key the dataclass does not have is an error.
_STRICT_TABLE = pydantic.ConfigDict(strict=True, extra="forbid")
#: The pydantic model checking each dataclass's tables, and the dataclass of each model (see :func:`_schema`).
_SCHEMA_OF: dict[type, type[pydantic.BaseModel]] = {}
_DATACLASS_OF: dict[type[pydantic.BaseModel], type] = {}
_T = typing.TypeVar("_T")
_SCALAR_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _is_table(tp: Any) -> typing.TypeGuard[type]:
    """Whether ``tp`` is a dataclass, which a TOML table sets."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _toml_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The fields of dataclass ``cls`` a TOML table may set (not those with ``metadata={"toml": False}``)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("toml", True)}


def _non_none(tp: Any) -> list[Any]:
    """The members of a union other than ``None`` (``[tp]`` for a type that is no union)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def _schema_type(tp: Any) -> Any:
    """``tp`` as the schema checks it: a dataclass by its own schema, a tuple from a TOML array (a list)."""
    if _is_table(tp):
        return _schema(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, [_schema_type(a) for a in args])
    if origin is list:
        return types.GenericAlias(list, (_schema_type(args[0]),))
    if origin is tuple:  # TOML has arrays only: a list is accepted for the tuple, its items stay strict
        inner = types.GenericAlias(tuple, tuple(a if a is Ellipsis else _schema_type(a) for a in args))
        return typing.Annotated[inner, pydantic.Strict(False)]
    return tp


def _schema(cls: type) -> type[pydantic.BaseModel]:
    """The pydantic model that checks a TOML table for dataclass ``cls``: the same keys and types, strictly."""
    if cls in _SCHEMA_OF:
        return _SCHEMA_OF[cls]
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for name, f in _toml_fields(cls).items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        # The dataclass fills in its own defaults: only the keys the table sets are passed on.
        fields[name] = (_schema_type(hints[name]), ... if required else None)
    model = pydantic.create_model(cls.__name__, __config__=_STRICT_TABLE, **fields)
    _SCHEMA_OF[cls], _DATACLASS_OF[model] = model, cls
    return model


def _from_schema(value: Any) -> Any:
    """A validated value with each schema model turned back into its dataclass."""
    if isinstance(value, pydantic.BaseModel):
        cls = _DATACLASS_OF[type(value)]
        return cls(**{name: _from_schema(getattr(value, name)) for name in value.model_fields_set})
    if isinstance(value, list):
        return [_from_schema(v) for v in value]
    return value


def _type_at(cls: type, loc: tuple[int | str, ...]) -> Any:
    """The declared type of the value at pydantic's error location ``loc`` inside dataclass ``cls``."""
    tp: Any = cls
    for part in loc:
        members = _non_none(tp)
        if len(members) != 1:
            break
        tp = members[0]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if _is_table(tp) and isinstance(part, str):
            tp = typing.get_type_hints(tp).get(part, Any)
        elif origin is list or (origin is tuple and args[-1:] == (Ellipsis,)):
            tp = args[0]
        elif origin is tuple and isinstance(part, int) and part < len(args):
            tp = args[part]
        elif origin is dict:
            tp = args[1]
        else:
            break
    return tp


def _type_name(tp: Any, plural: bool = False) -> str:
    """How a message names type ``tp``: ``integer``, ``a list of strings``, ``a table``..."""
    members = _non_none(tp)
    if len(members) != 1:
        return " or ".join(_type_name(a, plural) for a in members)
    tp = members[0]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict or tp is dict or _is_table(tp):
        return "tables" if plural else "a table"
    if origin is list or (origin is tuple and args[-1:] == (Ellipsis,)):
        return ("lists" if plural else "a list") + f" of {_type_name(args[0], plural=True)}"
    if origin is tuple:
        names = {_type_name(a, plural=True) for a in args}
        items = f"{len(args)} {names.pop()}" if len(names) == 1 else ", ".join(_type_name(a) for a in args)
        return ("lists" if plural else "a list") + f" of {items}"
    if tp in _SCALAR_NAMES:
        return _SCALAR_NAMES[tp] + ("s" if plural else "")
    return "values" if plural else "any value"


def _key_path(where: str, loc: tuple[int | str, ...]) -> str:
    """``where`` and ``loc`` as a message names a key: ``security.allowed_hosts[1]``."""
    text = where
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _problem(cls: type, error: Any, where: str) -> str:
    """One of pydantic's errors as the message an administrator reads, naming the key."""
    loc: tuple[int | str, ...] = tuple(error["loc"])
    value = error["input"]
    owner = _type_at(cls, loc[:-1])
    if error["type"] == "extra_forbidden" and _is_table(owner):
        known = ", ".join(sorted(_toml_fields(owner)))
        return f"{_key_path(where, loc)}: unknown key (known keys: {known})"
    if error["type"] == "missing":
        if _is_table(owner):
            return f"{_key_path(where, loc)}: required key is missing"
        loc = loc[:-1]  # an array too short for its tuple: the array is wrong (pydantic's input is the array)
    tp = _type_at(cls, loc)
    return f"{_key_path(where, loc)}: must be {_type_name(tp)}, not {type(value).__name__} ({value!r})"


def build_section(cls: type[_T], raw: Mapping[str, Any], where: str, problems: list[str]) -> _T | None:
    """Build dataclass ``cls`` from the TOML table ``raw``, appending a message per unknown, missing or mistyped key.

    The node's sections and the training configuration are both checked here, by a pydantic schema made from the
    dataclass (strict types; a list is accepted for a tuple); tables of nested dataclasses are checked with them.

    Parameters
    ----------
    cls
        The dataclass; its fields are the known keys, those without a default the required ones.
    raw
        The table as TOML gives it.
    where
        How messages name the table (``node``, ``destinations[2]``; ``""`` for the file's top level).
    problems
        Each problem is appended as ``"{where}.{key}: why"``.

    Returns
    -------
    The dataclass built from the keys that are right (the others keep their defaults, so later checks see the rest),
    or ``None`` when a required key is missing or wrong.
    """
    schema = _schema(cls)
    try:
        return typing.cast(_T, _from_schema(schema.model_validate(dict(raw))))
    except pydantic.ValidationError as exc:
        errors = exc.errors()
    problems.extend(_problem(cls, error, where) for error in errors)
    bad = {error["loc"][0] for error in errors if error["loc"]}
    try:
        return typing.cast(_T, _from_schema(schema.model_validate({k: v for k, v in raw.items() if k not in bad})))
    except pydantic.ValidationError:
        return None  # a required key is missing or wrong: reported above


def _check_port(value: int, key: str, problems: list[str], allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        problems.append(f"{key}: {value} is out of range {low}-65535")


def _check_data_dir(path_text: str, problems: list[str]) -> None:
    path = Path(path_text).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        problems.append(f"node.data_dir: {path_text!r} cannot be created: {probe} is not a directory")
    elif not os.access(probe, os.W_OK | os.X_OK):
        problems.append(f"node.data_dir: {path_text!r} is not writable (checked {probe})")


def _check_rule(rule: Rule, where: str, destination_names: set[str], problems: list[str]) -> None:
    for key, value in rule.match.items():
        if key not in RULE_MATCH_KEYS:
            problems.append(f"{where}.match.{key}: unknown match key (known: {', '.join(sorted(RULE_MATCH_KEYS))})")
            continue
        if key == "SliceThickness":
            ok = (
                isinstance(value, list)
                and len(value) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                and value[0] <= value[1]
            )
            if not ok:
                problems.append(
                    f"{where}.match.SliceThickness: must be [min, max] in mm with min <= max, not {value!r}")
            continue
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) for v in values):
            problems.append(f"{where}.match.{key}: must be a string or a list of strings, not {value!r}")
            continue
        if key in RULE_REGEX_KEYS:
            for pattern in values:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    problems.append(f"{where}.match.{key}: {pattern!r} is not a valid regular expression ({exc})")
    if not rule.model and not rule.forward_original:
        problems.append(f"{where}: names no model and does not forward the original; it would do nothing")
    if not 0.0 <= rule.strength <= 1.0:
        problems.append(f"{where}.strength: {rule.strength} is outside [0, 1]")
    if rule.quiet_seconds is not None and rule.quiet_seconds < 0:
        problems.append(f"{where}.quiet_seconds: must not be negative")
    for dest in rule.destinations:
        if dest not in destination_names:
            known = ", ".join(sorted(destination_names)) or "none configured"
            problems.append(f"{where}.destinations: {dest!r} is not a configured destination ({known})")


#: Bind addresses that listen on every interface (so they overlap with any other address).
_WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::", "*"})


def _check_port_clash(cfg: Config, problems: list[str]) -> None:
    """The dashboard and the DICOM port are both TCP: the same port on overlapping addresses cannot work."""
    node, web = cfg.node, cfg.web
    if not web.port or web.port != node.port:
        return
    a, b = node.bind_address.strip(), web.bind_address.strip()
    if a in _WILDCARD_ADDRESSES or b in _WILDCARD_ADDRESSES or a == b:
        problems.append(f"web.port: {web.port} is node.port too, on overlapping addresses (web.bind_address "
                        f"{b!r}, node.bind_address {a!r}); give the dashboard another port, or 0 to turn it off")


#: Dashboard roles: ``read`` sees everything but patient data; ``admin`` may also retry, cancel and echo.
WEB_ROLES = ("read", "admin")
_PASSWORD_HASH = re.compile(r"^pbkdf2_sha256\$\d+\$[0-9a-f]+\$[0-9a-f]{64}$")


def _check_web(cfg: Config, problems: list[str]) -> None:
    if cfg.web.session_hours <= 0:
        problems.append("web.session_hours: must be positive")
    for key in ("login_max_failures", "login_max_failures_per_address"):
        if getattr(cfg.web, key) < 1:
            problems.append(f"web.{key}: must be at least 1")
    for key in ("login_window_minutes", "login_lockout_minutes"):
        if getattr(cfg.web, key) <= 0:
            problems.append(f"web.{key}: must be positive")
    names: set[str] = set()
    for kind, secret_key, pattern in (("users", "password_hash", _PASSWORD_HASH),
                                      ("tokens", "token_sha256", re.compile(r"^[0-9a-f]{64}$"))):
        for i, entry in enumerate(getattr(cfg.web, kind)):
            where = f"web.{kind}[{i}]"
            unknown = set(entry) - {"name", "role", secret_key}
            if unknown:
                problems.append(
                    f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: name, role, {secret_key})")
            name = entry.get("name")
            if not isinstance(name, str) or not name.strip():
                problems.append(f"{where}.name: must be a non-empty string")
            elif name in names:
                problems.append(f"{where}.name: {name!r} is used by another user or token")
            else:
                names.add(name)
            if entry.get("role", "read") not in WEB_ROLES:
                problems.append(f"{where}.role: {entry.get('role')!r} is not one of {', '.join(WEB_ROLES)}")
            secret = entry.get(secret_key)
            if not isinstance(secret, str) or not pattern.match(secret):
                hint = ("make one with `dicom-node web hash-password`" if kind == "users"
                        else "the sha256 hex digest of the token (`dicom-node web new-token`)")
                problems.append(f"{where}.{secret_key}: missing or malformed ({hint})")


def _validate(cfg: Config, problems: list[str]) -> None:
    node = cfg.node
    if (why := validate_ae_title(node.ae_title)) is not None:
        problems.append(f"node.ae_title: {why}")
    _check_port(node.port, "node.port", problems)
    _check_port(cfg.web.port, "web.port", problems, allow_zero=True)
    _check_port_clash(cfg, problems)
    if node.max_associations < 1:
        problems.append(f"node.max_associations: must be at least 1, not {node.max_associations}")
    if node.min_free_disk_gb < 0:
        problems.append("node.min_free_disk_gb: must not be negative")
    if node.max_pdu_size != 0 and node.max_pdu_size < 4096:
        problems.append(f"node.max_pdu_size: {node.max_pdu_size} is below 4096 bytes (0 means no limit)")
    if node.quiet_seconds < 0:
        problems.append("node.quiet_seconds: must not be negative")
    if node.network_timeout <= 0:
        problems.append("node.network_timeout: must be positive")
    if not 0 < node.association_request_timeout <= 300:
        problems.append(f"node.association_request_timeout: must be more than 0 and at most 300 seconds, "
                        f"not {node.association_request_timeout}")
    if node.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        problems.append(f"node.log_level: {node.log_level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    if node.database_url and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", node.database_url):
        problems.append(f"node.database_url: {node.database_url!r} is not a sqlite:// or postgresql:// URL")
    _check_data_dir(node.data_dir, problems)

    sec = cfg.security
    for i, title in enumerate(sec.allowed_calling_ae_titles):
        if (why := validate_ae_title(title)) is not None:
            problems.append(f"security.allowed_calling_ae_titles[{i}]: {why}")
    if sec.max_pending_per_host < 1:
        problems.append(f"security.max_pending_per_host: must be at least 1, not {sec.max_pending_per_host}")
    for i, host in enumerate(sec.allowed_hosts):
        try:
            ipaddress.ip_network(host, strict=False)
        except ValueError:
            problems.append(f"security.allowed_hosts[{i}]: {host!r} is not an IP address or CIDR network")
    if sec.tls:
        for key in ("certificate", "private_key"):
            value = getattr(sec, key)
            if not value:
                problems.append(f"security.{key}: required when security.tls is true")
            elif not Path(value).is_file():
                problems.append(f"security.{key}: file {value!r} does not exist")
        if sec.require_client_certificate and not sec.trusted_cas:
            problems.append("security.trusted_cas: required when require_client_certificate is true")
        if sec.trusted_cas and not Path(sec.trusted_cas).is_file():
            problems.append(f"security.trusted_cas: file {sec.trusted_cas!r} does not exist")

    if cfg.models.device not in {"auto", "cpu", "cuda"} and not re.match(r"^cuda:\d+$", cfg.models.device):
        problems.append(f"models.device: {cfg.models.device!r} is not auto, cpu, cuda or cuda:N")
    if cfg.derived.transfer_syntax not in {"explicit-vr-little-endian", "rle-lossless"}:
        problems.append(
            f"derived.transfer_syntax: {cfg.derived.transfer_syntax!r} is not explicit-vr-little-endian or rle-lossless"
        )
    if not 1 <= cfg.derived.series_number_offset <= 100000:
        problems.append("derived.series_number_offset: must be between 1 and 100000")
    if cfg.derived.uid_root and not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", cfg.derived.uid_root):
        problems.append(f"derived.uid_root: {cfg.derived.uid_root!r} is not a UID root "
                        "(digits and dots, e.g. 1.2.826.0.1.3680043.10.1234)")
    elif len(cfg.derived.uid_root) > 40:
        problems.append(
            "derived.uid_root: at most 40 characters (the node appends up to 23 digits; UIDs have at most 64)")
    if not 3.0 <= cfg.worker.lease_seconds <= 600.0:
        problems.append("worker.lease_seconds: must be between 3 and 600")

    for key in ("heartbeat_seconds", "stall_timeout_seconds", "poll_seconds", "backoff_base_seconds",
                "backoff_max_seconds"):
        if getattr(cfg.worker, key) <= 0:
            problems.append(f"worker.{key}: must be positive")
    if cfg.worker.trust_policy not in {"send", "hold", "send-source", "off"}:
        problems.append("worker.trust_policy: must be send, hold, send-source or off")
    if cfg.worker.stall_timeout_seconds < 3 * cfg.worker.heartbeat_seconds:
        problems.append("worker.stall_timeout_seconds: must be at least three heartbeats")
    for key in ("backoff_base_seconds", "backoff_max_seconds", "stall_timeout_seconds", "poll_seconds"):
        if getattr(cfg.export, key) <= 0:
            problems.append(f"export.{key}: must be positive")
    _check_web(cfg, problems)
    _check_dicomweb(cfg, problems)
    if cfg.audit.retention_days < 0:
        problems.append("audit.retention_days: must not be negative (0 keeps events forever)")
    for section in ("worker", "export"):
        if getattr(cfg, section).max_attempts < 1:
            problems.append(f"{section}.max_attempts: must be at least 1")
        if getattr(cfg, section).backoff_max_seconds < getattr(cfg, section).backoff_base_seconds:
            problems.append(f"{section}.backoff_max_seconds: must be at least {section}.backoff_base_seconds")
    names: set[str] = set()
    for i, dest in enumerate(cfg.destinations):
        where = f"destinations[{i}]"
        if dest.name in names:
            problems.append(f"{where}.name: {dest.name!r} is used by another destination")
        if dest.name == LOCAL_DESTINATION:
            problems.append(f"{where}.name: {LOCAL_DESTINATION!r} is reserved for the local output folder")
        names.add(dest.name)
        if dest.type != "dimse":
            if dest.type == "dicomweb" and dest.url:  # (a missing url or an unknown type is reported already)
                from dicom_node.dicomweb.stow_send import destination_problems  # noqa: PLC0415 - cycle: stow_send imports config

                problems.extend(destination_problems(dest, where))
            continue
        if (why := validate_ae_title(dest.ae_title)) is not None:
            problems.append(f"{where}.ae_title: {why}")
        if dest.calling_ae_title and (why := validate_ae_title(dest.calling_ae_title)) is not None:
            problems.append(f"{where}.calling_ae_title: {why}")
        _check_port(dest.port, f"{where}.port", problems)
        if not 1 <= dest.associations <= MAX_ASSOCIATIONS_PER_DESTINATION:
            problems.append(f"{where}.associations: must be 1 to {MAX_ASSOCIATIONS_PER_DESTINATION}, "
                            f"not {dest.associations}")
        if not dest.host:
            problems.append(f"{where}.host: must not be empty")
    rule_names: set[str] = set()
    for i, rule in enumerate(cfg.rules):
        where = f"rules[{i}]"
        if rule.name in rule_names:
            problems.append(f"{where}.name: {rule.name!r} is used by another rule")
        rule_names.add(rule.name)
        _check_rule(rule, where, names, problems)


def _destination_keys_present(raw: Mapping[str, Any], where: str, problems: list[str]) -> bool:
    """Report the keys a destination of its ``type`` needs but lacks; ``False`` when any is missing."""
    kind = raw.get("type", "dimse")
    if kind not in DESTINATION_TYPES:
        problems.append(f"{where}.type: {kind!r} is not one of {', '.join(DESTINATION_TYPES)}")
        return False
    missing = [key for key in DESTINATION_REQUIRED_KEYS[kind] if key not in raw]
    for key in missing:
        problems.append(f"{where}.{key}: required key is missing" + (" (type dicomweb)" if kind != "dimse" else ""))
    return not missing


def _check_dicomweb(cfg: Config, problems: list[str]) -> None:
    """``[dicomweb]``: each source has a name and one well-formed secret; enabled needs at least one source."""
    dw = cfg.dicomweb
    if dw.max_request_gb < 0:
        problems.append("dicomweb.max_request_gb: must not be negative (0: no limit)")
    if dw.enabled and not dw.sources:
        problems.append("dicomweb.sources: dicomweb.enabled is true but no source may store; add "
                        "{ name, token_sha256 } (`dicom-node web new-token`) or { name, password_hash }")
    if dw.enabled and not cfg.web.port:
        problems.append("dicomweb.enabled: STOW-RS is served on web.port, which is 0 (off)")
    names: set[str] = set()
    secrets = {"token_sha256": re.compile(r"^[0-9a-f]{64}$"), "password_hash": _PASSWORD_HASH}
    for i, entry in enumerate(dw.sources):
        where = f"dicomweb.sources[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a table {{ name, token_sha256 | password_hash }}")
            continue
        unknown = set(entry) - {"name", "ae_title", *secrets}
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                            f"(known: name, ae_title, token_sha256, password_hash)")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip() or ":" in name:
            problems.append(f"{where}.name: must be a non-empty string without ':'")
        elif name in names:
            problems.append(f"{where}.name: {name!r} is used by another source")
        else:
            names.add(name)
        given = [key for key in secrets if key in entry]
        if len(given) != 1:
            problems.append(f"{where}: needs exactly one of token_sha256 (bearer token: `dicom-node web new-token`)"
                            f" or password_hash (HTTP basic: `dicom-node web hash-password`)")
        for key in given:
            if not isinstance(entry[key], str) or not secrets[key].match(entry[key]):
                problems.append(f"{where}.{key}: malformed")
        if "ae_title" in entry and (why := validate_ae_title(entry["ae_title"])) is not None:
            problems.append(f"{where}.ae_title: {why}")


def parse_env_value(text: str) -> Any:
    """Read an environment override as a TOML value when it is one, else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str], problems: list[str]) -> None:
    """Apply ``DICOM_NODE_<SECTION>__<KEY>`` variables from ``environ`` to the raw table ``raw``."""
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX):]:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        if section not in _SECTIONS:
            problems.append(f"{name}: unknown section {section!r} (known: {', '.join(_SECTIONS)})")
            continue
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            continue
        table[key] = parse_env_value(text)


def config_from_mapping(raw: Mapping[str, Any], source: str = "configuration",
                        environ: Mapping[str, str] | None = None, *, check_models: bool = False) -> Config:
    """Validate a parsed TOML table (plus environment overrides) into a :class:`Config`.

    ``check_models`` also checks each rule against the models the node can load (:mod:`dicom_node.denoise.model_check`:
    the model exists, fits the rule's modality and body parts, allows its strength); ``config check``, ``rules
    test`` and ``serve`` ask for it, other commands do not need it.

    Raises
    ------
    ConfigError
        Listing every problem found, each naming its key.
    """
    problems: list[str] = []
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    apply_env_overrides(raw, os.environ if environ is None else environ, problems)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{key}: must be a table ([{key}]), not {type(value).__name__}")
                continue
            kwargs[key] = build_section(_SECTIONS[key], value, key, problems)
        elif key in ("destinations", "rules"):
            item_cls = Destination if key == "destinations" else Rule
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                problems.append(f"{key}: must be an array of tables ([[{key}]])")
                continue
            items = [build_section(item_cls, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
            if key == "destinations":
                # A C-STORE destination without its address is dropped, as before types existed; the others stay
                # (skipped by the checks), so the destinations after them keep their index in the messages.
                items = [item if _destination_keys_present(v, f"{key}[{i}]", problems)
                         or v.get("type", "dimse") != "dimse" else None
                         for i, (v, item) in enumerate(zip(value, items))]
            kwargs[key] = [item for item in items if item is not None]
        else:
            known = ", ".join([*_SECTIONS, "destinations", "rules"])
            problems.append(f"{key}: unknown section (known: {known})")
    cfg = Config(**{k: v for k, v in kwargs.items() if v is not None}, source=source)
    _validate(cfg, problems)
    if check_models:
        from dicom_node.denoise.model_check import model_problems  # noqa: PLC0415 - cycle: model_check imports config

        problems.extend(model_problems(cfg))
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None, *,
                check_models: bool = False) -> Config:
    """Load and validate the configuration file at ``path`` (defaults only when ``None``).

    ``check_models``: see :func:`config_from_mapping`.

    Relative ``data_dir`` paths are taken relative to the current directory, like every command-line tool.

    Raises
    ------
    ConfigError
        When the file is missing, is not TOML, or any key is invalid.
    """
    if path is None:
        return config_from_mapping({}, "defaults", environ, check_models=check_models)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read {p}: {exc.strerror or exc}"], str(p)) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(p)) from exc
    return config_from_mapping(raw, str(p), environ, check_models=check_models)


def example_config_text() -> str:
    """Return the annotated example configuration (also ``deploy/dicom-node.example.toml``)."""
    return resources.files("dicom_node").joinpath("example.toml").read_text(encoding="utf-8")
