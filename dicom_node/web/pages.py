"""HTML of the dashboard: plain server-rendered pages, no JavaScript needed, every value escaped."""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
from collections.abc import Iterable
from typing import Any

from dicom_node import __version__
from dicom_node.web.auth import Principal

LOGGER = logging.getLogger(__name__)

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{background:#223;color:#fff;padding:.6em 1em;display:flex;flex-wrap:wrap;gap:1em;align-items:center}
header a{color:#cde} header .who{margin-left:auto}
main{padding:1em;display:grid;grid-template-columns:minmax(0,1fr);gap:1em}
section{background:#fff;border-radius:6px;padding:.8em 1em;box-shadow:0 1px 2px #0002;min-width:0;overflow-x:auto}
h2{font-size:1.05em;margin:.2em 0 .6em}
table{border-collapse:collapse;font-size:.9em;max-width:100%} td,th{padding:.25em .6em;
border-bottom:1px solid #e3e3e3;text-align:left;vertical-align:top;overflow-wrap:break-word} .num{text-align:right}
table.wide{width:100%} table.fixed{table-layout:fixed}
.ok{color:#176b1e}.bad{color:#a11}.warn{color:#a15c00;font-weight:600}.state-failed{color:#a11;font-weight:600}.state-succeeded{color:#176b1e}
.state-running{color:#a60}.state-queued{color:#555}.state-retrying{color:#a60;font-weight:600}
.trust{font-size:.9em}.trust-pass{color:#176b1e}.trust-warn{color:#a15c00;font-weight:600}
.trust-fail{color:#a11;font-weight:600}
img.preview{display:block;width:100%;height:auto;image-rendering:pixelated}
.timings{font-size:.9em;line-height:1.3} .timings span,.nowrap{white-space:nowrap}
.wrap,code{overflow-wrap:anywhere} .detail{overflow-wrap:anywhere;font-size:.9em}
.detail div{padding-left:1em;text-indent:-1em}
.msg{background:#ffe;border:1px solid #dd8;padding:.4em .8em;border-radius:4px;overflow-wrap:anywhere}
form.inline{display:inline} button{cursor:pointer} code{font-size:.85em}
textarea{width:100%;box-sizing:border-box;font-family:monospace;font-size:.85em}
.columns{display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:1.5em} h3{font-size:1em;margin:.4em 0}
pre{white-space:pre-wrap}
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
    admin = '<a href="/admin">Admin</a>' if principal is not None and principal.is_admin else ""
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    msg = f'<p class="msg" id="message">{esc(message)}</p>' if message else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}<title>{esc(title)}</title>'
            f'<style>{STYLE}</style></head><body><header><strong>dicom-node {esc(__version__)}</strong>'
            f'<span>{esc(node_title)}</span><a href="/">Dashboard</a><a href="/rules">Rules tester</a>'
            f'<a href="/audit">Audit log</a><a href="/metrics">Metrics</a>'
            f'{admin}{who}</header>'
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


def table(headers: Iterable[str], rows: Iterable[str], table_id: str = "", widths: Iterable[str] = (),
          css_class: str = "") -> str:
    """A table; ``widths`` (CSS widths, "" for free columns) fix the columns and make it as wide as its section."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    ident = f' id="{esc(table_id)}"' if table_id else ""
    widths = list(widths)
    cols = ""
    if widths:
        cols = "<colgroup>" + "".join(f'<col style="width:{w}">' if w else "<col>" for w in widths) + "</colgroup>"
        css_class = f"{css_class} wide fixed".strip()
    klass = f' class="{css_class}"' if css_class else ""
    return f"<table{ident}{klass}>{cols}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _action_buttons(principal: Principal, kind: str, key: int, actions: Iterable[str]) -> str:
    if not principal.is_admin:
        return '<span title="the admin role may retry or cancel">-</span>'
    out = []
    for action in actions:
        out.append(f'<form class="inline" method="post" action="/actions/{action}">{csrf_field(principal)}'
                   f'<input type="hidden" name="kind" value="{kind}"><input type="hidden" name="id" value="{key}">'
                   f'<button id="{action}-{kind}-{key}" type="submit">{action.capitalize()}</button></form>')
    return " ".join(out)


#: How a health check's state is shown (degraded: works, but needs attention, e.g. a destination failing).
_HEALTH_TEXT = {"ok": "OK", "degraded": "DEGRADED", "failed": "PROBLEM"}
_HEALTH_CLASS = {"ok": "ok", "degraded": "warn", "failed": "bad"}


def dashboard(ctx: dict[str, Any], principal: Principal, show_patient: bool) -> str:
    """The main page: health, queues, failures, recent series with previews, destinations."""
    now = ctx["now"]
    parts = []
    checks = "".join(
        f'<tr id="health-{esc(c.name)}"><td>{esc(c.name)}</td><td class="{_HEALTH_CLASS[c.state]}">'
        f'{_HEALTH_TEXT[c.state]}</td><td>{esc(c.detail)}</td></tr>' for c in ctx["checks"])
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
        retrying = f.get("state") == "retrying"
        state = (f'<span class="warn">retrying</span>, next try in {duration(f.get("next_attempt_seconds"))}'
                 if retrying else '<span class="bad">failed</span>')
        described = " / ".join(esc(d) for d in (f.get("study_description"), f.get("series_description")) if d)
        series = (f'{described or esc(f.get("modality") or "series")}<br>'
                  f'<code class="uid" title="{esc(f["series_uid"])}">{esc(f["series_uid"])}</code>')
        # A retrying export is not failed yet: "Retry" tries it now; Cancel gives up on it.
        frows.append(f'<tr id="failure-{f["kind"]}-{f["id"]}"><td>{f["kind"]} {f["id"]}<br>{state}</td>'
                     f'<td>{series}</td><td>{esc(f["what"])}</td>'
                     f'<td class="num">{f["attempts"]}</td><td>{age(f["at"], now)}</td>'
                     f'<td class="{"warn" if retrying else "bad"}">{esc(f["error"][:300])}</td>'
                     f'<td class="nowrap">{_action_buttons(principal, f["kind"], f["id"], ("retry", "cancel"))}'
                     f'</td></tr>')
    failures = (table(["what", "series", "", "tries", "age", "reason", ""], frows, "failures", css_class="wide")
                if frows
                else '<p id="no-failures">No failed or retrying jobs and exports.</p>')
    parts.append(f'<section><h2>Failed and retrying jobs and exports</h2>{failures}</section>')

    srows = []
    for s in ctx["series"]:
        patient = (f"<br>{esc(s.patient_name)} ({esc(s.patient_id)})" if show_patient else "")
        t = s.timings
        # Two short lines: each "stage time" pair stays together, the pairs wrap as the column allows.
        timings = ('<div class="timings" title="time spent receiving, waiting for the quiet time, queued, '
                   'denoising">' + " ".join(f"<span>{stage} {duration(t[stage])}</span>"
                                          for stage in ("receive", "quiet", "queue", "denoise")) + "</div>")
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
        if s.trust_verdict and s.job_id:
            score = f" {s.trust_score:.2f}" if s.trust_score is not None else ""
            preview += (f'<div class="trust trust-{esc(s.trust_verdict)}" id="trust-{s.job_id}" title="trust check: '
                        f'is what the model removed only noise? (dicom-node jobs show job {s.job_id})">'
                        f'trust: {esc(s.trust_verdict)}{score}</div>')
        srows.append(f'<tr id="series-{esc(s.series_uid)}"><td>{age(s.received_at, now)}</td>'
                     f'<td>{esc(s.modality)} {esc(s.description)}{patient}<br><code>{esc(s.series_uid)}</code></td>'
                     f'<td class="num">{s.instances}</td><td class="wrap">{esc(s.rule or "-")}</td>'
                     f'<td class="wrap">{esc(s.model or "-")}</td><td class="wrap">{job}</td><td>{timings}</td>'
                     f'<td class="wrap">{dests}</td><td>{preview}</td></tr>')
    series = (table(["age", "series", "images", "rule", "model", "job", "timings", "destinations",
                     "before | after | difference"], srows, "series",
                    widths=["4.2em", "", "5.4em", "7%", "8%", "8.5%", "12.5em", "11%", "28%"]) if srows
              else "<p>No series received yet.</p>")
    parts.append(f'<section><h2>Last series</h2>{series}</section>')

    drows = []
    for d in ctx["destinations"]:
        button = "-"
        if principal.is_admin:
            button = (f'<form class="inline" method="post" action="/actions/echo">{csrf_field(principal)}'
                      f'<input type="hidden" name="destination" value="{esc(d.name)}">'
                      f'<button id="echo-{esc(d.name)}" type="submit">'
                      f'{"QIDO-RS" if d.type == "dicomweb" else "C-ECHO"}</button></form>')
        where = (f"STOW-RS {esc(d.url)}" if d.type == "dicomweb"
                 else f"{esc(d.ae_title)}@{esc(d.host)}:{d.port}{' (TLS)' if d.tls else ''}")
        drows.append(f'<tr><td>{esc(d.name)}</td><td class="wrap">{where}</td><td>{button}</td></tr>')
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


def detail_html(detail: str, limit: int = 600) -> str:
    """An audit event's detail as readable text: a JSON object becomes one ``key: value`` line per key (lists
    comma-separated, tables as ``key value`` pairs); anything else is shown as it is. Escaped; long text cut."""
    text = detail.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            lines = []
            for key, value in data.items():
                if isinstance(value, list):
                    shown = ", ".join(str(v) for v in value) or "none"
                elif isinstance(value, dict):
                    shown = ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
                else:
                    shown = str(value)
                lines.append(f"<div><b>{esc(key)}:</b> {esc(shown[:limit])}</div>")
            return "".join(lines)
    return esc(text[:limit])


def audit_page(events: list[Any], now: dt.datetime, filters: dict[str, str]) -> str:
    rows = [f'<tr><td class="nowrap">{esc(e.at.strftime("%Y-%m-%d %H:%M:%S"))}</td>'
            f'<td class="wrap">{esc(e.actor)}</td><td class="nowrap">{esc(e.action)}</td>'
            f'<td class="nowrap">{esc(e.object_kind)} {esc(e.object_id if e.object_id is not None else "")}</td>'
            f'<td><code>{esc(e.series_uid)}</code></td><td class="detail">{detail_html(e.detail)}</td></tr>'
            for e in events]
    form = (f'<form method="get" action="/audit">action <input name="action" value="{esc(filters.get("action", ""))}" '
            f'placeholder="series."> actor <input name="actor" value="{esc(filters.get("actor", ""))}"> UID '
            f'<input name="uid" value="{esc(filters.get("uid", ""))}"> <button type="submit">Filter</button></form>')
    events_table = table(["time", "actor", "action", "object", "series", "detail"], rows, "audit",
                         widths=["11.5em", "14%", "10em", "7em", "22%", ""])
    return f'<section><h2>Audit log (UTC)</h2>{form}{events_table}</section>'


def admin_page(principal: Principal, locks: list[Any], now: dt.datetime, editor: dict[str, Any],
               choices: list[Any], tested: tuple[list[str], str] | None = None) -> str:
    """The admin role's page: reload the configuration, edit rules and destinations beside the rules tester,
    and the lock-outs of dashboard logins (with Unlock buttons)."""
    csrf = csrf_field(principal)
    problems = ""
    if editor["problems"]:
        items = "".join(f"<li>{esc(problem)}</li>" for problem in editor["problems"])
        problems = f'<ul class="bad" id="config-problems">{items}</ul>'
    reload_form = (f'<form class="inline" method="post" action="/actions/reload">{csrf}'
                   f'<button id="reload-config" type="submit">Reload from the file</button></form>')
    if editor["source"] == "defaults":
        config = (f'<section><h2>Configuration</h2>{problems}<p>The node runs on built-in defaults (no '
                  f'<code>--config</code> file): there is nothing to reload or edit.</p></section>')
    else:
        options = "".join(f'<option value="{c.id}">{esc(c.modality)} {esc(c.series_description)} '
                          f'({esc(c.series_uid[-24:])})</option>' for c in choices)
        result = ""
        if tested is not None:
            lines = "\n".join(esc(line) for line in tested[0])
            result = f'<h3>Result for {esc(tested[1])}</h3><pre id="rules-result" class="wrap">{lines}</pre>'
        config = (
            f'<section><h2>Configuration</h2><p>File <code>{esc(editor["source"])}</code> {reload_form} '
            f'(also <code>kill -HUP</code> the node). Rules, destinations, quiet times, models, derived-series '
            f'naming, retention and web users and tokens take effect at once; ports, addresses, the data '
            f'directory, the database and TLS files need a restart.</p>{problems}'
            f'<div class="columns"><div><h3>Rules and destinations</h3>'
            f'<form id="config-form" method="post" action="/admin/config" enctype="multipart/form-data">{csrf}'
            f'<input type="hidden" name="digest" value="{esc(editor["digest"])}">'
            f'<textarea id="config-toml" name="toml" rows="28" spellcheck="false">{esc(editor["text"])}</textarea>'
            f'<p><button id="save-config" type="submit">Check, save and reload</button> The file is checked as '
            f'<code>dicom-node config check</code> does, written with a backup beside it, then reloaded.</p>'
            f'</form></div><div><h3>Rules tester</h3><p>Which of the rules in the editor (saved or not) would '
            f'route a series, and why the others do not.</p>'
            f'<p><label>A received series <select id="series-pick" name="series" form="config-form">'
            f'<option value="">-</option>{options}</select></label></p>'
            f'<p><label>or a DICOM file <input id="upload" type="file" name="file" form="config-form"></label></p>'
            f'<p><label>calling AE title <input name="calling" size="16" form="config-form"></label></p>'
            f'<p><button id="test-edited-rules" type="submit" form="config-form" formaction="/rules">Test</button>'
            f'</p>{result}</div></div></section>')
    rows = []
    for lock in locks:
        button = (f'<form class="inline" method="post" action="/actions/unlock">{csrf}'
                  f'<input type="hidden" name="kind" value="{esc(lock.kind)}">'
                  f'<input type="hidden" name="subject" value="{esc(lock.subject)}">'
                  f'<button id="unlock-{esc(lock.kind)}-{esc(lock.subject)}" type="submit">Unlock</button></form>')
        rows.append(f'<tr><td>{esc(lock.kind)}</td><td class="wrap">{esc(lock.subject)}</td>'
                    f'<td>{esc(lock.until.strftime("%Y-%m-%d %H:%M:%S"))} (in {age(now, lock.until)})</td>'
                    f'<td>{button}</td></tr>')
    locked = (table(["", "locked", "until (UTC)", ""], rows, "locks") if rows
              else '<p id="no-locks">No user or address is locked out.</p>')
    return (f'{config}<section><h2>Locked logins</h2><p>Too many failed logins lock a user name or a client '
            f'address (<code>web.login_max_failures</code>, <code>web.login_max_failures_per_address</code>); '
            f'<code>dicom-node web unlock NAME</code> does the same as Unlock.</p>{locked}</section>')
