"""Core commands: ``serve``, ``config check|example``, ``echo`` and ``status``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from dicom_node.cli import CommandError, add_config_argument, config_from_args, existing_database, setup_logging
from dicom_node.config import example_config_text, load_config
from dicom_node.store.database import utcnow


def _cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.ops.service import parse_roles, serve  # noqa: PLC0415 - CLI handler: --help stays light

    try:
        roles = parse_roles(args.role or ["all"])
    except ValueError as exc:
        raise CommandError(str(exc), 2) from exc
    # Processes that route series (receive) or run models (worker) refuse rules whose model cannot run: every
    # job of such a rule would fail. Export- and web-only processes never use a model.
    cfg = config_from_args(args, check_models=bool(roles & {"receive", "worker"}))
    setup_logging(cfg.node.log_level)
    return serve(cfg, roles)


def _cmd_config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.file, check_models=True)
    print(f"{args.file}: valid ({len(cfg.destinations)} destination(s), {len(cfg.rules)} rule(s); "
          f"AE title {cfg.node.ae_title} on port {cfg.node.port}, data in {cfg.data_path})")
    return 0


def _cmd_config_example(_args: argparse.Namespace) -> int:
    sys.stdout.write(example_config_text())
    return 0


def _cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node.export.exporter import echo_destination  # noqa: PLC0415 - CLI handler: --help stays light

    cfg = config_from_args(args)
    try:
        dest = cfg.destination(args.destination)
    except KeyError as exc:
        raise CommandError(exc.args[0], 2) from exc
    ok, text = echo_destination(cfg, dest)
    print(text)
    return 0 if ok else 1


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from dicom_node.ops.probe import probe_node  # noqa: PLC0415 - CLI handler: --help stays light
    from dicom_node.store.repository import status_counts  # noqa: PLC0415 - CLI handler: --help stays light

    probe = probe_node(cfg)
    if not args.json:
        print(f"node:    {probe.line()}")
    from dicom_node.store.overview import failures, unrouted_series  # noqa: PLC0415 - CLI handler: --help stays light

    with existing_database(cfg) as engine, engine.connect() as conn:
        counts = status_counts(conn)
        problems = failures(conn, limit=20, now=utcnow())
        unrouted = unrouted_series(conn, limit=10)
    disk = shutil.disk_usage(cfg.data_path)
    report: dict[str, Any] = {
        "node": {"running": probe.running, "web": probe.web, "dicom": probe.dicom},
        "series": counts.series,
        "jobs": counts.jobs,
        "exports": counts.exports,
        "instances": counts.instances,
        "stored_bytes": counts.stored_bytes,
        "problems": [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in p.items()} for p in problems],
        "not_routed": [{"series_uid": u.series_uid, "modality": u.modality, "description": u.series_description,
                        "reason": u.route_note} for u in unrouted],
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
    if problems:
        print("problems (newest first):")
        for p in problems:
            described = " / ".join(d for d in (p["study_description"], p["series_description"]) if d) or p["series_uid"]
            when = (f", next try in {_duration(p['next_attempt_seconds'])}" if p["state"] == "retrying" else "")
            print(f"  {p['kind']} {p['id']} {p['state']} {p['what']}: {described} ({p['attempts']} tries{when})")
            if p["error"]:
                print(f"    {p['error'][:200]}")
    if unrouted:
        print("series not routed (kept for retention.unrouted_days):")
        for u in unrouted:
            print(f"  {u.modality or '?'} {u.series_description or u.series_uid}: {u.route_note}")
    return 0


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _age(when: dt.datetime | None, now: dt.datetime) -> str:
    if when is None:
        return "-"
    seconds = (now - when).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _cmd_jobs_list(args: argparse.Namespace) -> int:
    from dicom_node.store.overview import (  # noqa: PLC0415 - CLI handler: --help stays light
        recent_exports,
        recent_jobs,
        unrouted_series,
    )

    cfg = config_from_args(args)
    now = utcnow()
    with existing_database(cfg) as engine, engine.connect() as conn:
        jobs = recent_jobs(conn, args.state, args.limit)
        exports = recent_exports(conn, args.state, args.limit)
        unrouted = unrouted_series(conn, limit=args.limit)
    print(f"{'JOB':>6} {'STATE':10} {'AGE':>5} {'TRIES':>5} {'RULE':12} {'MODEL':16} SERIES / LAST ERROR")
    for job in jobs:
        series_uid = job.series_uid
        print(f"{job.id:>6} {job.state.value:10} {_age(job.created_at, now):>5} {job.attempts:>5} "
              f"{job.rule[:12]:12} {job.model[:16]:16} {series_uid} v{job.version}")
        if job.last_error and job.state.value != "succeeded":
            print(f"{'':>6} {job.last_error[:200]}")
    print()
    print(f"{'EXPORT':>6} {'STATE':10} {'AGE':>5} {'TRIES':>5} {'DESTINATION':12} {'SENT':>9} SERIES / LAST ERROR")
    for exp in exports:
        total = exp.sent_count + exp.failed_count
        print(f"{exp.id:>6} {exp.state.value:10} {_age(exp.created_at, now):>5} {exp.attempts:>5} "
              f"{exp.destination[:12]:12} {f'{exp.sent_count}/{total}':>9} {exp.series_uid}"
              + (f" (job {exp.job_pk})" if exp.job_pk else " (original)"))
        if exp.last_error and exp.state.value != "succeeded":
            retrying = exp.state.value in ("queued", "running") and exp.attempts > 0
            due = f"retrying, next try in {_duration(max(0.0, (exp.not_before - now).total_seconds()))}: " \
                if retrying else ""
            print(f"{'':>6} {due}{exp.last_error[:200]}")
    if unrouted and not args.state:
        print()
        print(f"{'SERIES':>6} {'AGE':>5} {'MODALITY':8} NOT ROUTED: DESCRIPTION / REASON")
        for u in unrouted:
            print(f"{u.id:>6} {_age(u.completed_at, now):>5} {u.modality[:8]:8} "
                  f"{u.series_description or u.series_uid}: {u.route_note}")
    return 0


def _cmd_jobs_show(args: argparse.Namespace) -> int:
    from dicom_node.store.overview import export_detail, job_detail  # noqa: PLC0415 - CLI handler: --help stays light

    cfg = config_from_args(args)
    with existing_database(cfg) as engine, engine.connect() as conn:
        if args.kind == "job":
            found = job_detail(conn, args.id)
            if found is None:
                raise CommandError(f"no job {args.id}")
            row, series, exports = found
            fields = {"job": row.id, "state": row.state.value, "series": series.series_uid,
                      "modality": series.modality, "description": series.series_description,
                      "version": row.version, "rule": row.rule, "model": row.model, "strength": row.strength,
                      "attempts": row.attempts, "worker": row.worker_id, "created": row.created_at,
                      "started": row.started_at, "finished": row.finished_at, "heartbeat": row.heartbeat_at,
                      "derived series": row.output_series_uid or "-", "last error": row.last_error or "-",
                      "trust": _trust_line(row),
                      "exports": ", ".join(f"{e.id} to {e.destination}: {e.state.value}" for e in exports) or "-"}
        else:
            exported = export_detail(conn, args.id)
            if exported is None:
                raise CommandError(f"no export {args.id}")
            row, items = exported
            failed = [i for i in items if i.status not in (0x0000, 0xB000, 0xB006, 0xB007)]
            fields = {"export": row.id, "state": row.state.value, "series": row.series_uid,
                      "job": row.job_pk or "- (original series)", "destination": row.destination,
                      "attempts": row.attempts, "instances": len(items), "accepted": len(items) - len(failed),
                      "created": row.created_at, "finished": row.finished_at, "last error": row.last_error or "-"}
            for item in failed[:20]:
                code = "no answer" if item.status is None else f"0x{item.status:04X}"
                fields[f"  {item.sop_instance_uid}"] = f"{code} {item.error}".strip()
    width = max(len(k) for k in fields)
    for key, value in fields.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _trust_line(job: Any) -> str:
    """``fail 0.00 (edge_ratio 4.12, bias 0.3, blob_z 3.1): edge_ratio 4.12 (fail at 3)`` or ``-``."""
    if not job.trust_verdict:
        return "-"
    try:
        detail = json.loads(job.trust_detail or "{}")
    except ValueError:
        detail = {}
    checks = detail.get("checks", {})
    numbers = ", ".join(f"{k} {checks[k]:g}" for k in ("edge_ratio", "bias", "blob_z") if k in checks)
    reasons = "; ".join(detail.get("reasons", []))
    score = f" {job.trust_score:.2f}" if job.trust_score is not None else ""
    return f"{job.trust_verdict}{score}" + (f" ({numbers})" if numbers else "") + (f": {reasons}" if reasons else "")


def _cmd_jobs_action(args: argparse.Namespace) -> int:
    from dicom_node.store import audit  # noqa: PLC0415 - CLI handler: --help stays light
    from dicom_node.store.overview import state_of  # noqa: PLC0415 - CLI handler: --help stays light
    from dicom_node.store.queue import cancel, retry  # noqa: PLC0415 - CLI handler: --help stays light

    cfg = config_from_args(args)
    action = retry if args.action == "retry" else cancel
    with existing_database(cfg) as engine, engine.begin() as conn:
        changed = action(conn, args.kind, args.id, utcnow())
        if changed:
            audit.record(conn, f"{args.kind}.{args.action}", audit.cli_actor(), utcnow(), object_kind=args.kind,
                         object_id=args.id)
        else:  # why not, for the message below
            state = state_of(conn, args.kind, args.id)
    if not changed:
        if state is None:
            print(f"dicom-node: no {args.kind} {args.id}", file=sys.stderr)
        else:
            allowed = "a failed or cancelled" if args.action == "retry" else "a queued, running or failed"
            print(f"dicom-node: {args.kind} {args.id} is {getattr(state, 'value', state)}; only {allowed} "
                  f"{args.kind} can be {'retried' if args.action == 'retry' else 'cancelled'}", file=sys.stderr)
        return 1
    print(f"{args.kind} {args.id}: {'queued again' if args.action == 'retry' else 'cancelled'}")
    return 0


def _cmd_rules_test(args: argparse.Namespace) -> int:
    from pydicom import dcmread  # noqa: PLC0415 - CLI handler: pydicom only for `route`

    from dicom_node.assemble.routing import SeriesAttributes, explain, route  # noqa: PLC0415 - CLI handler: --help stays light
    from dicom_node.denoise.model_check import available_models, rule_model_problems  # noqa: PLC0415 - CLI handler: --help stays light
    from dicom_node.receive.receiver import extract_facts  # noqa: PLC0415 - CLI handler: --help stays light

    cfg = config_from_args(args)
    models = available_models(cfg.models.directories)
    # Checked here rather than at loading, so that the rules are still explained when a model is wrong.
    rule_problems = {rule.name: rule_model_problems(rule, f"rules[{i}]", models) for i, rule in enumerate(cfg.rules)}
    seen: dict[str, tuple[SeriesAttributes, int, str]] = {}
    root = Path(args.path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
            facts = extract_facts(ds, str(ds.file_meta.get("TransferSyntaxUID", "")), args.calling, cfg.node.ae_title)
        except Exception:
            continue
        if facts.series_uid in seen:
            attrs, count, label = seen[facts.series_uid]
            seen[facts.series_uid] = (attrs, count + 1, label)
            continue
        attrs = SeriesAttributes.from_row(facts)
        label = f"{facts.modality} #{facts.series_number} {facts.series_description!r}"
        seen[facts.series_uid] = (attrs, 1, label)
    if not seen:
        raise CommandError(f"no DICOM series found in {root}")
    for series_uid, (attrs, count, label) in seen.items():
        print(f"series {series_uid} ({label}, {count} file(s)):")
        for line in explain(cfg.rules, attrs):
            print(line)
        decision = route(cfg.rules, attrs)
        if decision.rule is not None:
            for problem in rule_problems.get(decision.rule.name, []):
                print(f"  !! {problem}")
    problems = [p for found in rule_problems.values() for p in found]
    if problems:
        print(f"dicom-node: {len(problems)} problem(s) with the rules' models; `config check` and `serve` refuse "
              "this configuration:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve``, ``config``, ``echo`` and ``status``."""
    p = subparsers.add_parser("serve", help="run the node (receive, assemble, denoise, export)")
    add_config_argument(p)
    p.add_argument("--role", action="append", metavar="ROLE",
                   help="run only these stages: receive, worker, export, web (repeat or comma-separate; "
                        "default all)")
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

    p = subparsers.add_parser("jobs", help="list, show, retry or cancel denoising jobs and exports")
    jobs_sub = p.add_subparsers(dest="jobs_command", metavar="ACTION")
    jobs_sub.required = True
    c = jobs_sub.add_parser("list", help="recent jobs and exports with their state and last error")
    c.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    c.add_argument("--limit", type=int, default=20)
    add_config_argument(c)
    c.set_defaults(handler=_cmd_jobs_list)
    for action, helptext in (("show", "everything about one job or export"),
                             ("retry", "queue a failed or cancelled job or export again"),
                             ("cancel", "cancel a queued, running or failed job or export")):
        c = jobs_sub.add_parser(action, help=helptext)
        c.add_argument("id", type=int, metavar="ID")
        c.add_argument("--export", dest="kind", action="store_const", const="export", default="job",
                       help="ID is an export, not a job")
        add_config_argument(c)
        c.set_defaults(handler=_cmd_jobs_show if action == "show" else _cmd_jobs_action, action=action)

    p = subparsers.add_parser("rules", help="test routing rules against DICOM files")
    rules_sub = p.add_subparsers(dest="rules_command", metavar="ACTION")
    rules_sub.required = True
    c = rules_sub.add_parser("test", help="show, per series in PATH, which rule matches and why others do not")
    c.add_argument("path", metavar="PATH")
    c.add_argument("--calling", default="", help="calling AE title to assume (rules may match on it)")
    add_config_argument(c)
    c.set_defaults(handler=_cmd_rules_test)

    p = subparsers.add_parser("status", help="series, jobs and exports per state, and disk use")
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_cmd_status)
