"""Attacks on the dashboard over real HTTP against a running node: open redirect after login, password guessing
(slow-down, lock-out per user and per address, unlock by the CLI and the dashboard, all audited), and API clients
with a wrong bearer token (401 with a challenge, not the login page).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.http import Answer, Client
from tests.integration.test_web_api import TOKEN, users_toml
from tests.peers import dicom_node, free_port, node_command, wait_for_port

MAX_FAILURES = 3
MAX_FAILURES_PER_ADDRESS = 6


def write_config(path: Path) -> Path:
    path.write_text("[web]\n" + users_toml() + f"login_max_failures = {MAX_FAILURES}\n"
                    f"login_max_failures_per_address = {MAX_FAILURES_PER_ADDRESS}\n"
                    "login_window_minutes = 15.0\nlogin_lockout_minutes = 15.0\n")
    return path


@pytest.fixture()
def node_web(tmp_path: Path) -> Iterator[dict[str, Any]]:
    config = write_config(tmp_path / "node.toml")
    web_port = free_port()
    with dicom_node(tmp_path / "node", config=config, extra_env={"DICOM_NODE_WEB__PORT": str(web_port)}) as node:
        wait_for_port(web_port, process=node.process)
        yield {"node": node, "base": f"http://127.0.0.1:{web_port}", "config": config, "web_port": web_port,
               "tmp": tmp_path}


def browser_login(base: str, user: str, password: str, next_url: str) -> Answer:
    """A login as a browser posts it: a form, HTML accepted, redirects not followed."""
    return Client(base).request("POST", "/login", {"username": user, "password": password, "next": next_url},
                                accept_json=False)


HOSTILE_NEXT = [
    "/\\evil.example/",          # browsers read /\ as //
    "\\\\evil.example/",
    "//evil.example/",
    "///evil.example/",
    "https://evil.example/",
    "javascript:alert(1)",
    "/\t/evil.example/",          # browsers drop tabs and newlines: //evil.example
    "/\r\nSet-Cookie: x=1",
    " //evil.example/",
    "/%2F..\\evil.example",
    "",
]


def test_login_redirect_stays_on_this_site(node_web: dict[str, Any]) -> None:
    base = node_web["base"]
    for hostile in HOSTILE_NEXT:
        answer = browser_login(base, "viewer", "viewer-pass-1", hostile)
        assert answer.status == 303, (hostile, answer.status)
        assert answer.headers["Location"] == "/", (hostile, answer.headers["Location"])
        # The login form does not carry it over either.
        form = Client(base).request("GET", "/login?next=" + urllib.parse.quote(hostile), accept_json=False)
        assert 'name="next" value="/"' in form.text, hostile
    # A path on this site is kept, query included.
    kept = browser_login(base, "viewer", "viewer-pass-1", "/audit?action=login")
    assert kept.status == 303 and kept.headers["Location"] == "/audit?action=login"


def test_api_clients_get_401_with_a_bearer_challenge(node_web: dict[str, Any]) -> None:
    anonymous = Client(node_web["base"])
    for path, headers in (("/api/status", {"Authorization": "Bearer wrong"}),
                          ("/api/status", {}),
                          ("/", {"Authorization": "Bearer wrong"}),
                          ("/audit", {"Authorization": "Bearer not-a-token"})):
        # No Accept: application/json, as curl or a monitoring probe sends it.
        answer = anonymous.request("GET", path, headers=headers, accept_json=False)
        assert answer.status == 401, (path, headers, answer.status, answer.headers.get("Location"))
        assert answer.headers["WWW-Authenticate"].startswith("Bearer"), answer.headers
        assert "Location" not in answer.headers
        assert "error" in answer.json()
        if headers:
            assert 'error="invalid_token"' in answer.headers["WWW-Authenticate"]
    # A browser without a session still goes to the login page, and the right token still works.
    page = anonymous.request("GET", "/", accept_json=False)
    assert page.status == 303 and page.headers["Location"].startswith("/login")
    ok = anonymous.request("GET", "/api/status", headers={"Authorization": f"Bearer {TOKEN}"}, accept_json=False)
    assert ok.status == 200 and ok.json()["user"]["name"] == "monitor"


def audit_events(node_web: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return json.loads(cli(node_web, "audit", "--action", action, "--json", "--limit", "500").stdout)


def cli(node_web: dict[str, Any], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DICOM_NODE_NODE__DATA_DIR": str(node_web["tmp"] / "node")}
    result = subprocess.run([*node_command(), *args, "--config", str(node_web["config"])], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def test_wrong_passwords_lock_the_user_until_unlocked_by_the_cli(node_web: dict[str, Any]) -> None:
    base = node_web["base"]
    client = Client(base)
    for attempt in range(1, MAX_FAILURES + 1):
        answer = client.login("admin", f"guess-{attempt}")
        assert answer.status == 401, answer.text
        assert ("locked" in answer.json()["error"]) == (attempt == MAX_FAILURES), answer.text
    # The right password is refused now, with a message that says why and how to get unlocked.
    refused = client.login("admin", "admin-pass-1")
    assert refused.status == 429, refused.text
    message = refused.json()["error"]
    assert "Too many failed logins" in message and "'admin'" in message and "web unlock 'admin'" in message
    assert int(refused.headers["Retry-After"]) > 800
    page = browser_login(base, "admin", "admin-pass-1", "/")
    assert page.status == 429 and "Too many failed logins" in page.text and "Set-Cookie" not in page.headers
    # Another user from the same address is not locked (the address is below its own threshold).
    assert Client(base).login("viewer", "viewer-pass-1").status == 200

    # The lock-out is in the database: it survives a restart of the node.
    node_web["node"].process.terminate()
    node_web["node"].process.wait(30)
    with dicom_node(node_web["tmp"] / "node", config=node_web["config"],
                    extra_env={"DICOM_NODE_WEB__PORT": str(node_web["web_port"])}) as node:
        wait_for_port(node_web["web_port"], process=node.process)
        assert Client(base).login("admin", "admin-pass-1").status == 429
        unlocked = cli(node_web, "web", "unlock", "admin")
        assert "unlocked" in unlocked.stdout
        assert Client(base).login("admin", "admin-pass-1").status == 200

    failed = audit_events(node_web, "login.failed")
    assert len([e for e in failed if e["actor"] == "user:admin"]) == MAX_FAILURES + 3
    assert sum("refused" in e["detail"] for e in failed) == 3
    (locked,) = audit_events(node_web, "login.locked")
    assert locked["actor"] == "user:admin" and "locked until" in locked["detail"]
    (unlock,) = audit_events(node_web, "login.unlocked")
    assert unlock["actor"].startswith("cli:") and unlock["detail"] == "user admin"


def request_from(source: str, base: str, method: str, path: str, form: dict[str, str] | None = None,
                 cookie: str = "") -> tuple[int, dict[str, str], bytes]:
    """A request from another loopback address (e.g. 127.0.0.2), as a second client machine sends it."""
    parsed = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=60,
                                      source_address=(source, 0))
    body = urllib.parse.urlencode(form).encode() if form is not None else None
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if cookie:
        headers["Cookie"] = cookie
    try:
        conn.request(method, path, body=body, headers=headers)
        rsp = conn.getresponse()
        return rsp.status, dict(rsp.getheaders()), rsp.read()
    finally:
        conn.close()


def test_guessing_many_names_locks_the_address_and_an_admin_unlocks_it_on_the_dashboard(
        node_web: dict[str, Any]) -> None:
    base = node_web["base"]
    for i in range(MAX_FAILURES_PER_ADDRESS):
        answer = Client(base).login(f"name-{i}", "guess")
        assert answer.status == 401
    # Every name is below its own threshold, but the address is locked: even a right password fails from it.
    refused = Client(base).login("viewer", "viewer-pass-1")
    assert refused.status == 429 and "address 127.0.0.1" in refused.json()["error"], refused.text

    # An administrator logs in from another machine (127.0.0.2) and unlocks the address on the admin page.
    status, headers, body = request_from("127.0.0.2", base, "POST", "/login",
                                         {"username": "admin", "password": "admin-pass-1"})
    assert status == 200, body
    cookie = headers["Set-Cookie"].split(";")[0]
    csrf = json.loads(body)["csrf_token"]
    status, _h, body = request_from("127.0.0.2", base, "GET", "/admin", cookie=cookie)
    assert status == 200 and [lk["subject"] for lk in json.loads(body)["locks"]] == ["127.0.0.1"]
    # POST only, with the CSRF token, and only for admins.
    status, _h, _b = request_from("127.0.0.2", base, "POST", "/actions/unlock",
                                  {"kind": "address", "subject": "127.0.0.1"}, cookie=cookie)
    assert status == 403
    status, viewer_headers, viewer_body = request_from("127.0.0.2", base, "POST", "/login",
                                                       {"username": "viewer", "password": "viewer-pass-1"})
    assert status == 200
    status, _h, _b = request_from("127.0.0.2", base, "POST", "/actions/unlock",
                                  {"kind": "address", "subject": "127.0.0.1",
                                   "csrf_token": json.loads(viewer_body)["csrf_token"]},
                                  cookie=viewer_headers["Set-Cookie"].split(";")[0])
    assert status == 403  # the read role may not unlock
    status, _h, body = request_from("127.0.0.2", base, "POST", "/actions/unlock",
                                    {"kind": "address", "subject": "127.0.0.1", "csrf_token": csrf}, cookie=cookie)
    assert status == 200 and json.loads(body)["ok"], body
    assert Client(base).login("viewer", "viewer-pass-1").status == 200

    (locked,) = audit_events(node_web, "login.locked")
    assert locked["actor"] == "address:127.0.0.1"
    (unlock,) = audit_events(node_web, "login.unlocked")
    assert unlock["actor"] == "user:admin" and unlock["detail"] == "address 127.0.0.1"
    assert len(audit_events(node_web, "login.failed")) == MAX_FAILURES_PER_ADDRESS + 1


def test_failures_from_concurrent_processes_are_all_counted_on_postgresql() -> None:
    """Web processes of a scaled-out site share the counts: concurrent failures for one name (its row created by
    the first of them) are each counted once, and exactly one of them starts the lock-out."""
    import datetime as dt
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import select

    from dicom_node.store import throttle
    from dicom_node.store.database import make_engine, migrate
    from tests.postgres import postgres_server

    limits = throttle.Limits(max_failures=12, max_failures_per_address=1000)
    now = dt.datetime(2026, 12, 4, 12, 0)
    with postgres_server() as server:
        engine = make_engine(server.create_database("throttle"))
        migrate(engine)

        def one_failure(i: int) -> list[throttle.Lock]:
            with engine.begin() as conn:
                return throttle.record_failure(conn, limits, "alice", f"10.0.0.{i % 3}", now)[1]

        try:
            with ThreadPoolExecutor(max_workers=8) as pool:
                started = [lock for locks in pool.map(one_failure, range(16)) for lock in locks]
            assert started == [throttle.Lock("user", "alice", now + limits.lockout)]
            with engine.begin() as conn:
                rows = {(r.kind, r.subject): r.failures
                        for r in conn.execute(select(throttle.LoginThrottle.__table__)).all()}
                assert throttle.active_lock(conn, "alice", "10.9.9.9", now) is not None
            # 12 failures locked the name and reset its count; the 4 after it counted again. Per address: all 16.
            assert rows[("user", "alice")] == 4
            assert sum(v for (kind, _s), v in rows.items() if kind == "address") == 16
        finally:
            engine.dispose()
