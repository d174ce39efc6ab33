"""The uWSGI master FIFO protocol, spoken without ever blocking or disturbing a master.

A shell `echo q > fifo` blocks forever when no master reads the FIFO. Here every write
opens with O_NONBLOCK: ENXIO means nobody is listening, and we say so.

uWSGI re-creates its FIFO (unlink + mkfifo + open) each time the last writer closes it.
Two consequences shape this module:
- whether a master listens is read from /proc (which process holds the FIFO open), never
  by opening the FIFO: a probe's open + close would make the master re-create it, and a
  command written in that gap would find no FIFO;
- a write retries ENOENT/ENXIO/EPIPE for a moment (SETTLE_SECONDS), in case it lands in
  such a gap left by the previous writer (our own previous command included).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

from ..system import procs

SETTLE_SECONDS = 0.5


class FifoState(str, Enum):
    LISTENING = "listening"  # a process (a uWSGI master) holds it open
    STALE = "stale"  # the FIFO exists but nobody reads it (left by a dead master)
    MISSING = "missing"
    NOT_A_FIFO = "not-a-fifo"
    # a master reads it, but its path was removed or replaced since: nothing written to the
    # path reaches it (reattach() makes the master re-create it)
    DETACHED = "detached"


class NoReader(OSError):
    """The FIFO is missing or no master reads it."""


def _is_fifo(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _open_for_write(path: Path) -> int | None:
    """A non-blocking write end, or None when nobody reads (ENXIO) or the FIFO is gone."""
    if not _is_fifo(path):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):
            return None
        raise


def _write_once(path: Path, data: bytes) -> bool:
    fd = _open_for_write(path)
    if fd is None:
        return False
    try:
        os.write(fd, data)
        return True
    except BrokenPipeError:
        # The master closed this FIFO between our open and our write: it had just read
        # the previous writer's EOF and is re-creating it. Try the new one.
        return False
    finally:
        os.close(fd)


def send(path: Path, commands: str, settle: float = SETTLE_SECONDS) -> None:
    """Write master-FIFO commands (e.g. "1f", "q", "0"); NoReader if nobody takes them."""
    data = commands.encode()
    if not procs.wait_until(lambda: _write_once(path, data), settle, interval=0.01):
        if not os.path.lexists(path):
            raise NoReader(errno.ENOENT, f"{path} is missing")
        raise NoReader(errno.ENXIO, f"no master is reading {path}")


def held(path: Path, candidates: Iterable[int] | None = None) -> list[tuple[int, int, bool]]:
    """(pid, fd, detached) of each process holding `path` open, among `candidates` (default:
    all we can see), those still reachable through the path first."""
    pool = procs.all_pids() if candidates is None else candidates
    found = [(pid, *hold) for pid in pool if (hold := procs.held_fd(pid, path))]
    return sorted(found, key=lambda item: item[2])


def readers(path: Path, candidates: Iterable[int] | None = None) -> list[int]:
    """The processes holding `path` open (even if the path was removed since)."""
    return [pid for pid, _, _ in held(path, candidates)]


def state(path: Path, candidates: Iterable[int] | None = None) -> FifoState:
    holders = held(path, candidates)
    if holders and all(detached for _, _, detached in holders):
        return FifoState.DETACHED
    if not os.path.lexists(path):
        return FifoState.MISSING
    if not _is_fifo(path):
        return FifoState.NOT_A_FIFO
    return FifoState.LISTENING if holders else FifoState.STALE


def reattach(path: Path, pid: int, fd: int) -> None:
    """Make master `pid` re-create its FIFO at `path`, which was removed or replaced.

    uWSGI re-creates its FIFO (unlink, mkfifo, open) whenever the last writer closes it: an
    open + close of the master's own descriptor through /proc delivers that EOF without the
    path. The master exits if mkfifo fails, so the caller first makes sure it cannot: the
    folder exists and the path is not a directory (unlink cannot remove one)."""
    if os.path.isdir(path) and not os.path.islink(path):
        raise IsADirectoryError(f"{path} is a directory")
    if not os.path.isdir(path.parent):
        raise FileNotFoundError(f"{path.parent} does not exist")
    handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
    os.close(handle)


def remove_if_stale(path: Path) -> bool:
    """Unlink `path` if it is a FIFO nobody reads; True if it was removed.

    /proc may hide another user's reader, so the verdict is confirmed by a non-blocking
    open: ENXIO is the kernel saying there is no reader at all.
    """
    if state(path) is not FifoState.STALE:
        return False
    fd = _open_for_write(path)
    if fd is not None:
        os.close(fd)
        return False
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
