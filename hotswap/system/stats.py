"""uWSGI's stats server: a unix socket that answers one JSON document and closes."""

from __future__ import annotations

import json
import socket
from pathlib import Path


def read(stats_socket: Path, timeout: float = 2.0) -> dict | None:
    """The stats document of the newest master, or None when nobody answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(stats_socket))
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return json.loads(b"".join(chunks))
    except (OSError, ValueError):
        return None


def workers(document: dict) -> list[dict]:
    """One small dict per worker: id, pid, status ('idle', 'busy', 'cheap', ...), requests."""
    return [
        {
            "id": w.get("id"),
            "pid": w.get("pid"),
            "status": w.get("status"),
            "requests": w.get("requests"),
            "accepting": bool(w.get("accepting", 0)),
        }
        for w in document.get("workers", [])
    ]
