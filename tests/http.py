"""A tiny HTTP client for tests: no redirects followed, cookies kept per client, JSON helpers."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass
class Client:
    """Talks to ``base`` (``http://127.0.0.1:PORT``), keeping the session cookie it is given."""

    base: str
    cookies: dict[str, str] = field(default_factory=dict)
    csrf: str = ""

    def request(self, method: str, path: str, form: dict[str, Any] | None = None, json_body: bool = False,
                headers: dict[str, str] | None = None, accept_json: bool = True) -> Answer:
        data = None
        hdrs = {**(headers or {})}
        if accept_json:
            hdrs.setdefault("Accept", "application/json")
        if form is not None:
            if json_body:
                data = json.dumps(form).encode()
                hdrs["Content-Type"] = "application/json"
            else:
                data = urllib.parse.urlencode(form).encode()
                hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        if self.cookies:
            hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(req, timeout=60) as rsp:
                answer = Answer(rsp.status, dict(rsp.headers.items()), rsp.read())
        except urllib.error.HTTPError as exc:
            answer = Answer(exc.code, dict(exc.headers.items()), exc.read())
        cookie = answer.headers.get("Set-Cookie")
        if cookie:
            name, _, rest = cookie.partition("=")
            self.cookies[name] = rest.split(";")[0]
        return answer

    def login(self, user: str, password: str) -> Answer:
        answer = self.request("POST", "/login", {"username": user, "password": password})
        if answer.status == 200:
            self.csrf = answer.json()["csrf_token"]
        return answer
