"""The node's HTTP side against a running node: /metrics counts what was sent, health checks, login, roles, CSRF.

One node (SQLite) receives a CT series (forwarded to the local output folder) and an MR series (forwarded to a
destination that never answers, with one attempt, so its export fails). Metrics are parsed with the Prometheus
client's own parser.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.filereader import read_file_meta_info

from dicom_node.web.auth import hash_password, token_digest
from tests.fixtures.synthetic import make_ct_series
from tests.http import Client
from tests.integration.test_pipeline import wait_until
from tests.peers import Peer, dicom_node, free_port, node_command, storescu, wait_for_port

TOKEN = "test-token-read-0123456789"


def users_toml() -> str:
    admin = hash_password("admin-pass-1", iterations=1000)
    viewer = hash_password("viewer-pass-1", iterations=1000)
    return (f'users = [{{ name = "admin", role = "admin", password_hash = "{admin}" }}, '
            f'{{ name = "viewer", role = "read", password_hash = "{viewer}" }}]\n'
            f'tokens = [{{ name = "monitor", role = "read", token_sha256 = "{token_digest(TOKEN)}" }}]\n')


def dataset_bytes(path: Path) -> int:
    """Bytes of the dataset as sent on the wire: the file without preamble, prefix and file meta (PS3.10 7.1)."""
    meta = read_file_meta_info(path)
    return path.stat().st_size - (128 + 4 + 12 + int(meta.FileMetaInformationGroupLength))


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("web")
    ct = make_ct_series(base / "ct", n_slices=5, rows=32, cols=32)
    mr = make_ct_series(base / "mr", n_slices=3, rows=32, cols=32, modality="MR")
    web_port, dead_port = free_port(), free_port()
    config = base / "node.toml"
    config.write_text(
        "[node]\nquiet_seconds = 1.0\n[web]\n" + users_toml()
        + "[export]\nmax_attempts = 1\npoll_seconds = 0.2\n"
        + f'[[destinations]]\nname = "dead"\nae_title = "NOBODY"\nhost = "127.0.0.1"\nport = {dead_port}\n'
        + "timeout_seconds = 2.0\n"
        + '[[rules]]\nname = "ct"\nmatch = { Modality = "CT" }\nforward_original = true\nquiet_seconds = 1.0\n'
        + '[[rules]]\nname = "mr"\nmatch = { Modality = "MR" }\nforward_original = true\ndestinations = ["dead"]\n'
        + "quiet_seconds = 1.0\n")
    with dicom_node(base / "node", config=config, extra_env={"DICOM_NODE_WEB__PORT": str(web_port)}) as node:
        wait_for_port(web_port, process=node.process)
        for files in (ct, mr):
            result = storescu(node.port, "DENOISE", files)
            assert result.returncode == 0, result.stderr[-2000:]
        client = Client(f"http://127.0.0.1:{web_port}")
        yield {"node": node, "client": client, "ct": ct, "mr": mr, "config": config, "base": base}


def wait_exports_done(node: Peer) -> None:
    from dicom_node.store.schema import Export
    from tests.integration.test_pipeline import db_rows

    wait_until(lambda: (rows := db_rows(node.storage, Export)) and len(rows) == 2 and
               all(r.state.value in ("succeeded", "failed") for r in rows), 60, "both exports finished")


def metrics(client: Client) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    answer = client.request("GET", "/metrics", accept_json=False)
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_count_what_was_sent(running: dict[str, Any]) -> None:
    node, client = running["node"], running["client"]
    wait_exports_done(node)
    m = metrics(client)
    files = running["ct"] + running["mr"]
    assert m["dicom_node_instances_received_total"][()] == len(files)
    assert m["dicom_node_instances_refused_total"][()] == 0
    assert m["dicom_node_received_bytes_total"][()] == sum(dataset_bytes(f) for f in files)
    assert m["dicom_node_associations_total"][(("outcome", "accepted"),)] == 2
    assert m["dicom_node_associations_total"][(("outcome", "released"),)] == 2
    assert m["dicom_node_series_completed_total"][()] == 2
    assert m["dicom_node_exports"][(("state", "succeeded"),)] == 1
    assert m["dicom_node_exports"][(("state", "failed"),)] == 1
    assert m["dicom_node_export_failures_total"][(("destination", "dead"),)] == 1
    assert m["dicom_node_exports_delivered_total"][(("destination", "local"),)] == 1
    assert m["dicom_node_stage_duration_seconds_count"][(("stage", "receive"),)] == 2
    assert m["dicom_node_stage_duration_seconds_count"][(("stage", "export"),)] == 2
    assert m["dicom_node_jobs"][(("state", "queued"),)] == 0
    assert m["dicom_node_disk_free_bytes"][()] > 0


def test_health_endpoints(running: dict[str, Any]) -> None:
    client = running["client"]
    for path in ("/healthz", "/readyz"):
        answer = client.request("GET", path)
        assert answer.status == 200, answer.text
        checks = answer.json()["checks"]
        assert checks["database"]["ok"] and "schema" in checks["database"]["detail"]
        assert checks["disk"]["ok"] and checks["models"]["ok"] and checks["stages"]["ok"]


def test_nothing_without_login(running: dict[str, Any]) -> None:
    anonymous = Client(running["client"].base)
    page = anonymous.request("GET", "/", accept_json=False)
    assert page.status == 303 and page.headers["Location"].startswith("/login")
    for method, path in (("GET", "/api/status"), ("GET", "/audit"), ("GET", "/preview/1.png"),
                         ("POST", "/actions/retry"), ("POST", "/actions/echo"), ("POST", "/rules")):
        answer = anonymous.request(method, path, {"kind": "export", "id": "1"} if method == "POST" else None)
        assert answer.status == 401, (method, path, answer.status)
    assert anonymous.login("admin", "wrong-password").status == 401
    assert anonymous.login("nobody", "admin-pass-1").status == 401
    assert anonymous.request("GET", "/api/status", headers={"Authorization": "Bearer wrong"}).status == 401
    plain = Client(running["client"].base)
    assert plain.login("viewer", "viewer-pass-1").status == 200
    proxied = plain.request("POST", "/login", {"username": "viewer", "password": "viewer-pass-1"},
                            headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in proxied.headers["Set-Cookie"] and "HttpOnly" in proxied.headers["Set-Cookie"]


def _failed_export(client: Client) -> dict[str, Any] | None:
    status = client.request("GET", "/api/status").json()
    failed = [f for f in status["failures"] if f["kind"] == "export"]
    assert len(failed) <= 1
    return failed[0] if failed else None


def test_roles_and_csrf(running: dict[str, Any]) -> None:
    node, base = running["node"], running["client"].base
    wait_exports_done(node)
    viewer = Client(base)
    assert viewer.login("viewer", "viewer-pass-1").status == 200
    failed = _failed_export(viewer)
    assert failed is not None and "NOBODY@127.0.0.1" in failed["error"]
    # Read-only: sees everything, may not act, even with its CSRF token.
    answer = viewer.request("POST", "/actions/retry", {"kind": "export", "id": failed["id"], "csrf_token": viewer.csrf})
    assert answer.status == 403 and "admin" in answer.json()["error"]
    token = Client(base)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert token.request("GET", "/api/status", headers=headers).status == 200
    retried = token.request("POST", "/actions/retry", {"kind": "export", "id": failed["id"]}, headers=headers)
    assert retried.status == 403

    admin = Client(base)
    assert admin.login("admin", "admin-pass-1").status == 200
    no_token = admin.request("POST", "/actions/retry", {"kind": "export", "id": failed["id"]})
    assert no_token.status == 403 and "CSRF" in no_token.json()["error"]
    wrong = admin.request("POST", "/actions/retry", {"kind": "export", "id": failed["id"], "csrf_token": viewer.csrf})
    assert wrong.status == 403
    # Another session's cookie with this session's token does not pass either.
    mixed = Client(base, cookies=dict(viewer.cookies))
    assert mixed.request("POST", "/actions/retry", {"kind": "export", "id": failed["id"],
                                                    "csrf_token": admin.csrf}).status == 403
    unknown = admin.request("POST", "/actions/retry", {"kind": "export", "id": 999, "csrf_token": admin.csrf})
    assert unknown.status == 409
    ok = admin.request("POST", "/actions/retry", {"kind": "export", "id": failed["id"]},
                       headers={"X-CSRF-Token": admin.csrf})
    assert ok.status == 200 and ok.json()["ok"], ok.text
    # The retry runs (and fails again: nobody listens), and both are in the audit log with the user as actor.
    wait_until(lambda: (again := _failed_export(admin)) and again["attempts"] == 1 and
               any(e["action"] == "export.failed" and e["object_id"] == failed["id"]
                   for e in admin.request("GET", "/audit?limit=500").json()[:3]),
               60, "the retried export failing again")
    events = admin.request("GET", "/audit?action=export.retry").json()
    assert [(e["actor"], e["object_id"]) for e in events] == [("user:admin", failed["id"])]
    logins = admin.request("GET", "/audit?action=login").json()
    assert {e["actor"] for e in logins if e["action"] == "login"} >= {"user:admin", "user:viewer"}
    assert any(e["action"] == "login.failed" for e in logins)
    # The CLI reads the same log.
    env = {**os.environ, "DICOM_NODE_NODE__DATA_DIR": str(node.storage)}
    cli = subprocess.run([*node_command(), "audit", "--action", "export.retry", "--json", "--config",
                          str(running["config"])], capture_output=True, text=True, env=env, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert [e["actor"] for e in json.loads(cli.stdout)] == ["user:admin"]
    # Logging out ends the session.
    assert admin.request("POST", "/logout", {"csrf_token": admin.csrf}).status == 303
    assert admin.request("GET", "/api/status").status == 401


def test_no_patient_data_and_series_events(running: dict[str, Any]) -> None:
    admin = Client(running["client"].base)
    assert admin.login("admin", "admin-pass-1").status == 200
    page = admin.request("GET", "/", accept_json=False)
    status = admin.request("GET", "/api/status")
    audit_page = admin.request("GET", "/audit", accept_json=False)
    for text in (page.text, status.text, audit_page.text):
        assert "PHANTOM" not in text and "SYN-0001" not in text
    assert len(status.json()["series"]) == 2
    received = admin.request("GET", "/audit?action=series.received").json()
    assert len(received) == 2 and all(e["series_uid"] for e in received)
    config_events = admin.request("GET", "/audit?action=config.").json()
    assert config_events and config_events[-1]["action"] == "config.loaded"


def test_rules_tester(running: dict[str, Any]) -> None:
    viewer = Client(running["client"].base)
    assert viewer.login("viewer", "viewer-pass-1").status == 200
    boundary = "----dicomnodetest"
    data = Path(running["mr"][0]).read_bytes()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"csrf_token\"\r\n\r\n{viewer.csrf}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"mr.dcm\"\r\n"
            f"Content-Type: application/dicom\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    import urllib.request

    req = urllib.request.Request(viewer.base + "/rules", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "Accept": "application/json",
        "Cookie": "; ".join(f"{k}={v}" for k, v in viewer.cookies.items())})
    with urllib.request.urlopen(req, timeout=60) as rsp:
        result = json.loads(rsp.read())
    text = "\n".join(result["explanation"])
    assert "mr" in text and "Modality" in text, text


def test_echo_button_and_rules_tester_pick(running: dict[str, Any]) -> None:
    admin = Client(running["client"].base)
    assert admin.login("admin", "admin-pass-1").status == 200
    echo = admin.request("POST", "/actions/echo", {"destination": "dead", "csrf_token": admin.csrf})
    assert echo.status == 409 and "dead" in echo.json()["message"] and "cannot connect" in echo.json()["message"]
    assert admin.request("POST", "/actions/echo", {"destination": "nope", "csrf_token": admin.csrf}).status == 404
    events = admin.request("GET", "/audit?action=destination.echo").json()
    assert events and events[0]["actor"] == "user:admin"
    picked = admin.request("POST", "/rules", {"series": "1", "csrf_token": admin.csrf})
    assert picked.status == 200, picked.text
    assert "ct" in "\n".join(picked.json()["explanation"])
