"""Configuration changes without a restart, against a running node (subprocess) and real dcmtk peers.

SIGHUP: an invalid file is refused and the running configuration kept; a valid one adds a destination (its exporter
starts) and a rule that routes the next series; a key that needs a restart is reported, not applied. The dashboard:
an invalid edit of rules and destinations is refused with its problems and changes neither the file nor the node; a
valid one is written with a backup and reloaded; both only for admins with the CSRF token, and audited.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_node.store.schema import Export, Instance, Series
from tests.fixtures.synthetic import make_ct_series
from tests.http import Client
from tests.integration.test_pipeline import db_rows, wait_until
from tests.integration.test_web_api import TOKEN, users_toml
from tests.peers import DCMTK_ENV, dicom_node, free_port, storescp, storescu, wait_for_port

BASE = ("[node]\nquiet_seconds = 1.0\n[export]\npoll_seconds = 0.2\nbackoff_base_seconds = 1.0\n"
        "[web]\n" + users_toml() +
        "\n# Rules, tried in order\n"
        '[[rules]]\nname = "ct"\nforward_original = true\nquiet_seconds = 1.0\n[rules.match]\nModality = "CT"\n')


def reloads(client: Client) -> list[dict[str, Any]]:
    answer = client.request("GET", "/audit?action=config.reloaded", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 200, answer.text
    return answer.json()


def route_of(node_dir: Path, series_uid: str) -> str | None:
    rows = [s for s in db_rows(node_dir, Series) if s.series_uid == series_uid and s.state.value == "complete"]
    return rows[0].route_rule if rows else None


def rules_tester(client: Client, dicom_file: Path, toml: str | None = None) -> str:
    """The rules tester's explanation for an uploaded file (with the editor's text when ``toml`` is given)."""
    import urllib.request

    boundary = "----reloadtest"
    fields = {"csrf_token": client.csrf, **({"toml": toml} if toml is not None else {})}
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                    for k, v in fields.items())
    body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.dcm\"\r\n"
             f"Content-Type: application/dicom\r\n\r\n").encode() + dicom_file.read_bytes()
    body += f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(client.base + "/rules", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "Accept": "application/json",
        "Cookie": "; ".join(f"{k}={v}" for k, v in client.cookies.items())})
    with urllib.request.urlopen(req, timeout=60) as rsp:
        return "\n".join(json.loads(rsp.read())["explanation"])


def test_sighup_adds_a_destination_and_a_rule_that_routes_the_next_series(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(BASE)
    web_port = free_port()
    mr = make_ct_series(tmp_path / "mr", n_slices=3, rows=32, cols=32, modality="MR")
    mr_uid = str(dcmread(mr[0]).SeriesInstanceUID)
    ct = make_ct_series(tmp_path / "ct", n_slices=60, rows=64, cols=64)
    with storescp(tmp_path / "store") as store, \
            dicom_node(tmp_path / "node", config=config, extra_env={"DICOM_NODE_WEB__PORT": str(web_port)}) as node:
        wait_for_port(web_port, process=node.process)
        client = Client(f"http://127.0.0.1:{web_port}")
        log = node.storage / "node.log"
        new_rule = ('[[destinations]]\nname = "store"\nae_title = "STORESCP"\nhost = "127.0.0.1"\n'
                    f"port = {store.port}\n"
                    '[[rules]]\nname = "mr-new"\nforward_original = true\nquiet_seconds = 1.0\n'
                    'destinations = ["store"]\nmatch = { Modality = "MR" }\n')

        # An invalid file (the rule names a destination that does not exist) is refused; the node runs on.
        config.write_text(BASE + new_rule.replace('destinations = ["store"]', 'destinations = ["nowhere"]'))
        node.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "configuration not reloaded" in log.read_text(), 30, "the refused reload in the log")
        assert "'nowhere' is not a configured destination" in log.read_text()
        assert node.process.poll() is None and reloads(client) == []

        # A valid one: a new destination and a rule for MR; max_associations needs a restart. It is sent while a
        # CT series is being received: the association goes on and every instance is stored.
        config.write_text(BASE.replace("[node]\n", "[node]\nmax_associations = 4\n") + new_rule)
        sending = subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", "DENOISE", "127.0.0.1", str(node.port),
                                    *map(str, ct)], env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_until(lambda: db_rows(node.storage, Instance), 60, "the CT series arriving", interval=0.05)
        node.process.send_signal(signal.SIGHUP)
        (event,) = wait_until(lambda: reloads(client), 30, "config.reloaded in the audit log")
        output = sending.communicate(timeout=300)[0]
        assert sending.returncode == 0, output[-2000:]
        assert len(db_rows(node.storage, Instance)) == len(ct)
        detail = json.loads(event["detail"])
        assert event["actor"] == "signal:SIGHUP"
        assert detail["changed"] == ["destinations", "node", "rules"]
        assert sorted(detail["applied"]) == ["destinations", "rules"]
        assert detail["needs_restart"] == ["node.max_associations"]
        assert "exporter for new destination store started" in log.read_text()

        # The series sent now is routed by the new rule and delivered by the new destination's exporter.
        result = storescu(node.port, "DENOISE", mr)
        assert result.returncode == 0, result.stderr[-2000:]
        wait_until(lambda: route_of(node.storage, mr_uid) == "mr-new", 60, "the MR series routed by mr-new")
        wait_until(lambda: [e.state.value for e in db_rows(node.storage, Export) if e.destination == "store"]
                   == ["succeeded"], 60, "the export to the new destination")
        assert len(list(store.storage.rglob("*"))) >= len(mr)


def test_dashboard_edit_is_validated_saved_with_a_backup_and_reloaded(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(BASE)
    web_port = free_port()
    with dicom_node(tmp_path / "node", config=config, extra_env={"DICOM_NODE_WEB__PORT": str(web_port)}) as node:
        wait_for_port(web_port, process=node.process)
        base = f"http://127.0.0.1:{web_port}"
        admin = Client(base)
        assert admin.login("admin", "admin-pass-1").status == 200
        shown = admin.request("GET", "/admin").json()["config"]
        assert shown["source"] == str(config) and '[[rules]]\nname = "ct"' in shown["toml"]

        # Invalid: a rule naming an unknown destination, and an unknown match key. Refused with both problems.
        bad = shown["toml"] + ('\n[[rules]]\nname = "mr"\nforward_original = true\ndestinations = ["nowhere"]\n'
                               'match = { Modality = "MR", Colour = "red" }\n')
        refused = admin.request("POST", "/admin/config", {"toml": bad, "digest": shown["digest"],
                                                          "csrf_token": admin.csrf})
        assert refused.status == 422, refused.text
        problems = refused.json()["problems"]
        assert any("'nowhere' is not a configured destination" in p for p in problems), problems
        assert any("rules[1].match.Colour" in p for p in problems), problems
        assert config.read_text() == BASE and list(tmp_path.glob("*.bak")) == []
        assert admin.request("GET", "/admin").json()["config"] == shown
        # The browser's form shows the problems and keeps the edited text.
        page = admin.request("POST", "/admin/config", {"toml": bad, "digest": shown["digest"],
                                                       "csrf_token": admin.csrf}, accept_json=False)
        assert page.status == 422 and 'id="config-problems"' in page.text and "Colour" in page.text
        assert reloads(admin) == []

        # Only admins, only with the CSRF token.
        good = shown["toml"] + '\n[[rules]]\nname = "mr"\nforward_original = true\nmatch = { Modality = "MR" }\n'
        # The tester beside the editor explains with the edited rules before they are saved; the node does not.
        mr_file = make_ct_series(tmp_path / "mr", n_slices=1, rows=16, cols=16, modality="MR")[0]
        assert "rule mr: MATCHES" in rules_tester(admin, mr_file, toml=good)
        assert "not routed" in rules_tester(admin, mr_file)
        assert admin.request("POST", "/admin/config", {"toml": good, "digest": shown["digest"]}).status == 403
        viewer = Client(base)
        assert viewer.login("viewer", "viewer-pass-1").status == 200
        assert viewer.request("POST", "/admin/config", {"toml": good, "digest": shown["digest"],
                                                        "csrf_token": viewer.csrf}).status == 403
        assert viewer.request("POST", "/actions/reload", {"csrf_token": viewer.csrf}).status == 403

        saved = admin.request("POST", "/admin/config", {"toml": good, "digest": shown["digest"],
                                                        "csrf_token": admin.csrf})
        assert saved.status == 200, saved.text
        assert saved.json()["applied"] == ["rules"] and saved.json()["needs_restart"] == []
        assert (tmp_path / "node.toml.bak").read_text() == BASE
        text = config.read_text()
        assert "# Rules, tried in order" in text and 'name = "mr"' in text and "[web]" in text
        (event,) = reloads(admin)
        assert event["actor"] == "user:admin" and json.loads(event["detail"])["changed"] == ["rules"]
        # The running node routes by the saved rules: the rules tester says so.
        assert "rule mr: MATCHES" in rules_tester(admin, mr_file), rules_tester(admin, mr_file)

        # A stale editor (the file changed since it was opened) is refused.
        stale = admin.request("POST", "/admin/config", {"toml": good, "digest": shown["digest"],
                                                        "csrf_token": admin.csrf})
        assert stale.status == 422 and "changed since" in stale.json()["error"]

        # The Reload button with a broken file: refused with the problems, the running rules kept.
        config.write_text(text.replace('name = "mr"', 'name = "ct"'))
        broken = admin.request("POST", "/actions/reload", {"csrf_token": admin.csrf})
        assert broken.status == 422 and any("'ct' is used by another rule" in p for p in broken.json()["problems"])
        assert "rule mr: MATCHES" in rules_tester(admin, mr_file)
        assert len(reloads(admin)) == 1 and node.process.poll() is None
