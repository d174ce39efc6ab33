"""A GET to the service, as nginx or a health checker makes it: HTTP, or the uwsgi protocol
(what nginx's `uwsgi_pass` speaks), over a unix socket or TCP (protocol/endpoint.py)."""

from __future__ import annotations

import http.client
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from ..inside.wsgi import DEFAULT_HEALTH_PATH
from ..protocol.endpoint import UWSGI, Endpoint

Target = Endpoint | str | Path


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    seconds: float

    def json(self) -> dict:
        return json.loads(self.body)


def endpoint_of(target: Target) -> Endpoint:
    """An Endpoint as is; a path or host:port (a --socket option, an older caller) as HTTP."""
    return target if isinstance(target, Endpoint) else Endpoint.parse(str(target))


def uwsgi_packet(path: str, host: str = "hotswap") -> bytes:
    """A uwsgi-protocol request: a 4-byte header (modifier1 0 = WSGI, the vars' size as a
    little-endian u16, modifier2 0), then each CGI variable as u16 length + bytes, twice."""
    route, _, query = path.partition("?")
    variables = {"REQUEST_METHOD": "GET", "REQUEST_URI": path, "PATH_INFO": route,
                 "QUERY_STRING": query, "SERVER_PROTOCOL": "HTTP/1.0", "HTTP_HOST": host,
                 "SERVER_NAME": host, "SERVER_PORT": "80", "REMOTE_ADDR": "127.0.0.1",
                 "HTTP_USER_AGENT": "hotswap-probe"}
    body = b"".join(struct.pack("<H", len(item)) + item
                    for key, value in variables.items()
                    for item in (key.encode(), value.encode()))
    return struct.pack("<BHB", 0, len(body), 0) + body


def get(target: Target, path: str = DEFAULT_HEALTH_PATH, timeout: float = 5.0) -> Answer:
    """GET `path` on the endpoint. Raises OSError (incl. TimeoutError) on failure."""
    started = time.perf_counter()
    where = endpoint_of(target)
    sock = where.connect(timeout)
    try:
        if where.protocol == UWSGI:
            request = uwsgi_packet(path)
        else:
            request = (f"GET {path} HTTP/1.0\r\nHost: hotswap\r\n"
                       "User-Agent: hotswap-probe\r\n\r\n").encode()
        sock.sendall(request)
        # uWSGI answers both protocols with an HTTP status line and headers
        response = http.client.HTTPResponse(sock, method="GET")
        response.begin()
        body = response.read()
    except http.client.HTTPException as exc:
        raise OSError(f"bad HTTP answer: {exc!r}") from exc
    finally:
        sock.close()
    return Answer(response.status, body, time.perf_counter() - started)


def healthz(target: Target, timeout: float = 5.0,
            path: str = DEFAULT_HEALTH_PATH) -> dict | None:
    """The health document (hotswap/inside/wsgi.py) at `path` (the ini's health path, Config.
    health_path), or None if the service does not answer 200 with JSON."""
    try:
        answer = get(target, path, timeout)
        return answer.json() if answer.status == 200 else None
    except (OSError, ValueError):
        return None


def from_master(health: dict | None, master: int | None) -> dict | None:
    """`health` if it is an answer from a worker of `master` (the one test of "does the health
    path answer from master X" that the reload, its rollback and the tests share)."""
    return health if health and master and health.get("master_pid") == master else None
