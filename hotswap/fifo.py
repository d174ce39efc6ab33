"""The uWSGI master FIFO protocol, spoken without ever blocking.

A shell `echo q > fifo` blocks forever when no master reads the FIFO. Here every write
opens with O_NONBLOCK: ENXIO means nobody is listening, and we say so.

Note on probing: uWSGI re-creates its FIFO (unlink + mkfifo) each time the last writer
closes it, so opening a FIFO is not free of effects; it is harmless, and it is the only
reliable way to learn whether a master reads it.
"""

from __future__ import annotations

import errno
import os
import stat
from enum import Enum
from pathlib import Path

from . import procs


class FifoState(str, Enum):
    LISTENING = "listening"  # a master has it open for reading
    STALE = "stale"  # the FIFO exists but nobody reads it (left by a dead master)
    MISSING = "missing"
    NOT_A_FIFO = "not-a-fifo"


class NoReader(OSError):
    """The FIFO is missing or no master reads it."""


def _is_fifo(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def send(path: Path, commands: str) -> None:
    """Write master-FIFO commands (e.g. "1f", "q", "0") without blocking."""
    if not _is_fifo(path):
        raise NoReader(errno.ENOENT, f"{path} is missing or not a FIFO")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise NoReader(errno.ENXIO, f"no master is reading {path}") from exc
        if exc.errno == errno.ENOENT:
            raise NoReader(errno.ENOENT, f"{path} disappeared") from exc
        raise
    try:
        os.write(fd, commands.encode())
    finally:
        os.close(fd)


def state(path: Path) -> FifoState:
    if not os.path.lexists(path):
        return FifoState.MISSING
    if not _is_fifo(path):
        return FifoState.NOT_A_FIFO
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):
            return FifoState.STALE if exc.errno == errno.ENXIO else FifoState.MISSING
        raise
    os.close(fd)
    return FifoState.LISTENING


def move_to_live(standby: Path, live: Path, timeout: float) -> bool:
    """Send the master parked on `standby` back to slot 0 (`live`).

    The master switches slot on "0" and re-creates the live FIFO when we close our end;
    wait until it reads it, then remove the standby FIFO it left. True on success; also
    True when nobody was parked (the master never left the live FIFO).
    """
    try:
        send(standby, "0")
    except NoReader:
        pass
    listening = procs.wait_until(lambda: state(live) is FifoState.LISTENING, timeout)
    remove_if_stale(standby)
    return bool(listening)


def remove_if_stale(path: Path) -> bool:
    """Unlink `path` if it is a FIFO nobody reads; True if it was removed."""
    if state(path) is FifoState.STALE:
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            pass
    return False
