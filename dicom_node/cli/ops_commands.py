"""Operator commands: ``db migrate-to``, ``db upgrade``, ``audit``, ``health``, ``web hash-password``,
``web new-token`` and ``web unlock``."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import logging
import os
import secrets
import sys
from importlib import resources
from pathlib import Path

from dicom_node.cli import CommandError, add_config_argument, config_from_args, existing_database, setup_logging
from dicom_node.config import WEB_ROLES
from dicom_node.ops.config_edit import USER_NAME, ConfigEditError, add_web_user
from dicom_node.store.database import make_engine, migrate, schema_version, utcnow

LOGGER = logging.getLogger(__name__)


def _cmd_db_migrate_to(args: argparse.Namespace) -> int:
    from dicom_node.store.copy import CopyRefused, copy_database  # noqa: PLC0415 - CLI handler: --help stays light

    cfg = config_from_args(args)
    setup_logging("WARNING")
    source_url = args.source or cfg.database_url
    if source_url == args.url:
        raise CommandError("source and target are the same database", 2)
    source, target = make_engine(source_url), make_engine(args.url)
    try:
        copied = copy_database(source, target)
    except CopyRefused as exc:
        raise CommandError(str(exc)) from exc
    finally:
        source.dispose()
        target.dispose()
    for table, count in copied.items():
        print(f"{table:18} {count:>9} row(s)")
    print(f"copied to {args.url.split('@')[-1]}; now set node.database_url to it and start the node")
    return 0


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if not cfg.node.database_url:
        cfg.data_path.mkdir(parents=True, exist_ok=True)
    engine = make_engine(cfg.database_url)
    migrate(engine)
    print(f"schema at {schema_version(engine)}")
    engine.dispose()
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from dicom_node.store import audit  # noqa: PLC0415 - CLI handler: --help stays light

    cfg = config_from_args(args)
    since = utcnow() - dt.timedelta(hours=args.hours) if args.hours else None
    with existing_database(cfg) as engine, engine.connect() as conn:
        events = audit.query(conn, since=since, action=args.action, actor=args.actor, uid=args.uid,
                             limit=args.limit)
    if args.json:
        print(json.dumps([dict(e._mapping) for e in events], default=str, indent=1))
        return 0
    rows = []
    for e in reversed(events):
        obj = f"{e.object_kind} {e.object_id}" if e.object_id is not None else (e.object_kind or "-")
        rows.append((f"{e.at:%Y-%m-%d %H:%M:%S}", e.actor, e.action, obj, e.series_uid or "-", e.detail[:160]))
    if not rows:
        return 0
    # Columns as wide as their longest value: actors such as host:pid:worker must not be cut off.
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(" ".join(f"{value:{width}}" for value, width in zip(row, widths)) + f" {row[4]} {row[5]}")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    from dicom_node.ops.probe import ask_web, web_url  # noqa: PLC0415 - CLI handler: --help stays light

    url = args.url
    if not url:
        cfg = config_from_args(args)
        url = web_url(cfg, "/readyz" if args.ready else "/healthz")
    answer = ask_web(url, args.timeout)
    if not answer.reachable:
        raise CommandError(f"node not reachable at {url}: {answer.reason}")
    checks = answer.checks()
    try:
        for name, check in checks.items():
            print(f"{name:9} {'ok' if check['ok'] else 'PROBLEM':8} {check['detail']}")
    except (TypeError, KeyError):
        checks = {}
    if not checks:
        print(answer.body.decode(errors="replace")[:500])
    return 0 if answer.healthy else 1


def _cmd_hash_password(args: argparse.Namespace) -> int:
    from dicom_node.web.auth import hash_password  # noqa: PLC0415 - CLI handler: --help stays light

    password = _read_new_password(args.stdin)
    if password is None:
        return 1
    print(hash_password(password))
    return 0


def _read_new_password(from_stdin: bool) -> str | None:
    """A new password from standard input or asked twice; ``None`` after saying why it is refused."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("dicom-node: the passwords differ", file=sys.stderr)
            return None
    if len(password) < 8:
        print("dicom-node: use at least 8 characters", file=sys.stderr)
        return None
    return password


def _cmd_add_user(args: argparse.Namespace) -> int:
    from dicom_node.web.auth import hash_password  # noqa: PLC0415 - CLI handler: --help stays light

    path = args.config or os.environ.get("DICOM_NODE_CONFIG")
    if not path:
        raise CommandError("name the configuration file to add the user to: --config FILE", 2)
    if not USER_NAME.match(args.name):  # before asking for a password
        print(f"dicom-node: {args.name!r} is not a user name: 1-64 letters, digits, '.', '_', '@' or '-'",
              file=sys.stderr)
        return 2
    password = _read_new_password(args.password_stdin)
    if password is None:
        return 1
    example = Path(str(resources.files("dicom_node").joinpath("example.toml")))
    try:
        backup = add_web_user(path, args.name, args.role, hash_password(password), refuse=example)
    except ConfigEditError as exc:
        raise CommandError(str(exc)) from exc
    print(f"added {args.role} user {args.name!r} to {path} (the previous file is {backup}); "
          "the dashboard accepts the login once the node is started (or restarted) with this file")
    return 0


def _cmd_new_token(_args: argparse.Namespace) -> int:
    from dicom_node.web.auth import token_digest  # noqa: PLC0415 - CLI handler: --help stays light

    token = secrets.token_urlsafe(32)
    print(f"token (give it to the client; it is not stored): {token}")
    print(f"token_sha256 (put it in [web] tokens):           {token_digest(token)}")
    return 0


def _cmd_unlock(args: argparse.Namespace) -> int:
    from dicom_node.store import audit, throttle  # noqa: PLC0415 - CLI handler: --help stays light

    if bool(args.user) == bool(args.address):
        raise CommandError("name a user or give --address ADDRESS", 2)
    kind, subject = (throttle.ADDRESS, args.address) if args.address else (throttle.USER, args.user)
    cfg = config_from_args(args)
    now = utcnow()
    with existing_database(cfg) as engine, engine.begin() as conn:
        was_locked = throttle.unlock(conn, kind, subject, now)
        audit.record(conn, "login.unlocked", audit.cli_actor(), now, object_kind="login",
                     detail=f"{kind} {subject}" + ("" if was_locked else " (was not locked; failures cleared)"))
    print(f"{kind} {subject!r} {'unlocked' if was_locked else 'was not locked; its failed logins are cleared'}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``db``, ``audit`` and ``web``."""
    p = subparsers.add_parser("db", help="database maintenance: upgrade the schema, copy to PostgreSQL")
    sub = p.add_subparsers(dest="db_command", metavar="ACTION")
    sub.required = True
    c = sub.add_parser("migrate-to", help="copy the job table into an empty database (e.g. SQLite to PostgreSQL)")
    c.add_argument("url", metavar="URL", help="target, e.g. postgresql+psycopg://node:secret@db/dicom_node")
    c.add_argument("--source", metavar="URL", help="source database (default: the configured one)")
    add_config_argument(c)
    c.set_defaults(handler=_cmd_db_migrate_to)
    c = sub.add_parser("upgrade", help="create or upgrade the schema of the configured database")
    add_config_argument(c)
    c.set_defaults(handler=_cmd_db_upgrade)

    p = subparsers.add_parser("audit", help="show the audit log (logins, actions, configuration, series)")
    p.add_argument("--action", help="action or its prefix, e.g. series. or export.retry")
    p.add_argument("--actor", help="exact actor, e.g. user:alice")
    p.add_argument("--uid", help="a Series or Study Instance UID")
    p.add_argument("--hours", type=float, default=0, help="only the last N hours")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    add_config_argument(p)
    p.set_defaults(handler=_cmd_audit)

    p = subparsers.add_parser("health", help="ask a running node's /healthz (or /readyz); exit 0 when healthy")
    p.add_argument("--ready", action="store_true", help="ask /readyz: also disk and models")
    p.add_argument("--url", help="the endpoint (default: from web.port and web.bind_address)")
    p.add_argument("--timeout", type=float, default=10.0)
    add_config_argument(p)
    p.set_defaults(handler=_cmd_health)

    p = subparsers.add_parser("web", help="dashboard credentials")
    sub = p.add_subparsers(dest="web_command", metavar="ACTION")
    sub.required = True
    c = sub.add_parser("hash-password", help="print the password_hash of a [web] users entry")
    c.add_argument("--stdin", action="store_true", help="read the password from standard input")
    c.set_defaults(handler=_cmd_hash_password)
    c = sub.add_parser("add-user", help="add a dashboard user to the configuration file's [web] users",
                       description="Ask for the password twice (or read it from standard input) and add "
                                   "{ name, role, password_hash } to [web] users of FILE. The rest of the file is "
                                   "kept as it is, comments included; the previous file is kept as FILE.bak.")
    c.add_argument("name", metavar="NAME", help="the login name")
    c.add_argument("--role", choices=list(WEB_ROLES), required=True,
                   help="read: sees everything but patient data; admin: may also retry, cancel and C-ECHO")
    c.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input (for scripts)")
    add_config_argument(c)
    c.set_defaults(handler=_cmd_add_user)
    c = sub.add_parser("new-token", help="make an API token and print its token_sha256")
    c.set_defaults(handler=_cmd_new_token)
    c = sub.add_parser("unlock", help="lift the lock-out of a user (or --address) after too many failed logins")
    c.add_argument("user", nargs="?", metavar="USER", help="the user name whose logins are locked")
    c.add_argument("--address", metavar="ADDRESS", help="unlock this client address instead")
    add_config_argument(c)
    c.set_defaults(handler=_cmd_unlock)
