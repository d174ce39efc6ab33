"""Exit codes and the one exception family operators see.

Every operator-facing failure is a HotswapError carrying a one-line message and an exit
code; the CLI prints the message on stderr and exits with the code. Anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # reload: the new release did not come up (import error, corrupt data, crash);
    # the old generation is still serving.
    RELOAD_FAILED = 1
    # bad option, missing or unreadable ini, permission denied, no uwsgi binary.
    CONFIG = 2
    # nothing is running where the ini says (reload, stop, status).
    NOT_RUNNING = 3
    # another reload holds the lock, or start found an instance already running.
    BUSY = 4
    # a deadline passed: reload (the new generation was killed, the old one serves),
    # stop (the master is still draining).
    TIMEOUT = 5
    # the instance is in a state the kit will not guess about (say, a master parked on
    # the standby FIFO by an interrupted swap); the message says what to do.
    INCONSISTENT = 6


class HotswapError(Exception):
    """An operator-facing failure: one line of text and an exit code."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
