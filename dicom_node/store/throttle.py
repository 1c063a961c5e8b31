"""Login rate limit: failed dashboard and STOW-RS logins slow the answer down, then lock the name or the address.

Failures are counted per user name (as typed, known or not, so a lock-out reveals nothing about which names exist)
and per client address, in the ``login_throttle`` table, so a lock-out survives a restart and holds for every web
process of a site. ``web.login_max_failures`` failures of one name within ``web.login_window_minutes`` lock that
name for ``web.login_lockout_minutes``; ``web.login_max_failures_per_address`` failures from one address (any
names) lock that address. While a name or an address is locked even the right password is refused. Each failed
answer is delayed a little more than the one before (:func:`failure_delay`). An administrator unlocks on the
dashboard's admin page or with ``dicom-node web unlock NAME``.

STOW-RS clients (``[dicomweb] sources``) share the table and the limits: their names are counted as
``dicomweb:NAME`` (:func:`stow_subject`), apart from dashboard users of the same name, and their addresses with
everyone's, so a host guessing passwords on both doors is locked on both.

Every function works in the caller's transaction; the caller writes the audit events.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, delete, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from dicom_node.store.schema import LoginThrottle

USER = "user"
ADDRESS = "address"
KINDS = (USER, ADDRESS)
#: Longest delay of a failed login's answer, in seconds.
MAX_DELAY_SECONDS = 2.0


@dataclass(frozen=True)
class Limits:
    """The thresholds of ``[web]``."""

    max_failures: int = 5
    max_failures_per_address: int = 20
    window: dt.timedelta = dt.timedelta(minutes=15)
    lockout: dt.timedelta = dt.timedelta(minutes=15)

    @classmethod
    def from_settings(cls, web: Any) -> Limits:
        """The limits configured in a :class:`~dicom_node.config.WebSettings`."""
        return cls(web.login_max_failures, web.login_max_failures_per_address,
                   dt.timedelta(minutes=web.login_window_minutes), dt.timedelta(minutes=web.login_lockout_minutes))

    def threshold(self, kind: str) -> int:
        return self.max_failures if kind == USER else self.max_failures_per_address


@dataclass(frozen=True)
class Lock:
    """A user name or a client address whose logins are refused until ``until``."""

    kind: str
    subject: str
    until: dt.datetime


def _subject(text: str) -> str:
    return text[:128]


def stow_subject(name: str) -> str:
    """The throttle's user name for the STOW-RS source ``name`` (kept apart from dashboard user names)."""
    return f"dicomweb:{name}"


def active_lock(conn: Connection, user: str, address: str, now: dt.datetime) -> Lock | None:
    """The lock-out that refuses this login (of the user name or of the address), or ``None``."""
    rows = conn.execute(select(LoginThrottle.kind, LoginThrottle.subject, LoginThrottle.locked_until).where(
        or_(and_(LoginThrottle.kind == USER, LoginThrottle.subject == _subject(user)),
            and_(LoginThrottle.kind == ADDRESS, LoginThrottle.subject == _subject(address))),
        LoginThrottle.locked_until > now)).all()
    if not rows:
        return None
    row = max(rows, key=lambda r: r.locked_until)
    return Lock(row.kind, row.subject, row.locked_until)


def _row_for_update(conn: Connection, kind: str, subject: str, now: dt.datetime) -> Any:
    """The throttle row of ``(kind, subject)``, created when missing, locked until the transaction ends."""
    values = {"kind": kind, "subject": subject, "failures": 0, "window_start": now, "last_failure_at": now,
              "locked_until": None}
    if conn.dialect.name == "postgresql":
        conn.execute(postgresql_insert(LoginThrottle).values(**values).on_conflict_do_nothing())
    else:
        conn.execute(sqlite_insert(LoginThrottle).values(**values).on_conflict_do_nothing())
    return conn.execute(select(LoginThrottle.__table__).where(LoginThrottle.kind == kind,
                                                              LoginThrottle.subject == subject)
                        .with_for_update()).one()


def record_failure(conn: Connection, limits: Limits, user: str | None, address: str,
                   now: dt.datetime) -> tuple[int, list[Lock]]:
    """Count a failed login of ``user`` from ``address`` (``user`` ``None``: no name was claimed, as with a wrong
    bearer token; only the address is counted, so one stranger's guesses cannot lock every token out).

    Returns
    -------
    tuple[int, list[Lock]]
        The user name's failures within the window (this one included; for :func:`failure_delay`), and the
        lock-outs this failure started (for the audit log).
    """
    started: list[Lock] = []
    user_failures = 0
    counted = ((USER, _subject(user)),) if user is not None else ()
    for kind, subject in (*counted, (ADDRESS, _subject(address))):
        row = _row_for_update(conn, kind, subject, now)
        failures, window_start = row.failures, row.window_start
        if window_start <= now - limits.window:
            failures, window_start = 0, now  # the earlier failures are too old to count
        failures += 1
        locked_until = row.locked_until if row.locked_until is not None and row.locked_until > now else None
        if kind == USER:
            user_failures = failures
        if failures >= limits.threshold(kind):
            locked_until = now + limits.lockout
            started.append(Lock(kind, subject, locked_until))
            failures, window_start = 0, now
        conn.execute(update(LoginThrottle).where(LoginThrottle.kind == kind, LoginThrottle.subject == subject)
                     .values(failures=failures, window_start=window_start, last_failure_at=now,
                             locked_until=locked_until))
    # Forget names and addresses that failed long ago and are not locked, so the table stays small.
    conn.execute(delete(LoginThrottle).where(LoginThrottle.last_failure_at < now - limits.window - limits.lockout,
                                             or_(LoginThrottle.locked_until.is_(None),
                                                 LoginThrottle.locked_until <= now)))
    return user_failures, started


def record_success(conn: Connection, user: str) -> None:
    """A successful login clears the user name's failures (not the address's: one good account must not reset
    the count of an address that guesses the passwords of others)."""
    conn.execute(delete(LoginThrottle).where(LoginThrottle.kind == USER, LoginThrottle.subject == _subject(user)))


def unlock(conn: Connection, kind: str, subject: str, now: dt.datetime) -> bool:
    """Lift the lock-out of a user name or an address and clear its failures; return whether it was locked."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    was_locked = conn.execute(select(LoginThrottle.kind).where(
        LoginThrottle.kind == kind, LoginThrottle.subject == _subject(subject),
        LoginThrottle.locked_until > now)).first() is not None
    conn.execute(delete(LoginThrottle).where(LoginThrottle.kind == kind, LoginThrottle.subject == _subject(subject)))
    return was_locked


def active_locks(conn: Connection, now: dt.datetime) -> list[Lock]:
    """Every lock-out in force, the longest first."""
    rows = conn.execute(select(LoginThrottle.kind, LoginThrottle.subject, LoginThrottle.locked_until)
                        .where(LoginThrottle.locked_until > now)
                        .order_by(LoginThrottle.locked_until.desc())).all()
    return [Lock(r.kind, r.subject, r.locked_until) for r in rows]


def failure_delay(failures: int) -> float:
    """Seconds to hold back the answer to a user name's ``failures``-th failed login: 0.25, 0.5, 1, 2, 2, ..."""
    if failures <= 0:
        return 0.0
    return min(MAX_DELAY_SECONDS, 0.25 * 2 ** (failures - 1))


def describe(lock: Lock, now: dt.datetime) -> str:
    """What a refused login is told: who is locked, until when, and how to get unlocked."""
    minutes = max(1, round((lock.until - now).total_seconds() / 60))
    who = f"user {lock.subject!r}" if lock.kind == USER else f"address {lock.subject}"
    how = (f"`dicom-node web unlock '{lock.subject}'`" if lock.kind == USER
           else f"`dicom-node web unlock --address {lock.subject}`")
    return (f"Too many failed logins: {who} is locked until {lock.until:%H:%M} UTC (about {minutes} min). "
            f"An administrator can unlock it on the Admin page or with {how}.")
