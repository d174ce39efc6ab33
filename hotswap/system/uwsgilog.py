"""The uWSGI log: the one place that reads it, from an offset, and knows its lines."""

from __future__ import annotations

import re
from pathlib import Path

TAIL_LINES = 15
SPAWNED_RE = re.compile(rb"new master copy spawned with pid (\d+)")
SUSPENDED_RE = re.compile(rb"\*\*\* worker (\d+) suspended \*\*\*")
# What a master logs when one of its workers dies of a SIGKILL (the OOM killer's signal).
SIGKILLED_WORKER_RE = re.compile(rb"DAMN ! worker \d+ \(pid: (\d+)\) died, killed by signal 9 ")
# What a master logs when "p" reaches it: pause, or resume (it toggles).
PAUSE_RE = re.compile(rb"\*\*\* (PAUSE|\(SIGTSTP received\) resuming workers)")
# The last line of a Python traceback: "module.path.SomeError: message". uWSGI names a
# wsgi-file's module after its path, so the qualifier may hold any non-space character.
EXCEPTION_LINE_RE = re.compile(r"^(?:\S*\.)?(\w*(?:Error|Exception|Exit|Interrupt)\b:?.*)$")


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read_since(path: Path, offset: int) -> bytes:
    """What the log gained since `offset` (all of it if it was truncated or rotated)."""
    try:
        with open(path, "rb") as handle:
            end = handle.seek(0, 2)
            handle.seek(offset if end >= offset else 0)
            return handle.read()
    except OSError:
        return b""


def cause_from(log_tail: list[str]) -> str:
    """': <the last exception line>' from a startup log tail, or '' if none."""
    for line in reversed(log_tail):
        match = EXCEPTION_LINE_RE.match(line.strip())
        if match:
            return f": {match.group(1).strip()}"
    return ""


def spawned_pid(text: bytes) -> int | None:
    match = SPAWNED_RE.search(text)
    return int(match.group(1)) if match else None


def suspended_workers(text: bytes) -> set[bytes]:
    return set(SUSPENDED_RE.findall(text))


def paused_by_log(text: bytes) -> bool | None:
    """Whether the last pause toggle the log shows paused (True) or resumed (False) the
    workers; None when the log shows none (not logged yet, or the log is unwritable)."""
    toggles = PAUSE_RE.findall(text)
    if not toggles:
        return None
    return toggles[-1] == b"PAUSE"


def sigkilled_workers(text: bytes) -> list[int]:
    """Pids of workers whose master logged their death by SIGKILL."""
    return [int(pid) for pid in SIGKILLED_WORKER_RE.findall(text)]
