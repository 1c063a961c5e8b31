"""Careful textual edits of a configuration file: add a dashboard user to ``[web] users``.

The file is an administrator's: its comments, order and layout are kept. The edit inserts one inline table into
the ``users`` array (or adds the key, or the ``[web]`` table) at the right place, found by a small scanner that
knows TOML's strings, comments and brackets. The result is parsed again and must equal the old file's content
plus the new user and nothing else, or nothing is written. The old file is kept as ``FILE.bak``; the new one
replaces it atomically (written beside it, fsynced, renamed), with the old file's mode and, where allowed, owner.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

#: Dashboard user names: what a login form accepts without surprises.
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class ConfigEditError(ValueError):
    """The file cannot be edited safely, or the edit is refused (the message says why)."""


@dataclass
class _Scan:
    """Per character of the text: whether it is TOML code (not in a string or comment), and the bracket depth."""

    code: list[bool]
    depth: list[int]


def _scan(text: str) -> _Scan:
    code = [True] * len(text)
    depth = [0] * len(text)
    level = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        depth[i] = level
        if ch == "#":
            while i < n and text[i] != "\n":
                code[i], depth[i] = False, level
                i += 1
            continue
        if ch in "\"'":
            quote = ch * 3 if text.startswith(ch * 3, i) else ch
            j = i + len(quote)
            while j < n:
                if quote[0] == '"' and text[j] == "\\":
                    j += 2
                    continue
                if text.startswith(quote, j):
                    # A multi-line string may end in up to two more quotes ("""a"""""); take them in.
                    while len(quote) == 3 and text.startswith(quote[0], j + 3):
                        j += 1
                    j += len(quote)
                    break
                if len(quote) == 1 and text[j] == "\n":
                    break
                j += 1
            for k in range(i, min(j, n)):
                code[k], depth[k] = False, level
            i = j
            continue
        if ch in "[{":
            level += 1
        elif ch in "]}":
            level -= 1
            depth[i] = level
        i += 1
    return _Scan(code, depth)


def _line_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in re.finditer(r"\n", text)]


def _header(text: str, scan: _Scan, start: int) -> str | None:
    """The table header (``web``, ``[web.users]`` as ``[web.users]``...) starting the line at ``start``."""
    j = start
    while j < len(text) and text[j] in " \t":
        j += 1
    if j >= len(text) or text[j] != "[" or not scan.code[j] or scan.depth[j] != 0:
        return None
    end = text.find("\n", j)
    line = text[j:end if end >= 0 else len(text)]
    m = re.match(r"^(\[\[?)\s*([^\]]+?)\s*(\]\]?)\s*(#.*)?$", line)
    if not m:
        return None
    name = ".".join(part.strip().strip('"\'') for part in m.group(2).split("."))
    return f"[{name}]" if m.group(1) == "[[" else name


def _toml_entry(name: str, role: str, password_hash: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return (f"{{ name = {json.dumps(name)}, role = {json.dumps(role)}, "
            f"password_hash = {json.dumps(password_hash)} }}")


def _insert_user(text: str, entry: str) -> str:
    """``text`` with ``entry`` (an inline table) added to ``[web] users``."""
    scan = _scan(text)
    starts = _line_starts(text)
    headers = [(s, h) for s in starts if (h := _header(text, scan, s)) is not None]
    if any(h == "[web.users]" for _, h in headers):
        raise ConfigEditError("[web] users is written as [[web.users]] tables; add the user as one more such "
                              "table by hand")
    web = [s for s, h in headers if h == "web"]
    if not web:
        first_header = headers[0][0] if headers else len(text)
        if re.search(r"^\s*web\s*\.", text[:first_header], re.M):
            raise ConfigEditError("the file sets web.* with dotted keys; add the user by hand")
        sep = "" if text.endswith("\n") or not text else "\n"
        return f"{text}{sep}\n[web]\nusers = [\n    {entry},\n]\n"
    web_start = web[0]
    body_start = text.find("\n", web_start)
    body_start = len(text) if body_start < 0 else body_start + 1
    later = [s for s, _ in headers if s > web_start]
    body_end = later[0] if later else len(text)
    for s in starts:
        if not body_start <= s < body_end or scan.depth[s] != 0 or not scan.code[s]:
            continue
        m = re.match(r"[ \t]*(users|\"users\"|'users')[ \t]*=[ \t]*", text[s:])
        if not m:
            continue
        open_at = s + m.end()
        if open_at >= len(text) or text[open_at] != "[":
            raise ConfigEditError("web.users is not an array written as [ ... ]; add the user by hand")
        level = scan.depth[open_at]
        close_at = next((k for k in range(open_at + 1, len(text))
                         if text[k] == "]" and scan.code[k] and scan.depth[k] == level), None)
        if close_at is None:
            raise ConfigEditError("web.users has no closing bracket")
        inner_code = [k for k in range(open_at + 1, close_at) if scan.code[k] and not text[k].isspace()]
        multi_line = "\n" in text[open_at:close_at]
        if not inner_code and not multi_line:  # users = []
            line_end = text.find("\n", close_at)
            line_end = len(text) if line_end < 0 else line_end
            tail = text[close_at + 1:line_end]
            if tail.strip().startswith("#"):  # the line's comment stays on the key's line
                return f"{text[:open_at]}[{tail}\n    {entry},\n]{text[line_end:]}"
            return f"{text[:open_at]}[\n    {entry},\n]{text[close_at + 1:]}"
        comma = "" if not inner_code or text[inner_code[-1]] == "," else ","
        if comma:  # after the last element, before any comment that follows it
            text = text[:inner_code[-1] + 1] + "," + text[inner_code[-1] + 1:]
            close_at += 1
        if not multi_line:
            return f"{text[:close_at]} {entry}{text[close_at:]}"
        line_start = text.rfind("\n", 0, close_at) + 1
        if text[line_start:close_at].strip():  # "... }]" : the bracket shares a line with an element
            return f"{text[:close_at]}\n    {entry},\n{text[close_at:]}"
        return f"{text[:line_start]}    {entry},\n{text[line_start:]}"
    # [web] without users: the key goes right after the header line.
    return f"{text[:body_start]}users = [\n    {entry},\n]\n{text[body_start:]}"


def add_web_user(path: str | os.PathLike[str], name: str, role: str, password_hash: str,
                 refuse: Path | None = None) -> Path:
    """Add ``{ name, role, password_hash }`` to ``[web] users`` of the file at ``path``; return the backup's path.

    Parameters
    ----------
    path
        The configuration file (a symbolic link is followed: the file it points to is edited, the link stays).
    refuse
        A file that must not be edited (the annotated example shipped with the package).

    Raises
    ------
    ConfigEditError
        The file cannot be read or parsed, a user or token of that name exists, or the edit could not be made
        without changing anything else.
    """
    link = Path(path)
    target = link.resolve()
    if refuse is not None and refuse.exists() and target == refuse.resolve():
        raise ConfigEditError(f"{link} is the example shipped with dicom-node; make your own copy first "
                              f"(dicom-node config example > dicom-node.toml) and use that")
    if not USER_NAME.match(name):
        raise ConfigEditError(f"{name!r} is not a user name: 1-64 letters, digits, '.', '_', '@' or '-'")
    try:
        text = target.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigEditError(f"cannot read {link}: {exc.strerror or exc}") from exc
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigEditError(f"{link} is not valid TOML: {exc}") from exc
    web = before.get("web", {})
    if not isinstance(web, dict):
        raise ConfigEditError(f"{link}: web is not a table")
    users, tokens = web.get("users", []), web.get("tokens", [])
    if not isinstance(users, list) or not isinstance(tokens, list):
        raise ConfigEditError(f"{link}: web.users and web.tokens must be arrays")
    taken = {e.get("name") for e in [*users, *tokens] if isinstance(e, dict)}
    if name in taken:
        raise ConfigEditError(f"{link} already has a user or token named {name!r}")
    new_user = {"name": name, "role": role, "password_hash": password_hash}
    new_text = _insert_user(text, _toml_entry(name, role, password_hash))
    expected = copy.deepcopy(before)
    expected.setdefault("web", {}).setdefault("users", []).append(new_user)
    try:
        after = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigEditError(f"could not add the user to {link} without breaking it ({exc}); add it by hand: "
                              f"{_toml_entry(name, role, password_hash)}") from exc
    if after != expected:
        raise ConfigEditError(f"could not add the user to {link} without changing something else; add it by hand "
                              f"to [web] users: {_toml_entry(name, role, password_hash)}")
    return replace_keeping_backup(target, new_text)


def replace_keeping_backup(target: Path, new_text: str) -> Path:
    """Copy ``target`` to ``target.bak``, then atomically replace it by ``new_text`` with its mode and owner."""
    info = target.stat()
    backup = target.with_name(target.name + ".bak")
    shutil.copy2(target, backup)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(new_text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, stat.S_IMODE(info.st_mode))
        for f in (tmp, backup):
            try:
                os.chown(f, info.st_uid, info.st_gid)
            except PermissionError:  # not root: the file stays ours, as it was when we could write it
                pass
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return backup

