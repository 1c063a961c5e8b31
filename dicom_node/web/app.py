"""The dashboard's WSGI application: routes, login, roles, CSRF, actions and the JSON API.

Open without login: ``/login``, ``/metrics``, ``/healthz``, ``/readyz`` (they carry no patient data). Every other
page needs a session (or a bearer token); API requests that fail to authenticate get 401 with a ``Bearer``
challenge, browsers the login page. Actions (retry, cancel, C-ECHO, unlock, reload, saving rules and destinations on
the admin page) are ``POST`` only, need the admin role and the session's CSRF token, and are written to the audit
log with the user as actor. Answers are HTML for browsers and JSON for clients that send
``Accept: application/json``.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import json
import logging
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable
from http import HTTPStatus
from io import BytesIO
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from pydicom import dcmread

from dicom_node.assemble.routing import SeriesAttributes, explain
from dicom_node.config import ConfigError, config_from_mapping
from dicom_node.denoise.worker import PREVIEW_NAME
from dicom_node.dicomweb.stow_receive import StowService, is_stow_path
from dicom_node.export.exporter import echo_destination
from dicom_node.ops.health import liveness, overall_state, run_checks
from dicom_node.ops.metrics import exposition
from dicom_node.ops.reload import (
    EditRefused,
    edited_file_text,
    file_digest,
    reload_node,
    rules_and_destinations_toml,
    save_rules_and_destinations,
)
from dicom_node.receive.receiver import extract_facts
from dicom_node.store import audit, throttle
from dicom_node.store.database import utcnow
from dicom_node.store.overview import (
    failures,
    queue_summary,
    recent_series,
    series_choices,
    series_row,
    series_uid_of,
)
from dicom_node.store.queue import cancel, retry
from dicom_node.web import pages
from dicom_node.web.auth import Authenticator, Principal, csrf_ok

LOGGER = logging.getLogger(__name__)

SESSION_COOKIE = "dicom_node_session"
MAX_BODY = 64 * 1024 * 1024
class Request:
    """The parts of a WSGI request the handlers use."""

    def __init__(self, environ: dict[str, Any]) -> None:
        self.environ = environ
        self.method = environ["REQUEST_METHOD"].upper()
        self.path = environ.get("PATH_INFO", "/") or "/"
        self.query = {k: v[-1] for k, v in urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).items()}
        self._form: dict[str, Any] | None = None

    def header(self, name: str) -> str:
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"), "")

    @property
    def wants_json(self) -> bool:
        return "application/json" in self.header("Accept")

    def cookie(self, name: str) -> str | None:
        for part in self.environ.get("HTTP_COOKIE", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return None

    def form(self) -> dict[str, Any]:
        """URL-encoded or multipart form fields; files come as ``(filename, bytes)``."""
        if self._form is not None:
            return self._form
        try:
            length = int(self.environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        body = self.environ["wsgi.input"].read(length) if length else b""
        ctype = self.environ.get("CONTENT_TYPE", "")
        fields: dict[str, Any] = {}
        if ctype.startswith("multipart/form-data"):
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {ctype}\r\n\r\n".encode("latin-1") + body)
            for part in message.iter_parts():
                raw_name = part.get_param("name", header="content-disposition")
                if not raw_name:
                    continue
                name = email.utils.collapse_rfc2231_value(raw_name)  # name*=utf-8''... arrives as a tuple
                filename = part.get_filename()
                payload = part.get_payload(decode=True)
                if not isinstance(payload, bytes):  # none, or a nested multipart: no value
                    payload = b""
                fields[name] = (filename, payload) if filename is not None else payload.decode("utf-8", "replace")
        elif ctype.startswith("application/json"):
            try:
                fields = {k: str(v) for k, v in json.loads(body or b"{}").items()}
            except (ValueError, AttributeError):
                raise HTTPError(HTTPStatus.BAD_REQUEST, "body is not a JSON object") from None
        else:
            fields = {k: v[-1] for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()}
        self._form = fields
        return fields


class HTTPError(Exception):
    """Answer with ``status``, a short reason and any extra ``headers``."""

    def __init__(self, status: HTTPStatus, reason: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []


Response = tuple[HTTPStatus, list[tuple[str, str]], bytes]


def _html(body: str, status: HTTPStatus = HTTPStatus.OK, headers: list[tuple[str, str]] | None = None) -> Response:
    return status, [("Content-Type", "text/html; charset=utf-8"), *(headers or [])], body.encode("utf-8")


def _json(data: Any, status: HTTPStatus = HTTPStatus.OK) -> Response:
    return status, [("Content-Type", "application/json")], json.dumps(data, default=str, indent=1).encode()


def _redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return HTTPStatus.SEE_OTHER, [("Location", location), *(headers or [])], b""


class DashboardApp:
    """The WSGI callable. ``node`` is the running :class:`~dicom_node.ops.service.Node` (config, engine, roles)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.auth = Authenticator(self.cfg.web.users, self.cfg.web.tokens, self.cfg.web.session_hours)
        self.dashboard = "web" in node.roles
        #: STOW-RS (dicom_node.dicomweb): served by processes that receive, when [dicomweb] is enabled.
        self.stow = None
        if getattr(node, "receiver", None) is not None and self.cfg.dicomweb.enabled:
            self.stow = StowService(node)
        #: Routes open to anyone, and routes for a logged-in user (the handler gets who it is).
        self.public_routes: dict[tuple[str, str], Callable[[Request], Response]] = {
            ("GET", "/metrics"): self.metrics, ("GET", "/healthz"): self.healthz, ("GET", "/readyz"): self.readyz,
        }
        self.routes: dict[tuple[str, str], Callable[[Request, Principal], Response]] = {}
        if self.dashboard:
            self.public_routes.update({("GET", "/login"): self.login_form, ("POST", "/login"): self.login})
            self.routes.update({
                ("POST", "/logout"): self.logout, ("GET", "/"): self.index, ("GET", "/api/status"): self.api_status,
                ("GET", "/rules"): self.rules_form, ("POST", "/rules"): self.rules_test,
                ("GET", "/audit"): self.audit_log, ("POST", "/actions/retry"): self.action_job,
                ("POST", "/actions/cancel"): self.action_job, ("POST", "/actions/echo"): self.action_echo,
                ("GET", "/admin"): self.admin_page, ("POST", "/actions/unlock"): self.action_unlock,
                ("POST", "/actions/reload"): self.action_reload, ("POST", "/admin/config"): self.admin_config_save,
            })

    # ------------------------------------------------------------------------------------------- plumbing

    @property
    def cfg(self) -> Any:
        """The node's configuration now (a reload replaces it)."""
        return self.node.cfg

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        try:
            status, headers, body = self.dispatch(request)
        except HTTPError as exc:
            if (request.wants_json or request.method != "GET" or request.path.startswith("/api/")
                    or request.header("Authorization")):
                status, headers, body = _json({"error": exc.reason}, exc.status)
            else:
                status, headers, body = _html(f"<p>{pages.esc(exc.reason)}</p>", exc.status)
            headers = [*headers, *exc.headers]
        except Exception:
            LOGGER.exception("web request %s %s failed", request.method, request.path)
            status, headers, body = _json({"error": "internal error"}, HTTPStatus.INTERNAL_SERVER_ERROR)
        headers = [*headers, ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                   ("Referrer-Policy", "same-origin"), ("Cache-Control", "no-store"),
                   ("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; img-src 'self'")]
        start_response(f"{status.value} {status.phrase}", headers + [("Content-Length", str(len(body)))])
        return [body]

    def principal(self, request: Request) -> Principal | None:
        auth = request.header("Authorization")
        if auth.lower().startswith("bearer "):
            return self.auth.bearer(auth[7:].strip())
        return self.auth.session(request.cookie(SESSION_COOKIE))

    def dispatch(self, request: Request) -> Response:
        path = request.path
        if self.stow is not None and path.startswith("/dicomweb/"):
            if is_stow_path(path):
                return self.stow(request.environ)  # its own authentication ([dicomweb] sources), no session
        public = self.public_routes.get((request.method, path))
        if public is not None:
            return public(request)
        handler = self.routes.get((request.method, path))
        if handler is None and request.method == "GET" and path.startswith("/preview/") and self.dashboard:
            handler = self.preview
        if handler is None:
            known_paths = {p for _m, p in [*self.public_routes, *self.routes]}
            if path in known_paths:
                raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed")
            raise HTTPError(HTTPStatus.NOT_FOUND, "not found")
        principal = self.principal(request)
        if principal is None:
            # API clients (an /api/ path, or any request that sent credentials in a header) get 401 and a
            # challenge; only a browser without a session is sent to the login page.
            sent_token = bool(request.header("Authorization"))
            if sent_token or path.startswith("/api/"):
                challenge = 'Bearer realm="dicom-node"' + (', error="invalid_token"' if sent_token else "")
                raise HTTPError(HTTPStatus.UNAUTHORIZED,
                                "invalid or unknown bearer token" if sent_token else "log in or send a bearer token",
                                [("WWW-Authenticate", challenge)])
            if request.method == "GET" and not request.wants_json:
                return _redirect("/login?next=" + urllib.parse.quote(path))
            raise HTTPError(HTTPStatus.UNAUTHORIZED, "log in first")
        if request.method == "POST":
            sent = request.header("X-CSRF-Token") or request.form().get("csrf_token")
            if not csrf_ok(principal, sent if isinstance(sent, str) else None):
                raise HTTPError(HTTPStatus.FORBIDDEN, "missing or wrong CSRF token")
        return handler(request, principal)

    def _require_admin(self, principal: Principal) -> None:
        if not principal.is_admin:
            raise HTTPError(HTTPStatus.FORBIDDEN, "this needs the admin role")

    def _after_action(self, request: Request, ok: bool, message: str) -> Response:
        if request.wants_json:
            return _json({"ok": ok, "message": message}, HTTPStatus.OK if ok else HTTPStatus.CONFLICT)
        return _redirect("/?msg=" + urllib.parse.quote(message))

    def _page(self, title: str, body: str, principal: Principal | None, message: str = "",
              refresh: int | None = None) -> Response:
        node_title = f"{self.cfg.node.ae_title} on port {self.cfg.node.port}"
        return _html(pages.layout(title, body, principal, node_title, message, refresh))

    # ------------------------------------------------------------------------------------------- open

    def metrics(self, request: Request) -> Response:
        return HTTPStatus.OK, [("Content-Type", CONTENT_TYPE_LATEST)], exposition(self.node, self.dashboard)

    def _checks(self) -> list[Any]:
        return run_checks(self.node)

    def healthz(self, request: Request) -> Response:
        checks = self._checks()
        ok = liveness(checks)
        return _json({"ok": ok, "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}},
                     HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE)

    def readyz(self, request: Request) -> Response:
        checks = self._checks()
        ok = all(c.ok for c in checks)
        # Degraded (a destination failing) answers 200: the node still receives and keeps everything.
        return _json({"ok": ok, "status": overall_state(checks),
                      "checks": {c.name: {"ok": c.ok, "state": c.state, "detail": c.detail} for c in checks}},
                     HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE)

    def login_form(self, request: Request) -> Response:
        return _html(pages.login_page(next_url=same_site_path(request.query.get("next", "/"))))

    def login(self, request: Request) -> Response:
        form = request.form()
        name, password = str(form.get("username", "")), str(form.get("password", ""))
        address = str(request.environ.get("REMOTE_ADDR", "?"))
        actor = f"user:{name[:64]}"
        now = utcnow()
        with self.node.engine.begin() as conn:
            lock = throttle.active_lock(conn, name, address, now)
            if lock is not None:
                audit.record(conn, "login.failed", actor, now,
                             detail=f"from {address}: refused, {lock.kind} locked until {lock.until:%Y-%m-%d %H:%M:%S}")
        if lock is not None:
            LOGGER.warning("dashboard login for %r from %s refused: %s %s is locked", name[:64], address, lock.kind,
                           lock.subject)
            return self._login_refused(request, throttle.describe(lock, now), HTTPStatus.TOO_MANY_REQUESTS,
                                       [("Retry-After", str(max(1, int((lock.until - now).total_seconds()))))])
        # The password is checked outside the transaction: PBKDF2 takes a while and must not hold the database.
        result = self.auth.login(name, password) if name else None
        now = utcnow()
        with self.node.engine.begin() as conn:
            if result is None:
                failures, locks = throttle.record_failure(conn, throttle.Limits.from_settings(self.cfg.web),
                                                          name, address, now)
            else:
                throttle.record_success(conn, name)
            audit.record(conn, "login" if result else "login.failed", actor, now, detail=f"from {address}")
            for new_lock in (locks if result is None else []):
                audit.record(conn, "login.locked", f"{new_lock.kind}:{new_lock.subject}", now, object_kind="login",
                             detail=f"too many failed logins (the last for {name[:64]!r} from {address}); "
                                    f"locked until {new_lock.until:%Y-%m-%d %H:%M:%S}")
        if result is None:
            LOGGER.warning("failed dashboard login for %r from %s", name[:64], address)
            for new_lock in locks:
                LOGGER.warning("dashboard logins of %s %s locked until %s UTC after too many failures",
                               new_lock.kind, new_lock.subject, f"{new_lock.until:%H:%M:%S}")
            # Each failure of a name waits longer (up to a few seconds): guessing gets slow before it gets locked.
            time.sleep(throttle.failure_delay(failures))
            message = "Wrong user name or password."
            if locks:
                message += " " + throttle.describe(max(locks, key=lambda lk: lk.until), now)
            return self._login_refused(request, message, HTTPStatus.UNAUTHORIZED)
        session_id, principal = result
        cookie = (f"{SESSION_COOKIE}={session_id}; Path=/; HttpOnly; SameSite=Strict; "
                  f"Max-Age={int(self.cfg.web.session_hours * 3600)}")
        if request.environ.get("wsgi.url_scheme") == "https" or request.header("X-Forwarded-Proto") == "https":
            cookie += "; Secure"  # behind a TLS reverse proxy the cookie never travels in clear
        if request.wants_json:
            status, headers, body = _json({"user": principal.name, "role": principal.role,
                                           "csrf_token": principal.csrf})
            return status, [*headers, ("Set-Cookie", cookie)], body
        return _redirect(same_site_path(str(form.get("next", "/"))), [("Set-Cookie", cookie)])

    def _login_refused(self, request: Request, message: str, status: HTTPStatus,
                       headers: list[tuple[str, str]] | None = None) -> Response:
        if request.wants_json:
            raise HTTPError(status, message, headers)
        next_url = same_site_path(str(request.form().get("next", "/")))
        return _html(pages.login_page(message, next_url), status, headers)

    # ------------------------------------------------------------------------------------------- logged in

    def logout(self, request: Request, principal: Principal) -> Response:
        self.auth.logout(request.cookie(SESSION_COOKIE))
        return _redirect("/login", [("Set-Cookie", f"{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict")])

    def _show_patient(self, principal: Principal) -> bool:
        return principal.is_admin and self.cfg.web.show_patient_data

    def _context(self, principal: Principal) -> dict[str, Any]:
        now = utcnow()
        with self.node.engine.connect() as conn:
            summary = queue_summary(conn, now)
            series = recent_series(conn, 20, with_patient=self._show_patient(principal))
            failed = failures(conn)
        previews = {s.job_id for s in series
                    if s.job_id and (self.cfg.outbox_path / f"job-{s.job_id}" / PREVIEW_NAME).is_file()}
        return {"now": now, "summary": summary, "series": series, "failures": failed, "previews": previews,
                "checks": self._checks(), "destinations": self.cfg.destinations}

    def index(self, request: Request, principal: Principal) -> Response:
        ctx = self._context(principal)
        body = pages.dashboard(ctx, principal, self._show_patient(principal))
        return self._page("dicom-node", body, principal, request.query.get("msg", ""), refresh=15)

    def api_status(self, request: Request, principal: Principal) -> Response:
        ctx = self._context(principal)
        show = self._show_patient(principal)
        series = []
        for s in ctx["series"]:
            item = {k: v for k, v in vars(s).items() if k not in ("patient_name", "patient_id") or show}
            item["preview"] = f"/preview/{s.job_id}.png" if s.job_id in ctx["previews"] else None
            series.append(item)
        return _json({"summary": ctx["summary"], "series": series, "failures": ctx["failures"],
                      "health": {c.name: {"ok": c.ok, "detail": c.detail} for c in ctx["checks"]},
                      "user": {"name": principal.name, "role": principal.role}})

    def preview(self, request: Request, principal: Principal) -> Response:
        name = request.path.removeprefix("/preview/")
        if not name.endswith(".png") or not name[:-4].isdigit():
            raise HTTPError(HTTPStatus.NOT_FOUND, "not found")
        path = self.cfg.outbox_path / f"job-{int(name[:-4])}" / PREVIEW_NAME
        if not path.is_file():
            raise HTTPError(HTTPStatus.NOT_FOUND, "no preview for this job")
        return HTTPStatus.OK, [("Content-Type", "image/png")], path.read_bytes()

    def action_job(self, request: Request, principal: Principal) -> Response:
        self._require_admin(principal)
        action = request.path.rsplit("/", 1)[-1]
        form = request.form()
        kind = str(form.get("kind", ""))
        try:
            key = int(str(form.get("id", "")))
        except ValueError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "id must be a number") from None
        if kind not in ("job", "export"):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "kind must be job or export")
        now = utcnow()
        with self.node.engine.begin() as conn:
            changed = (retry if action == "retry" else cancel)(conn, kind, key, now)
            if changed:
                audit.record(conn, f"{kind}.{action}", principal.actor, now, object_kind=kind, object_id=key,
                             series_uid=series_uid_of(conn, kind, key))
        if not changed:
            allowed = "failed or cancelled" if action == "retry" else "queued, running or failed"
            return self._after_action(request, False, f"{kind} {key} not found or not {allowed}")
        LOGGER.info("%s %s %d from the dashboard", principal.actor, action, key)
        done = "queued again" if action == "retry" else "cancelled"
        return self._after_action(request, True, f"{kind} {key}: {done}")

    def action_echo(self, request: Request, principal: Principal) -> Response:
        self._require_admin(principal)
        name = str(request.form().get("destination", ""))
        try:
            dest = self.cfg.destination(name)
        except KeyError as exc:
            raise HTTPError(HTTPStatus.NOT_FOUND, exc.args[0]) from None
        ok, text = echo_destination(self.cfg, dest)
        with self.node.engine.begin() as conn:
            audit.record(conn, "destination.echo", principal.actor, utcnow(), object_kind="destination",
                         detail=text)
        return self._after_action(request, ok, text)

    def admin_page(self, request: Request, principal: Principal) -> Response:
        self._require_admin(principal)
        return self._admin_response(request, principal, request.query.get("msg", ""))

    def _config_file(self) -> tuple[str, str]:
        """The configuration file's rules and destinations as TOML, and the digest of the whole file."""
        if self.cfg.source == "defaults":
            return "", ""
        try:
            text = Path(self.cfg.source).read_text(encoding="utf-8")
            return rules_and_destinations_toml(tomllib.loads(text)), file_digest(text)
        except (OSError, ValueError) as exc:
            LOGGER.warning("cannot read %s for the editor: %s", self.cfg.source, exc)
            return "", ""

    def _admin_response(self, request: Request, principal: Principal, message: str = "",
                        problems: list[str] | None = None,
                        edited: str | None = None, tested: tuple[list[str], str] | None = None) -> Response:
        """The admin page: configuration (reload, rules and destinations editor, rules tester) and lock-outs."""
        now = utcnow()
        with self.node.engine.connect() as conn:
            locks = throttle.active_locks(conn, now)
            choices = series_choices(conn)
        current, digest = self._config_file()
        status = HTTPStatus.UNPROCESSABLE_ENTITY if problems else HTTPStatus.OK
        if request.wants_json:
            data = {"locks": [{"kind": lk.kind, "subject": lk.subject, "until": lk.until} for lk in locks],
                    "config": {"source": self.cfg.source, "toml": current, "digest": digest}}
            if problems:
                data.update({"error": "; ".join(problems), "problems": problems})
            return _json(data, status)
        editor = {"source": self.cfg.source, "text": current if edited is None else edited, "digest": digest,
                  "problems": problems or []}
        body = pages.admin_page(principal, locks, now, editor, choices, tested)
        _ok, headers, html = self._page("Admin", body, principal, message)
        return status, headers, html

    def action_reload(self, request: Request, principal: Principal) -> Response:
        """Reload the configuration file (as SIGHUP does)."""
        self._require_admin(principal)
        try:
            result = reload_node(self.node, principal.actor)
        except ConfigError as exc:
            LOGGER.warning("%s: configuration not reloaded: %s", principal.actor, exc)
            return self._admin_response(request, principal, "Not reloaded: the file is invalid; the running "
                                        "configuration is kept.", problems=exc.problems)
        if request.wants_json:
            return _json({"ok": True, "message": result.summary(), "changed": result.changed,
                          "applied": result.applied, "needs_restart": result.needs_restart})
        return _redirect("/admin?msg=" + urllib.parse.quote(result.summary()))

    def admin_config_save(self, request: Request, principal: Principal) -> Response:
        """Validate the edited rules and destinations, write them to the file (with a backup) and reload."""
        self._require_admin(principal)
        form = request.form()
        edited = str(form.get("toml", ""))
        try:
            result = save_rules_and_destinations(self.node, edited, str(form.get("digest", "")), principal.actor)
        except EditRefused as exc:
            LOGGER.warning("%s: edited rules and destinations refused: %s", principal.actor, exc)
            return self._admin_response(request, principal, "Not saved: the running configuration and the file "
                                        "are unchanged.", problems=exc.problems, edited=edited)
        if request.wants_json:
            return _json({"ok": True, "message": result.summary(), "changed": result.changed,
                          "applied": result.applied, "needs_restart": result.needs_restart})
        return _redirect("/admin?msg=" + urllib.parse.quote(result.summary()))

    def action_unlock(self, request: Request, principal: Principal) -> Response:
        self._require_admin(principal)
        form = request.form()
        kind, subject = str(form.get("kind", "")), str(form.get("subject", ""))
        if kind not in throttle.KINDS or not subject:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "kind must be user or address, and subject must be given")
        now = utcnow()
        with self.node.engine.begin() as conn:
            was_locked = throttle.unlock(conn, kind, subject, now)
            audit.record(conn, "login.unlocked", principal.actor, now, object_kind="login",
                         detail=f"{kind} {subject}" + ("" if was_locked else " (was not locked; failures cleared)"))
        LOGGER.info("%s unlocked dashboard logins of %s %s", principal.actor, kind, subject)
        message = f"{kind} {subject}: " + ("unlocked" if was_locked else "was not locked; failed logins cleared")
        if request.wants_json:
            return _json({"ok": was_locked, "message": message})
        return _redirect("/admin?msg=" + urllib.parse.quote(message))

    def rules_form(self, request: Request, principal: Principal) -> Response:
        with self.node.engine.connect() as conn:
            choices = series_choices(conn)
        return self._page("Rules tester", pages.rules_page(principal, choices, None), principal)

    def rules_test(self, request: Request, principal: Principal) -> Response:
        form = request.form()
        upload = form.get("file")
        calling = str(form.get("calling", "") or "")
        if isinstance(upload, tuple) and upload[1]:
            try:
                ds = dcmread(BytesIO(upload[1]), stop_before_pixels=True, force=True)
                ts = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
                facts = extract_facts(ds, ts, calling, self.cfg.node.ae_title)
            except Exception as exc:
                raise HTTPError(HTTPStatus.BAD_REQUEST, f"not a readable DICOM file: {exc}") from exc
            attrs = SeriesAttributes.from_row(facts)
            label = f"uploaded file {upload[0] or ''} ({facts.modality} {facts.series_description!r})"
        elif str(form.get("series", "")).isdigit():
            with self.node.engine.connect() as conn:
                row = series_row(conn, int(form["series"]))
            if row is None:
                raise HTTPError(HTTPStatus.NOT_FOUND, "no such series")
            attrs = SeriesAttributes.from_row(row)
            label = f"series {row.series_uid} ({row.modality} {row.series_description!r})"
        else:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "pick a series or upload a DICOM file")
        rules = self.cfg.rules
        edited = form.get("toml")
        if isinstance(edited, str):
            # Sent from the admin page's editor: explain with the edited rules, before they are saved.
            self._require_admin(principal)
            rules, problems = self._edited_rules(edited)
            if problems:
                return self._admin_response(request, principal, "The edited rules are invalid.",
                                            problems=problems, edited=edited)
        lines = explain(rules, attrs)
        if request.wants_json:
            return _json({"series": label, "explanation": lines})
        if isinstance(edited, str):
            return self._admin_response(request, principal, edited=edited, tested=(lines, label + ", edited rules"))
        with self.node.engine.connect() as conn:
            choices = series_choices(conn)
        return self._page("Rules tester", pages.rules_page(principal, choices, lines, label), principal)

    def _edited_rules(self, edited: str) -> tuple[list[Any], list[str]]:
        """The rules of the editor's text as the node would load them, and the problems found (then no rules)."""
        source = self.cfg.source
        try:
            old_text = Path(source).read_text(encoding="utf-8") if source != "defaults" else ""
            _text, raw = edited_file_text(old_text, edited)
            return config_from_mapping(raw, source).rules, []
        except (EditRefused, ConfigError) as exc:
            return [], exc.problems
        except OSError as exc:
            return [], [f"cannot read {source}: {exc.strerror or exc}"]

    def audit_log(self, request: Request, principal: Principal) -> Response:
        filters = {k: request.query.get(k, "") for k in ("action", "actor", "uid")}
        with self.node.engine.connect() as conn:
            events = audit.query(conn, action=filters["action"] or None, actor=filters["actor"] or None,
                                 uid=filters["uid"] or None, limit=int(request.query.get("limit", "200") or 200))
        if request.wants_json:
            return _json([dict(e._mapping) for e in events])
        return self._page("Audit log", pages.audit_page(events, utcnow(), filters), principal)


def same_site_path(target: str) -> str:
    """``target`` when it is a path on this site, else ``/``: where to go after logging in.

    Only a single leading ``/`` followed by printable ASCII is accepted: no ``//`` (another host), no backslash
    anywhere (browsers read ``/\\host`` as ``//host``), no scheme, no control characters (browsers drop tabs and
    newlines, so ``/\\t/host`` would become ``//host``).
    """
    if (not target.startswith("/") or target.startswith("//") or "\\" in target
            or any(not 0x21 <= ord(ch) <= 0x7E for ch in target)):
        return "/"
    return target

