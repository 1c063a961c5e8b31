"""Operating the node without sockets: roles, passwords and sessions, web configuration, the audit log and its
retention, copying a job table, health checks, the dashboard's patient-data switch."""

from __future__ import annotations

import datetime as dt
import threading
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select, update

from dicom_node.config import ConfigError, config_from_mapping
from dicom_node.ops.health import check_database, check_disk, check_models, check_threads
from dicom_node.ops.service import parse_roles
from dicom_node.store import audit
from dicom_node.store.copy import CopyRefused, copy_database
from dicom_node.store.database import make_engine, migrate, utcnow
from dicom_node.store.overview import queue_summary, recent_series
from dicom_node.store.queue import enqueue_job
from dicom_node.store.repository import InstanceFacts, record_instance
from dicom_node.store.schema import AuditEvent, Instance, Job
from dicom_node.web.auth import Authenticator, csrf_ok, hash_password, token_digest, verify_password


def test_roles() -> None:
    assert parse_roles([]) == {"receive", "worker", "export", "web"}
    assert parse_roles(["all"]) == parse_roles([])
    assert parse_roles(["receive,web", "worker"]) == {"receive", "web", "worker"}
    with pytest.raises(ValueError, match="unknown role 'gpu'"):
        parse_roles(["gpu"])


def test_password_hash_and_sessions() -> None:
    stored = hash_password("correct horse", iterations=1000)
    assert stored.startswith("pbkdf2_sha256$1000$") and "correct" not in stored
    assert verify_password("correct horse", stored) and not verify_password("wrong", stored)
    assert not verify_password("x", "garbage")
    auth = Authenticator([{"name": "a", "role": "admin", "password_hash": stored}],
                         [{"name": "t", "role": "read", "token_sha256": token_digest("tok")}], session_hours=1)
    assert auth.login("a", "wrong") is None and auth.login("b", "correct horse") is None
    session_id, principal = auth.login("a", "correct horse")  # type: ignore[misc]
    assert principal.is_admin and principal.actor == "user:a" and len(principal.csrf) > 30
    assert auth.session(session_id) == principal and auth.session("nope") is None
    assert csrf_ok(principal, principal.csrf) and not csrf_ok(principal, "") and not csrf_ok(principal, None)
    token = auth.bearer("tok")
    assert token is not None and token.role == "read" and csrf_ok(token, None) and auth.bearer("other") is None
    auth.logout(session_id)
    assert auth.session(session_id) is None
    short = Authenticator([{"name": "a", "role": "admin", "password_hash": stored}], [], session_hours=1e-9)
    expired, _ = short.login("a", "correct horse")  # type: ignore[misc]
    time.sleep(0.001)  # the session lives 3.6 us; without a pause the check can come sooner
    assert short.session(expired) is None


def test_web_configuration_is_validated(tmp_path: Path) -> None:
    good = hash_password("pw-123456", iterations=1000)
    cfg = config_from_mapping({"node": {"data_dir": str(tmp_path)}, "web": {
        "users": [{"name": "a", "role": "admin", "password_hash": good}],
        "tokens": [{"name": "m", "role": "read", "token_sha256": token_digest("x")}]}, "audit": {"retention_days": 30}},
        environ={})
    assert cfg.web.users[0]["name"] == "a" and cfg.audit.retention_days == 30
    with pytest.raises(ConfigError) as err:
        config_from_mapping({"node": {"data_dir": str(tmp_path)}, "web": {
            "users": [{"name": "a", "role": "root", "password_hash": "plain"}, {"name": "a", "password_hash": good,
                                                                             "email": "x"}],
            "tokens": [{"name": "t", "token_sha256": "abc"}], "session_hours": 0},
            "audit": {"retention_days": -1}}, environ={})
    text = str(err.value)
    for expected in ("web.users[0].role", "web.users[0].password_hash", "hash-password", "web.users[1].name",
                     "web.users[1]: unknown key(s) email", "web.tokens[0].token_sha256", "web.session_hours",
                     "audit.retention_days"):
        assert expected in text, expected


@pytest.fixture()
def engine(tmp_path: Path):
    eng = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    migrate(eng)
    yield eng
    eng.dispose()


def _instance(conn, i: int, series: str = "1.2.3.4") -> None:
    facts = InstanceFacts(study_uid="1.2.3", series_uid=series, sop_instance_uid=f"{series}.{i}",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                          modality="CT", patient_name="DOE^JANE", patient_id="PID-7")
    record_instance(conn, facts, f"spool/{i}.dcm", 10, utcnow())


def test_config_changes_are_audited(engine, tmp_path: Path) -> None:
    cfg = config_from_mapping({"node": {"data_dir": str(tmp_path)}}, "a.toml", environ={})
    now = utcnow()
    with engine.begin() as conn:
        assert audit.record_config(conn, cfg, now)
        assert not audit.record_config(conn, cfg, now)  # unchanged: nothing new
    cfg2 = config_from_mapping({"node": {"data_dir": str(tmp_path), "port": 11113}, "worker": {"max_attempts": 5}},
                               "a.toml", environ={})
    with engine.begin() as conn:
        assert audit.record_config(conn, cfg2, now)
        events = audit.query(conn, action="config.")
    assert [e.action for e in events] == ["config.changed", "config.loaded"]
    assert '"changed": ["node", "worker"]' in events[0].detail and events[0].actor == "file:a.toml"


def test_audit_query_and_retention(engine) -> None:
    now = utcnow()
    with engine.begin() as conn:
        audit.record(conn, "series.received", "node:assemble", now - dt.timedelta(days=40), series_uid="1.2.3")
        audit.record(conn, "export.retry", "user:a", now - dt.timedelta(days=1), object_kind="export", object_id=4)
        audit.record(conn, "series.exported", "node:export", now, series_uid="1.2.3")
    with engine.begin() as conn:
        assert [e.action for e in audit.query(conn, action="series.")] == ["series.exported", "series.received"]
        assert [e.object_id for e in audit.query(conn, actor="user:a")] == [4]
        assert len(audit.query(conn, uid="1.2.3")) == 2
        assert len(audit.query(conn, since=now - dt.timedelta(days=2))) == 2
        assert audit.purge(conn, now, 0) == 0
        assert audit.purge(conn, now, 30) == 1
        assert conn.execute(select(func.count()).select_from(AuditEvent)).scalar() == 2
    stop = threading.Event()
    stop.set()
    purger = audit.AuditPurger(SimpleNamespace(audit=SimpleNamespace(retention_days=0.5)), engine, stop)  # type: ignore[arg-type]
    purger.run()  # one pass, then stops
    with engine.connect() as conn:
        assert [e.action for e in audit.query(conn)] == ["series.exported"]


def test_copy_database_keeps_keys_and_refuses_a_full_target(engine, tmp_path: Path) -> None:
    with engine.begin() as conn:
        for i in range(3):
            _instance(conn, i)
        enqueue_job(conn, 1, 1, "ct", "m", 1.0, utcnow())
        audit.record(conn, "series.received", "x", utcnow(), series_uid="1.2.3.4")
    target = make_engine(f"sqlite:///{tmp_path / 'copy.sqlite3'}")
    copied = copy_database(engine, target)
    assert copied["instances"] == 3 and copied["jobs"] == 1 and copied["audit_events"] == 1
    with target.connect() as conn:
        assert sorted(conn.execute(select(Instance.id)).scalars()) == [1, 2, 3]
        assert conn.execute(select(Job.model)).scalar() == "m"
    with pytest.raises(CopyRefused, match="must be empty"):
        copy_database(engine, target)
    empty = make_engine(f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    with pytest.raises(CopyRefused, match="no dicom-node schema"):
        copy_database(empty, target)
    target.dispose()
    empty.dispose()


def test_overview_hides_patient_data_unless_asked(engine) -> None:
    with engine.begin() as conn:
        _instance(conn, 1)
        conn.exec_driver_sql("UPDATE series SET completion_count = 1, state = 'complete', completed_at = "
                             "last_received_at")
    with engine.connect() as conn:
        (plain,) = recent_series(conn)
        (named,) = recent_series(conn, with_patient=True)
        summary = queue_summary(conn, utcnow())
    assert plain.patient_name == "" and plain.patient_id == ""
    assert named.patient_name == "DOE^JANE" and named.patient_id == "PID-7"
    assert summary["series_completed"] == 1 and summary["series"]["complete"] == 1


def test_health_checks(engine, tmp_path: Path) -> None:
    cfg = config_from_mapping({"node": {"data_dir": str(tmp_path), "min_free_disk_gb": 0.0},
                               "rules": [{"name": "r", "model": "no-such-model"}]}, environ={})
    assert check_database(engine).ok
    assert check_disk(cfg).ok
    cfg.node.min_free_disk_gb = 1e9
    assert not check_disk(cfg).ok
    models = check_models(cfg)
    assert not models.ok and "no-such-model" in models.detail
    dead = threading.Thread(target=lambda: None, name="worker")
    dead.start()
    dead.join()
    assert not check_threads([dead]).ok and "worker" in check_threads([dead]).detail
    broken = make_engine("sqlite:////nonexistent-dir/x.sqlite3")
    assert not check_database(broken).ok


# ------------------------------------------------------------------------ the administrator's command line


def _site_config(tmp_path: Path) -> Path:
    """A configuration whose SQLite database is in ``tmp_path`` (schema created)."""
    config = tmp_path / "site.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path}"\n')
    eng = make_engine(f"sqlite:///{tmp_path / 'dicom-node.sqlite3'}")
    migrate(eng)
    eng.dispose()
    return config


def test_jobs_retry_says_why_it_cannot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main
    from dicom_node.store.schema import JobState

    config = _site_config(tmp_path)
    eng = make_engine(f"sqlite:///{tmp_path / 'dicom-node.sqlite3'}")
    with eng.begin() as conn:
        _instance(conn, 1)
        job = enqueue_job(conn, 1, 1, "ct", "m", 1.0, utcnow())
        conn.execute(update(Job).where(Job.id == job).values(state=JobState.succeeded))
    eng.dispose()
    assert main(["jobs", "retry", str(job), "--config", str(config)]) == 1
    assert capsys.readouterr().err.strip() == (f"dicom-node: job {job} is succeeded; only a failed or cancelled "
                                               "job can be retried")
    assert main(["jobs", "cancel", "99", "--export", "--config", str(config)]) == 1
    assert capsys.readouterr().err.strip() == "dicom-node: no export 99"


def test_audit_columns_fit_the_longest_actor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main

    config = _site_config(tmp_path)
    actor = "a-rather-long-host-name.example.org:123456:worker"
    eng = make_engine(f"sqlite:///{tmp_path / 'dicom-node.sqlite3'}")
    with eng.begin() as conn:
        audit.record(conn, "series.processed", actor, utcnow(), series_uid="1.2.3", detail="model m")
        audit.record(conn, "job.retry", "cli:root", utcnow(), object_kind="job", object_id=7)
    eng.dispose()
    assert main(["audit", "--config", str(config)]) == 0
    processed, retry = capsys.readouterr().out.splitlines()
    assert f" {actor} series.processed " in processed
    assert retry.index("job.retry") == processed.index("series.processed")  # one column, whatever the actor


PASSWORD_HASH = "pbkdf2_sha256$1000$00$" + "0" * 64

SITE_TEXT = '''# Our site. Keep this comment.
[node]
ae_title = "DENOISE"   # the scanners know it

[web]
port = 8080
# Dashboard users, one line each.
users = [
    # { name = "alice", role = "admin", password_hash = "..." },
    { name = "bob", role = "read", password_hash = "PASSWORD_HASH" }   # radiology
]
tokens = []

[[rules]]
name = "ct"
match = { Modality = "CT" }
forward_original = true
'''.replace("PASSWORD_HASH", PASSWORD_HASH)


def test_add_user_edits_only_the_users_array(tmp_path: Path) -> None:
    from dicom_node.ops.config_edit import ConfigEditError, add_web_user

    site = tmp_path / "site.toml"
    site.write_text(SITE_TEXT)
    site.chmod(0o640)
    backup = add_web_user(site, "carol", "admin", PASSWORD_HASH.replace("0" * 64, "1" * 64))
    text = site.read_text()
    assert backup == tmp_path / "site.toml.bak" and backup.read_text() == SITE_TEXT
    assert stat_mode(site) == 0o640
    # Every line of the old file is still there, in order; the new user is the only line added (and a comma).
    old_lines = SITE_TEXT.splitlines()
    new_lines = text.splitlines()
    assert [line for line in new_lines if "carol" not in line] == [
        line.replace("}   # radiology", "},   # radiology") for line in old_lines]
    cfg = config_from_mapping(tomllib.loads(text) | {"node": {"data_dir": str(tmp_path)}}, "site", environ={})
    assert [(u["name"], u["role"]) for u in cfg.web.users] == [("bob", "read"), ("carol", "admin")]
    with pytest.raises(ConfigEditError, match="already has a user or token named 'bob'"):
        add_web_user(site, "bob", "read", PASSWORD_HASH)
    assert site.read_text() == text  # refused: nothing written
    # No [web] table at all, and an empty array with a comment: both get a multi-line array.
    bare = tmp_path / "bare.toml"
    bare.write_text('[node]\nport = 11112\n')
    add_web_user(bare, "dave", "read", PASSWORD_HASH)
    assert tomllib.loads(bare.read_text())["web"]["users"][0]["name"] == "dave"
    empty = tmp_path / "empty.toml"
    empty.write_text('[web]\nusers = []   # none yet\nport = 8081\n')
    add_web_user(empty, "erin", "admin", PASSWORD_HASH)
    assert empty.read_text().startswith('[web]\nusers = [   # none yet\n    { name = "erin", role = "admin"')
    assert tomllib.loads(empty.read_text())["web"]["port"] == 8081


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_add_user_command_lets_the_user_log_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from dicom_node.cli import main
    from dicom_node.config import load_config

    site = tmp_path / "site.toml"
    site.write_text(f'[node]\ndata_dir = "{tmp_path}"\n')
    link = tmp_path / "link.toml"
    link.symlink_to(site)
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
    assert main(["web", "add-user", "alice", "--role", "admin", "--password-stdin", "--config", str(link)]) == 0
    assert link.is_symlink()  # the file it points to was edited, the link kept
    assert "added admin user 'alice'" in capsys.readouterr().out
    cfg = load_config(link, environ={})
    auth = Authenticator(cfg.web.users, cfg.web.tokens, session_hours=1)
    assert auth.login("alice", "correct horse battery") is not None and auth.login("alice", "wrong") is None
    # The annotated example shipped with the package is never edited (the README has you copy it first).
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
    example = Path(__file__).resolve().parents[2] / "deploy" / "dicom-node.example.toml"
    assert main(["web", "add-user", "bob", "--role", "read", "--password-stdin", "--config", str(example)]) == 1
    assert "make your own copy first" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["web", "add-user", "carol", "--role", "read", "--password-stdin", "--config", str(site)]) == 1
    assert "at least 8 characters" in capsys.readouterr().err
