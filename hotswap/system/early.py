"""Signals that land while the CLI is still importing: noted, then answered by the command.

Importing the CLI takes a noticeable moment on a busy machine (click, the kit, the
stdlib). A SIGINT or SIGTERM in that window used to end the process with Python's default
(a KeyboardInterrupt, exit -2; SIGTERM, exit -15) and no message, where the same signal a
moment later ends a reload with exit 1, "interrupted by SIGINT before anything changed".
cli.py installs these handlers on its first lines; `reload` hands what they noted to its
machine, every other command gets the signal's usual effect back (replay()).
"""

from __future__ import annotations

import os
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_noted: list[int] = []


def _note(signum: int, _frame: object) -> None:
    _noted.append(signum)


def install() -> None:
    for signum in SIGNALS:
        signal.signal(signum, _note)


def take() -> list[str]:
    """The names of the signals noted so far (each once), forgetting them."""
    names = list(dict.fromkeys(signal.Signals(signum).name for signum in _noted))
    _noted.clear()
    return names


def replay() -> None:
    """Put Python's own handling back, and deliver what was noted meanwhile."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for name in take():
        os.kill(os.getpid(), signal.Signals[name])


def settled() -> None:
    """The command's outcome is decided (and about to be printed): a signal from now on must
    not change it. Ignored, because Python restores the default action of every signal it
    handled while it shuts down, and a SIGINT landing then would end a reload that served
    the new release with -2 and no message; an ignored signal stays ignored."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
