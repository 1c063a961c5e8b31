"""Login throttling in the database, and where a login may redirect to (no sockets)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from dicom_node.store import throttle
from dicom_node.store.database import make_engine, migrate
from dicom_node.web.app import same_site_path

NOW = dt.datetime(2026, 12, 4, 12, 0, 0)
LIMITS = throttle.Limits(max_failures=3, max_failures_per_address=5, window=dt.timedelta(minutes=15),
                         lockout=dt.timedelta(minutes=10))


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    migrate(engine)
    yield engine
    engine.dispose()


def fail(engine: Engine, user: str, address: str, at: dt.datetime) -> tuple[int, list[throttle.Lock]]:
    with engine.begin() as conn:
        return throttle.record_failure(conn, LIMITS, user, address, at)


def test_user_is_locked_after_max_failures_then_unlocked(engine: Engine) -> None:
    assert [fail(engine, "alice", "10.0.0.1", NOW + dt.timedelta(seconds=i))[1] for i in range(2)] == [[], []]
    failures, locks = fail(engine, "alice", "10.0.0.1", NOW + dt.timedelta(seconds=2))
    assert failures == 3 and locks == [throttle.Lock("user", "alice", NOW + dt.timedelta(seconds=2, minutes=10))]
    with engine.begin() as conn:
        assert throttle.active_lock(conn, "alice", "10.9.9.9", NOW + dt.timedelta(minutes=5)).kind == "user"
        assert throttle.active_lock(conn, "bob", "10.0.0.1", NOW + dt.timedelta(minutes=5)) is None
        assert throttle.active_lock(conn, "alice", "10.9.9.9", NOW + dt.timedelta(minutes=11)) is None  # expired
        assert throttle.unlock(conn, "user", "alice", NOW + dt.timedelta(minutes=5))
        assert throttle.active_lock(conn, "alice", "10.9.9.9", NOW + dt.timedelta(minutes=5)) is None
        assert not throttle.unlock(conn, "user", "alice", NOW + dt.timedelta(minutes=5))


def test_old_failures_do_not_count_and_success_clears_the_user(engine: Engine) -> None:
    fail(engine, "alice", "10.0.0.1", NOW)
    fail(engine, "alice", "10.0.0.1", NOW)
    # Outside the window: counting starts again.
    assert fail(engine, "alice", "10.0.0.1", NOW + dt.timedelta(minutes=16)) == (1, [])
    with engine.begin() as conn:
        throttle.record_success(conn, "alice")
    assert fail(engine, "alice", "10.0.0.2", NOW + dt.timedelta(minutes=17))[0] == 1


def test_address_is_locked_by_failures_of_many_names(engine: Engine) -> None:
    locks = [fail(engine, f"name-{i}", "10.0.0.7", NOW)[1] for i in range(5)]
    assert locks[:4] == [[], [], [], []] and locks[4] == [throttle.Lock("address", "10.0.0.7", NOW + LIMITS.lockout)]
    with engine.begin() as conn:
        assert throttle.active_lock(conn, "anyone", "10.0.0.7", NOW).kind == "address"
        assert [lk.subject for lk in throttle.active_locks(conn, NOW)] == ["10.0.0.7"]
        with pytest.raises(ValueError):
            throttle.unlock(conn, "host", "10.0.0.7", NOW)


def test_failure_delay_grows_and_is_capped() -> None:
    assert [throttle.failure_delay(n) for n in range(7)] == [0.0, 0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


@pytest.mark.parametrize("target", ["/\\evil.example/", "//evil.example", "///x", "https://evil.example/",
                                    "javascript:alert(1)", "/\t/evil", "/\r\nSet-Cookie: a=b", "", "evil",
                                    " /x", "/caf\u00e9", "/a\\b"])
def test_hostile_next_goes_home(target: str) -> None:
    assert same_site_path(target) == "/"


@pytest.mark.parametrize("target", ["/", "/audit?action=login", "/preview/3.png", "/a/b#c"])
def test_same_site_paths_are_kept(target: str) -> None:
    assert same_site_path(target) == target
