"""HTML of the dashboard: plain server-rendered pages, no JavaScript needed, every value escaped."""

from __future__ import annotations

import datetime as dt
import html
import logging
from typing import Any, Iterable

from dicom_node import __version__
from dicom_node.web.auth import Principal

LOGGER = logging.getLogger(__name__)

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{background:#223;color:#fff;padding:.6em 1em;display:flex;gap:1em;align-items:center}
header a{color:#cde} header .who{margin-left:auto}
main{padding:1em;display:grid;gap:1em}
section{background:#fff;border-radius:6px;padding:.8em 1em;box-shadow:0 1px 2px #0002;overflow-x:auto}
h2{font-size:1.05em;margin:.2em 0 .6em}
table{border-collapse:collapse;font-size:.9em} td,th{padding:.25em .6em;border-bottom:1px solid #e3e3e3;
text-align:left;vertical-align:top} .num{text-align:right}
.ok{color:#176b1e}.bad{color:#a11}.state-failed{color:#a11;font-weight:600}.state-succeeded{color:#176b1e}
.state-running{color:#a60}.state-queued{color:#555} img.preview{height:12em;max-width:40em;image-rendering:pixelated}
.msg{background:#ffe;border:1px solid #dd8;padding:.4em .8em;border-radius:4px}
form.inline{display:inline} button{cursor:pointer} code{font-size:.85em}
"""


def esc(value: Any) -> str:
    """HTML-escape any value (``None`` shows as a dash)."""
    return "-" if value is None else html.escape(str(value), quote=True)


def age(when: dt.datetime | None, now: dt.datetime) -> str:
    """A short age such as ``42s``, ``5m``, ``3h``, ``2d``."""
    if when is None:
        return "-"
    return duration((now - when).total_seconds())


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def csrf_field(principal: Principal) -> str:
    return f'<input type="hidden" name="csrf_token" value="{esc(principal.csrf)}">'


def layout(title: str, body: str, principal: Principal | None, node_title: str, message: str = "",
           refresh: int | None = None) -> str:
    """The page frame: header with navigation and the logged-in user."""
    who = ""
    if principal is not None:
        who = (f'<span class="who">{esc(principal.name)} ({esc(principal.role)})</span>'
               f'<form class="inline" method="post" action="/logout">{csrf_field(principal)}'
               f'<button id="logout" type="submit">Log out</button></form>')
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    msg = f'<p class="msg" id="message">{esc(message)}</p>' if message else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}<title>{esc(title)}</title>'
            f'<style>{STYLE}</style></head><body><header><strong>dicom-node {esc(__version__)}</strong>'
            f'<span>{esc(node_title)}</span><a href="/">Dashboard</a><a href="/rules">Rules tester</a>'
            f'<a href="/audit">Audit log</a><a href="/metrics">Metrics</a>{who}</header>'
            f'<main>{msg}{body}</main></body></html>')


def login_page(error: str = "", next_url: str = "/") -> str:
    err = f'<p class="bad" id="login-error">{esc(error)}</p>' if error else ""
    body = (f'<section style="max-width:22em"><h2>Log in</h2>{err}<form method="post" action="/login">'
            f'<input type="hidden" name="next" value="{esc(next_url)}">'
            f'<p><label>User<br><input id="username" name="username" autocomplete="username"></label></p>'
            f'<p><label>Password<br><input id="password" name="password" type="password" '
            f'autocomplete="current-password"></label></p>'
            f'<p><button id="login" type="submit">Log in</button></p></form></section>')
    return layout("Log in - dicom-node", body, None, "")


def table(headers: Iterable[str], rows: Iterable[str], table_id: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _action_buttons(principal: Principal, kind: str, key: int, actions: Iterable[str]) -> str:
    if not principal.is_admin:
        return '<span title="the admin role may retry or cancel">-</span>'
    out = []
    for action in actions:
        out.append(f'<form class="inline" method="post" action="/actions/{action}">{csrf_field(principal)}'
                   f'<input type="hidden" name="kind" value="{kind}"><input type="hidden" name="id" value="{key}">'
                   f'<button id="{action}-{kind}-{key}" type="submit">{action.capitalize()}</button></form>')
    return " ".join(out)


def dashboard(ctx: dict[str, Any], principal: Principal, show_patient: bool) -> str:
    """The main page: health, queues, failures, recent series with previews, destinations."""
    now = ctx["now"]
    parts = []
    checks = "".join(
        f'<tr id="health-{esc(c.name)}"><td>{esc(c.name)}</td><td class="{"ok" if c.ok else "bad"}">'
        f'{"OK" if c.ok else "PROBLEM"}</td><td>{esc(c.detail)}</td></tr>' for c in ctx["checks"])
    parts.append(f'<section><h2>Node health</h2>{table(["check", "state", "detail"], [checks])}</section>')

    summary = ctx["summary"]
    rows = []
    for name in ("series", "jobs", "exports"):
        counts = ", ".join(f'<span class="state-{esc(k)}">{esc(k)} <b id="count-{name}-{esc(k)}">{v}</b></span>'
                           for k, v in summary[name].items())
        extra = ""
        if name != "series":
            one = name[:-1]
            queued = summary[f"oldest_queued_{one}_seconds"] if summary[name]["queued"] else None
            running = summary[f"oldest_running_{one}_seconds"] if summary[name]["running"] else None
            extra = f"oldest queued {duration(queued)}, oldest running {duration(running)}"
        rows.append(f"<tr><td>{name}</td><td>{counts}</td><td>{extra}</td></tr>")
    parts.append(f'<section><h2>Queues</h2>{table(["", "by state", "ages"], rows, "queues")}</section>')

    frows = []
    for f in ctx["failures"]:
        frows.append(f'<tr id="failure-{f["kind"]}-{f["id"]}"><td>{f["kind"]} {f["id"]}</td>'
                     f'<td><code>{esc(f["series_uid"])}</code></td><td>{esc(f["what"])}</td>'
                     f'<td class="num">{f["attempts"]}</td><td>{age(f["at"], now)}</td>'
                     f'<td class="bad">{esc(f["error"][:300])}</td>'
                     f'<td>{_action_buttons(principal, f["kind"], f["id"], ("retry", "cancel"))}</td></tr>')
    failures = (table(["what", "series", "", "tries", "age", "reason", ""], frows, "failures") if frows
                else '<p id="no-failures">No failed jobs or exports.</p>')
    parts.append(f'<section><h2>Failed jobs and exports</h2>{failures}</section>')

    srows = []
    for s in ctx["series"]:
        patient = (f"<br>{esc(s.patient_name)} ({esc(s.patient_id)})" if show_patient else "")
        t = s.timings
        timings = (f"receive {duration(t['receive'])}<br>quiet {duration(t['quiet'])}<br>"
                   f"queue {duration(t['queue'])}<br>denoise {duration(t['denoise'])}")
        dests = "<br>".join(
            f'<span id="export-{e["id"]}" class="state-{esc(e["state"])}">{esc(e["destination"])}: '
            f'{esc(e["state"])} ({e["sent"]}/{e["sent"] + e["failed"]}, {e["attempts"]} tries'
            f'{", " + duration(e["seconds"]) if e["seconds"] is not None else ""})</span>'
            for e in s.exports) or "-"
        job = (f'<span class="state-{esc(s.job_state)}" id="job-state-{s.job_id}">job {s.job_id} {esc(s.job_state)}'
               f'</span>' if s.job_id else esc(s.route_note or "forwarded"))
        preview = "-"
        if s.job_id and s.job_id in ctx["previews"]:
            preview = (f'<a href="/preview/{s.job_id}.png"><img class="preview" id="preview-{s.job_id}" '
                       f'src="/preview/{s.job_id}.png" alt="before, after and difference of the middle slice">'
                       f'</a>')
        srows.append(f'<tr id="series-{esc(s.series_uid)}"><td>{age(s.received_at, now)}</td>'
                     f'<td>{esc(s.modality)} {esc(s.description)}{patient}<br><code>{esc(s.series_uid)}</code></td>'
                     f'<td class="num">{s.instances}</td><td>{esc(s.rule or "-")}</td><td>{esc(s.model or "-")}</td>'
                     f'<td>{job}</td><td>{timings}</td><td>{dests}</td><td>{preview}</td></tr>')
    series = (table(["age", "series", "images", "rule", "model", "job", "timings", "destinations",
                     "before | after | difference"], srows, "series") if srows
              else "<p>No series received yet.</p>")
    parts.append(f'<section><h2>Last series</h2>{series}</section>')

    drows = []
    for d in ctx["destinations"]:
        button = "-"
        if principal.is_admin:
            button = (f'<form class="inline" method="post" action="/actions/echo">{csrf_field(principal)}'
                      f'<input type="hidden" name="destination" value="{esc(d.name)}">'
                      f'<button id="echo-{esc(d.name)}" type="submit">C-ECHO</button></form>')
        drows.append(f"<tr><td>{esc(d.name)}</td><td>{esc(d.ae_title)}@{esc(d.host)}:{d.port}"
                     f"{' (TLS)' if d.tls else ''}</td><td>{button}</td></tr>")
    parts.append(f'<section><h2>Destinations</h2>'
                 f'{table(["name", "AE title @ host:port", ""], drows, "destinations") if drows else "None."}'
                 f'</section>')
    return "".join(parts)


def rules_page(principal: Principal, choices: list[Any], result: list[str] | None, label: str = "") -> str:
    options = "".join(f'<option value="{c.id}">{esc(c.modality)} {esc(c.series_description)} '
                      f'({esc(c.series_uid[-24:])})</option>' for c in choices)
    out = ""
    if result is not None:
        lines = "\n".join(esc(line) for line in result)
        out = f'<section><h2>Result for {esc(label)}</h2><pre id="rules-result">{lines}</pre></section>'
    body = (f'<section><h2>Rules tester</h2><p>Which rule would route a series, and why the others do not.</p>'
            f'<form method="post" action="/rules" enctype="multipart/form-data">{csrf_field(principal)}'
            f'<p><label>A received series <select id="series-pick" name="series"><option value="">-</option>'
            f'{options}</select></label></p>'
            f'<p><label>or a DICOM file <input id="upload" type="file" name="file"></label> '
            f'<label>calling AE title <input name="calling" size="16"></label></p>'
            f'<p><button id="test-rules" type="submit">Test</button></p></form></section>{out}')
    return body


def audit_page(events: list[Any], now: dt.datetime, filters: dict[str, str]) -> str:
    rows = [f'<tr><td>{esc(e.at.strftime("%Y-%m-%d %H:%M:%S"))}</td><td>{esc(e.actor)}</td><td>{esc(e.action)}</td>'
            f'<td>{esc(e.object_kind)} {esc(e.object_id if e.object_id is not None else "")}</td>'
            f'<td><code>{esc(e.series_uid)}</code></td><td>{esc(e.detail[:300])}</td></tr>' for e in events]
    form = (f'<form method="get" action="/audit">action <input name="action" value="{esc(filters.get("action", ""))}" '
            f'placeholder="series."> actor <input name="actor" value="{esc(filters.get("actor", ""))}"> UID '
            f'<input name="uid" value="{esc(filters.get("uid", ""))}"> <button type="submit">Filter</button></form>')
    return (f'<section><h2>Audit log (UTC)</h2>{form}'
            f'{table(["time", "actor", "action", "object", "series", "detail"], rows, "audit")}</section>')
