"""The hand-over record: what the new generation's accepting hook has done, in one schema.

The hook (handover.py) writes it, `hotswap reload`, `recover`, `stop`, `status` and the
supervisor read it. Each state is written *before* the act it names, then confirmed by the
next one, so a crash between two steps leaves a record that says exactly what may have
happened:

    STARTED -> NOTIFYING -> NOTIFIED -> PAUSING -> PAUSED -> COMMITTED -> RETIRE_SENT -> DONE
        \\____________\\___________\\___________\\_________\\-> ABORTED (a rollback, under the lock)

NOTIFYING  systemd (if any) is about to be told MAINPID=<new master>; a rollback must freeze
           the new generation, tell systemd the old master is the main pid, then kill.
NOTIFIED   systemd (if any) was told.
PAUSING    "p" is about to be written to the old master; it may or may not have arrived.
PAUSED     "p" arrived: the old workers stop accepting; a rollback must resume them ("p"
           toggles).
COMMITTED  the commit point: "q" is about to be written to the old master. From here on
           nothing rolls back; whoever finds a COMMITTED record finishes the swap.
ABORTED    a rollback won the race: the hook must not commit, the generation will be killed.
           It keeps the state it was aborted from, and whether the old workers were resumed,
           so a rollback interrupted halfway is finished by the next one.

COMMITTED and ABORTED are decided by `transition()`, under an flock: the hook's commit and a
rollback's abort can never both win.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..system import files

RECORD_NAME = "handover.json"
LOCK_NAME = "handover.lock"  # held for the few microseconds of a transition()
# Held by the one hook process performing a generation's hand-over (see handover.py).
PERFORMER_LOCK_NAME = "handover-performer.lock"
LOCK_TIMEOUT = 2.0


class State(str, Enum):
    STARTED = "started"
    NOTIFYING = "notifying"
    NOTIFIED = "notified"
    PAUSING = "pausing"
    PAUSED = "paused"
    COMMITTED = "committed"
    RETIRE_SENT = "retire-sent"
    DONE = "done"
    ABORTED = "aborted"


COMMITTED_STATES = frozenset({State.COMMITTED, State.RETIRE_SENT, State.DONE})
# States in which the old workers may be paused and not yet told to quit.
PAUSE_STATES = frozenset({State.PAUSING, State.PAUSED})


@dataclass(frozen=True)
class Handover:
    master_pid: int  # the new generation's master
    state: State
    retiring_pid: int | None = None  # the old master, parked on the standby FIFO
    generation: str = "unknown"
    performer_pid: int | None = None  # the hook process doing the hand-over
    notified_systemd: bool = False
    paused: str | None = None  # "n/m" old workers seen suspended before "q"
    log_offset: int = 0  # the uWSGI log's size just before "p": its answer comes after
    # From "p" to the commit: nobody accepts (old workers parked, new ones at the gate), and
    # new connections wait in the listen backlog. The cost of the gate, per swap.
    paused_at: float | None = None
    pause_seconds: float | None = None
    aborted_from: State | None = None
    resumed: bool = False  # a rollback gave the paused old workers their "p" back

    @property
    def needs_resume(self) -> bool:
        """Were the old workers possibly paused, and not yet resumed by a rollback?"""
        state = self.aborted_from if self.state is State.ABORTED else self.state
        return state in PAUSE_STATES and not self.resumed

    @property
    def pause_certain(self) -> bool:
        """PAUSED: "p" surely arrived (PAUSING: the hook died in between; maybe not)."""
        return (self.aborted_from if self.state is State.ABORTED else self.state) is State.PAUSED

    @property
    def may_have_notified(self) -> bool:
        return self.notified_systemd or self.state is State.NOTIFYING or (
            self.state is State.ABORTED and self.aborted_from is State.NOTIFYING)
    error: str | None = None  # what went wrong on the way (reported, never fatal)
    at: float = 0.0  # wall clock of the last write

    @property
    def committed(self) -> bool:
        return self.state in COMMITTED_STATES

    def to(self, state: State, **changes: object) -> Handover:
        return dataclasses.replace(self, state=state, at=time.time(), **changes)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "state": self.state.value,
                "aborted_from": self.aborted_from.value if self.aborted_from else None}

    @classmethod
    def from_json(cls, data: dict) -> Handover:
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        aborted_from = fields.get("aborted_from")
        return cls(**{**fields, "state": State(fields["state"]),
                      "aborted_from": State(aborted_from) if aborted_from else None})


def read(run_dir: Path) -> Handover | None:
    """The last hook's record, or None (absent, or unreadable: treated as no record)."""
    try:
        return Handover.from_json(json.loads((run_dir / RECORD_NAME).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write(run_dir: Path, record: Handover) -> None:
    files.atomic_write(run_dir / RECORD_NAME, json.dumps(record.to_json()), owner_of=run_dir)


def clear(run_dir: Path) -> None:
    (run_dir / RECORD_NAME).unlink(missing_ok=True)


def open_lock(run_dir: Path, name: str = LOCK_NAME) -> int:
    fd = os.open(run_dir / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        files.give_to_owner_of(run_dir / name, run_dir)
    except OSError:
        pass  # not ours to hand over: the lock works all the same
    return fd


def try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _flock(fd: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not try_flock(fd):
        if time.monotonic() >= deadline:
            # Only a process stopped inside a transition holds it this long.
            raise TimeoutError(f"{LOCK_NAME} held for over {timeout:g}s")
        time.sleep(0.002)


@contextmanager
def locked(run_dir: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """The record's critical section: read, decide, act, write, with no other writer in
    between. Acts done inside it (a FIFO write) are thereby never ambiguous to a rollback,
    unless the holder dies inside it. TimeoutError if held for over `timeout`."""
    fd = open_lock(run_dir)
    try:
        _flock(fd, timeout)
        yield
    finally:
        os.close(fd)  # releases the flock


def transition(
    run_dir: Path, master: int, to: State, allowed_from: Iterable[State], **changes: object
) -> Handover | None:
    """Compare-and-set: move master's record to `to` if its state is one of `allowed_from`.
    Returns the new record, or None when the record names another master or another state
    (the caller reads it again to learn which)."""
    with locked(run_dir):
        current = read(run_dir)
        if current is None or current.master_pid != master or current.state not in set(
                allowed_from):
            return None
        new = current.to(to, **changes)
        write(run_dir, new)
        return new


def abort(run_dir: Path, master: int, error: str) -> Handover:
    """ABORTED for `master`'s hand-over, unless it committed first (or was aborted already):
    the record as it stands after. TimeoutError if the lock's holder does not let go."""
    with locked(run_dir):
        before = read(run_dir)
        if before is None or before.master_pid != master:
            # The hook never recorded anything: an abort record stops a late one.
            after = Handover(master_pid=master, state=State.ABORTED, error=error, at=time.time())
        elif before.committed or before.state is State.ABORTED:
            return before
        else:
            after = before.to(State.ABORTED, error=error, aborted_from=before.state)
        try:
            write(run_dir, after)
        except OSError:
            # A full run dir: the record cannot say ABORTED, but no hook can write its commit
            # either, and the rollback goes on to kill the generation. A rollback must not
            # stop at its bookkeeping (found by the chaos soak's `disk full`).
            pass
        return after
