"""Operating the node without sockets: roles, passwords and sessions, web configuration, the audit log and its
retention, copying a job table, health checks, the dashboard's patient-data switch."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select

from dicom_node import audit
from dicom_node.config import ConfigError, config_from_mapping
from dicom_node.health import check_database, check_disk, check_models, check_threads
from dicom_node.service import parse_roles
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
def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    eng = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    migrate(eng)
    yield eng
    eng.dispose()


def _instance(conn, i: int, series: str = "1.2.3.4") -> None:  # type: ignore[no-untyped-def]
    facts = InstanceFacts(study_uid="1.2.3", series_uid=series, sop_instance_uid=f"{series}.{i}",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                          modality="CT", patient_name="DOE^JANE", patient_id="PID-7")
    record_instance(conn, facts, f"spool/{i}.dcm", 10, utcnow())


def test_config_changes_are_audited(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
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


def test_audit_query_and_retention(engine) -> None:  # type: ignore[no-untyped-def]
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


def test_copy_database_keeps_keys_and_refuses_a_full_target(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
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


def test_overview_hides_patient_data_unless_asked(engine) -> None:  # type: ignore[no-untyped-def]
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


def test_health_checks(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
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
