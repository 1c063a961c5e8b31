"""Dashboard users, sessions and CSRF tokens.

Passwords are stored as PBKDF2-HMAC-SHA256 hashes (``pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>``, the
format Django uses) and API tokens as their SHA-256 digest; neither is ever kept in clear. A login creates a
server-side session (random 256-bit id in an ``HttpOnly; SameSite=Strict`` cookie) holding the user, the role and
a CSRF token that every state-changing request must send back (form field ``csrf_token`` or header
``X-CSRF-Token``). Bearer-token requests carry no cookie, so they cannot be forged cross-site and need no CSRF token.
Sessions live in the web process's memory: restarting it logs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

LOGGER = logging.getLogger(__name__)

PBKDF2_ITERATIONS = 600_000
ROLE_READ = "read"
ROLE_ADMIN = "admin"


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """Return the storable hash of ``password``."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches the stored hash (constant-time comparison)."""
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != "pbkdf2_sha256":
            return False
        computed = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), bytes.fromhex(salt), int(iterations))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(computed.hex(), digest)


def token_digest(token: str) -> str:
    """The SHA-256 hex digest under which an API token is configured."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who makes a request: ``user:NAME`` or ``token:NAME``, with a role."""

    name: str
    kind: str
    role: str
    #: The session's CSRF token; empty for bearer tokens (no cookie, nothing to forge).
    csrf: str = ""

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN


@dataclass
class _Session:
    principal: Principal
    expires: float


class Authenticator:
    """Checks passwords and tokens against ``[web]`` and keeps the sessions of logged-in users."""

    def __init__(self, users: list[dict[str, Any]], tokens: list[dict[str, Any]], session_hours: float) -> None:
        self.users = {u["name"]: u for u in users}
        self.tokens = {t["token_sha256"]: t for t in tokens}
        self.session_seconds = session_hours * 3600
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def update(self, users: list[dict[str, Any]], tokens: list[dict[str, Any]], session_hours: float) -> int:
        """Take reloaded ``[web]`` users and tokens; return how many sessions ended.

        Sessions of users that were removed, or whose role or password hash changed, end at once; the others
        keep their expiry.
        """
        new_users = {u["name"]: u for u in users}
        with self._lock:
            ended = [sid for sid, s in self._sessions.items()
                     if (new := new_users.get(s.principal.name)) is None
                     or new.get("role", ROLE_READ) != s.principal.role
                     or new.get("password_hash") != self.users.get(s.principal.name, {}).get("password_hash")]
            for sid in ended:
                del self._sessions[sid]
            self.users = new_users
            self.tokens = {t["token_sha256"]: t for t in tokens}
            self.session_seconds = session_hours * 3600
        return len(ended)

    def login(self, name: str, password: str) -> tuple[str, Principal] | None:
        """Check a user's password; on success return a new session id and its principal."""
        user = self.users.get(name)
        # Verify against a dummy hash for unknown users too, so timing does not reveal which names exist.
        ok = verify_password(password, user["password_hash"] if user else _DUMMY_HASH)
        if not user or not ok:
            return None
        principal = Principal(name, "user", user.get("role", ROLE_READ), secrets.token_urlsafe(32))
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._sessions = {k: v for k, v in self._sessions.items() if v.expires > now}
            self._sessions[session_id] = _Session(principal, now + self.session_seconds)
        return session_id, principal

    def session(self, session_id: str | None) -> Principal | None:
        """The principal of a live session."""
        if not session_id:
            return None
        with self._lock:
            found = self._sessions.get(session_id)
            if found is None or found.expires <= time.monotonic():
                self._sessions.pop(session_id, None)
                return None
            return found.principal

    def logout(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)

    def bearer(self, token: str) -> Principal | None:
        """The principal of an API token."""
        entry = self.tokens.get(token_digest(token))
        if entry is None:
            return None
        return Principal(entry["name"], "token", entry.get("role", ROLE_READ))


def csrf_ok(principal: Principal, sent: str | None) -> bool:
    """Whether a state-changing request carries the session's CSRF token (bearer tokens need none)."""
    if principal.kind == "token":
        return True
    return bool(sent) and hmac.compare_digest(principal.csrf, sent or "")


_DUMMY_HASH = hash_password("not a password", iterations=PBKDF2_ITERATIONS, salt=b"\x00" * 16)
