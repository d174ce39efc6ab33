"""HTTP over the service's unix socket: the same request nginx or a health checker makes."""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..inside.wsgi import DEFAULT_HEALTH_PATH


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str | Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(socket_path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    seconds: float

    def json(self) -> dict:
        return json.loads(self.body)


def get(socket_path: str | Path, path: str = DEFAULT_HEALTH_PATH, timeout: float = 5.0) -> Answer:
    """GET `path` over the unix socket. Raises OSError (incl. TimeoutError) on failure."""
    started = time.perf_counter()
    conn = UnixHTTPConnection(socket_path, timeout)
    try:
        conn.request("GET", path, headers={"Host": "hotswap", "User-Agent": "hotswap-probe"})
        response = conn.getresponse()
        body = response.read()
    except http.client.HTTPException as exc:
        raise OSError(f"bad HTTP answer: {exc!r}") from exc
    finally:
        conn.close()
    return Answer(response.status, body, time.perf_counter() - started)


def healthz(socket_path: str | Path, timeout: float = 5.0,
            path: str = DEFAULT_HEALTH_PATH) -> dict | None:
    """The health document (hotswap/inside/wsgi.py) at `path` (the ini's health path, Config.
    health_path), or None if the service does not answer 200 with JSON."""
    try:
        answer = get(socket_path, path, timeout)
        return answer.json() if answer.status == 200 else None
    except (OSError, ValueError):
        return None


def from_master(health: dict | None, master: int | None) -> dict | None:
    """`health` if it is an answer from a worker of `master` (the one test of "does the health
    path answer from master X" that the reload, its rollback and the tests share)."""
    return health if health and master and health.get("master_pid") == master else None
