"""Core commands: ``serve``, ``config check|example``, ``echo`` and ``status``."""

from __future__ import annotations

import argparse
import json
import shutil
import ssl
import sys

from dicom_node.cli import add_config_argument, config_from_args, setup_logging
from dicom_node.config import Config, Destination, example_config_text, load_config


def _cmd_serve(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    setup_logging(cfg.node.log_level)
    from dicom_node.service import serve

    return serve(cfg)


def _cmd_config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.file)
    print(f"{args.file}: valid ({len(cfg.destinations)} destination(s), {len(cfg.rules)} rule(s); "
          f"AE title {cfg.node.ae_title} on port {cfg.node.port}, data in {cfg.data_path})")
    return 0


def _cmd_config_example(_args: argparse.Namespace) -> int:
    sys.stdout.write(example_config_text())
    return 0


def _client_ssl_context(cfg: Config) -> ssl.SSLContext:
    sec = cfg.security
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=sec.trusted_cas or None)
    if sec.certificate and sec.private_key:
        context.load_cert_chain(sec.certificate, sec.private_key)
    return context


def echo_destination(cfg: Config, dest: Destination) -> tuple[bool, str]:
    """C-ECHO ``dest`` (PS3.4 A.4); return whether it answered success and a one-line description."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=dest.calling_ae_title or cfg.node.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_seconds
    tls_args = (_client_ssl_context(cfg), dest.host) if dest.tls else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no connection"
        return False, f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): association failed ({why})"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code == 0x0000:
        return True, f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): C-ECHO success"
    shown = f"0x{code:04X}" if code is not None else "no response"
    return False, f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): C-ECHO failed ({shown})"


def _cmd_echo(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        dest = cfg.destination(args.destination)
    except KeyError as exc:
        print(f"dicom-node: {exc.args[0]}", file=sys.stderr)
        return 2
    ok, text = echo_destination(cfg, dest)
    print(text)
    return 0 if ok else 1


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from dicom_node.store.database import make_engine, schema_version
    from dicom_node.store.repository import status_counts

    if not cfg.data_path.is_dir():
        print(f"dicom-node: data directory {cfg.data_path} does not exist (has the node run yet?)", file=sys.stderr)
        return 1
    engine = make_engine(cfg.database_url)
    if schema_version(engine) is None:
        print(f"dicom-node: no database at {cfg.database_url} (has the node run yet?)", file=sys.stderr)
        return 1
    with engine.connect() as conn:
        counts = status_counts(conn)
    engine.dispose()
    disk = shutil.disk_usage(cfg.data_path)
    report = {
        "series": counts.series,
        "jobs": counts.jobs,
        "exports": counts.exports,
        "instances": counts.instances,
        "stored_bytes": counts.stored_bytes,
        "disk": {"path": str(cfg.data_path), "free_bytes": disk.free, "total_bytes": disk.total,
                 "watermark_bytes": int(cfg.node.min_free_disk_gb * 1024**3)},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    gib = 1024**3
    print(f"instances stored: {counts.instances} ({counts.stored_bytes / 1024**2:.1f} MiB)")
    print("series:  " + ", ".join(f"{k} {v}" for k, v in counts.series.items()))
    print("jobs:    " + ", ".join(f"{k} {v}" for k, v in counts.jobs.items()))
    print("exports: " + ", ".join(f"{k} {v}" for k, v in counts.exports.items()))
    low = " (BELOW WATERMARK: C-STORE is refused)" if disk.free < report["disk"]["watermark_bytes"] else ""
    print(f"disk:    {disk.free / gib:.1f} GiB free of {disk.total / gib:.1f} GiB in {cfg.data_path}{low}")
    return 0


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``serve``, ``config``, ``echo`` and ``status``."""
    p = subparsers.add_parser("serve", help="run the node (receive, assemble, denoise, export)")
    add_config_argument(p)
    p.set_defaults(handler=_cmd_serve)

    p = subparsers.add_parser("config", help="check a configuration file or print the annotated example")
    config_sub = p.add_subparsers(dest="config_command", metavar="ACTION")
    config_sub.required = True
    c = config_sub.add_parser("check", help="validate FILE without starting the node")
    c.add_argument("file", metavar="FILE")
    c.set_defaults(handler=_cmd_config_check)
    c = config_sub.add_parser("example", help="print the annotated example configuration")
    c.set_defaults(handler=_cmd_config_example)

    p = subparsers.add_parser("echo", help="C-ECHO a configured destination")
    p.add_argument("destination", metavar="DESTINATION", help="destination name from the configuration")
    add_config_argument(p)
    p.set_defaults(handler=_cmd_echo)

    p = subparsers.add_parser("status", help="series, jobs and exports per state, and disk use")
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_cmd_status)
