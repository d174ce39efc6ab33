"""Exit codes and the one exception family operators see.

Every operator-facing failure is a HotswapError carrying a one-line message and an exit
code; the CLI prints the message on stderr and exits with the code. Anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    RELOAD_FAILED = 1
    CONFIG = 2
    NOT_RUNNING = 3
    BUSY = 4
    TIMEOUT = 5
    INCONSISTENT = 6
    NO_ROOM = 7


# The one statement of what each code means: `hotswap --help` prints it, the README copies it.
MEANING = {
    ExitCode.OK: "success",
    ExitCode.RELOAD_FAILED: "reload failed or was interrupted before its commit point: the "
    "new release was rolled back, the old one still serves; deploy/rollback: the release was "
    "refused or rolled back, current names the old one again; start: uWSGI exited before "
    "serving",
    ExitCode.CONFIG: "bad usage or configuration (missing/unreadable ini, permission "
    "denied); reload: the ini changes a key only a restart applies (a socket, the user, a FIFO)",
    ExitCode.NOT_RUNNING: "nothing is running",
    ExitCode.BUSY: "busy: a reload is in progress, an old master is still draining, or "
    "start found a live instance",
    ExitCode.TIMEOUT: "timeout: reload rolled back a new generation that was too slow (the "
    "old one still serves); stop found the master still draining; start: the grace after "
    "SIGTERM/Ctrl-C ran out, and what still ran was killed",
    ExitCode.INCONSISTENT: "a state the kit will not guess about; the message says what to "
    "do; reload: the serving generation does not answer /healthz (--force swaps anyway); "
    "status: it runs but something is wrong (each problem named, with its fix)",
    ExitCode.NO_ROOM: "no room: reload refused before touching anything, because a second "
    "generation (the serving one's memory plus the margin) does not fit in MemAvailable or "
    "under the cgroup's memory limit (--force skips that check), or the run dir has no space "
    "left for the hand-over's records; the old generation serves",
}


class HotswapError(Exception):
    """An operator-facing failure: one line of text and an exit code."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
