"""The one interface through which the reload machine, `recover` and `stop` touch the world.

tableflip's habit: the state machine reaches the OS through a small injected environment, so
every transition is unit-tested in milliseconds with a fake (tests/fakehost.py), while a few
tests run real processes through RealHost. RealHost is the only implementation here; it
wraps procs, fifo, record, uwsgilog, probe, stats and notify and adds no logic of its own
beyond telling the masters apart.

An instance can hold up to three kinds of uWSGI master at once:
- live:    reads the live FIFO (slot 0) and serves;
- parked:  reads the standby FIFO (slot 1): an old master retiring after a swap, or one
           stranded there by an interrupted swap;
- loading: re-forked by one of them ("f") and not committed (record.py), still importing the
           release or waiting at its hand-over; its workers do not accept yet.
Masters are recognised by the FIFO they hold open (from /proc), never by a pid alone: a
pidfile can be stale, and its pid reused by another process, even another uWSGI.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from ..config import Config
from ..errors import ExitCode, HotswapError
from ..protocol import fifo, record
from ..protocol.record import Handover, State
from ..system import files, memory, notify, priority, procs, stats, uwsgilog
from . import drift, probe

KILL_TIMEOUT = 10.0


class Slot(str, Enum):
    LIVE = "live"
    STANDBY = "standby"


@dataclass(frozen=True)
class Masters:
    live: int | None = None
    parked: int | None = None
    loading: list[int] = field(default_factory=list)

    @property
    def all(self) -> list[int]:
        return [pid for pid in (self.live, self.parked, *self.loading) if pid]


@dataclass(frozen=True)
class Detached:
    """A master that still reads its FIFO, whose path was removed or replaced since."""

    slot: Slot
    master: int
    fd: int
    path: Path


class Host(Protocol):
    """What the machine may ask or do. Every method is quick: waiting is the caller's."""

    def now(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...
    def masters(self) -> Masters: ...
    def alive(self, pid: int | None) -> bool: ...
    def stopped(self, pid: int) -> bool: ...  # state T: SIGSTOP, or a tracer holds it
    def reforked_below(self, master: int) -> list[int]: ...
    def workers_of(self, master: int) -> list[int]: ...
    # workers of `master` born after its pause (wall clock) and parked: see RealHost's
    def stranded_workers(self, master: int, paused_at: float) -> list[int]: ...
    def signal(self, pid: int, sig: int) -> None: ...
    def kill_generations(self, masters: list[int]) -> None: ...
    def send(self, slot: Slot, commands: str) -> None: ...  # fifo.NoReader if nobody reads
    def holds(self, master: int, slot: Slot) -> bool: ...
    def remove_stale(self, slot: Slot) -> bool: ...
    def detached(self) -> list[Detached]: ...
    def config_drift(self, master: int) -> list[str]: ...  # what a re-fork cannot apply
    def reattach(self, item: Detached) -> None: ...  # OSError: why it cannot
    def handover(self) -> Handover | None: ...
    def abort(self, master: int, error: str) -> Handover: ...
    def freeze(self, master: int) -> None: ...
    def resume(self, master: int) -> bool: ...
    def record_serving(self, master: int) -> None: ...
    def log_mark(self) -> int: ...
    def log_since(self, mark: int) -> bytes: ...
    def healthz(self, timeout: float) -> dict | None: ...
    def stats(self) -> dict | None: ...
    def notify(self, message: str) -> bool: ...
    def write_pidfile(self, master: int) -> None: ...
    def memory_room(self, master: int, margin_percent: float) -> memory.Room: ...
    def oom_kills(self, master: int) -> int | None: ...
    def run_dir_space(self) -> tuple[str, int | None]: ...  # its path, bytes free (None: ?)
    def restore_priority(self, master: int) -> str: ...  # what it did, for the timeline


class RealHost:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._fifos = {Slot.LIVE: cfg.fifo_live, Slot.STANDBY: cfg.fifo_standby}

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def masters(self) -> Masters:
        pids = procs.all_pids()
        live = fifo.readers(self.cfg.fifo_live, pids)
        parked = fifo.readers(self.cfg.fifo_standby, pids)
        reforked = {child for parent in {*live, *parked}
                    for child in procs.session_leaders_below(parent)}
        current = record.read(self.cfg.run_dir)
        # A re-forked master is loading until its hand-over commits, even if it already holds
        # the live FIFO (it creates it before importing the app).
        loading = sorted(pid for pid in reforked
                         if not (current and current.master_pid == pid and current.committed))
        serving = [pid for pid in live if pid not in loading]
        return Masters(serving[0] if serving else None, parked[0] if parked else None, loading)

    def alive(self, pid: int | None) -> bool:
        return procs.alive(pid)

    def stopped(self, pid: int) -> bool:
        info = procs.stat(pid)
        return info is not None and info.state in ("T", "t")

    def reforked_below(self, master: int) -> list[int]:
        return procs.session_leaders_below(master)

    def workers_of(self, master: int) -> list[int]:
        reforked = procs.session_leaders_below(master)
        return [pid for pid in procs.children(master) if pid not in reforked]

    def stranded_workers(self, master: int, paused_at: float) -> list[int]:
        """Workers of a master told to quit that wait suspended and never will leave.

        A slot's suspended flag survives a respawn (core/master_utils.c leaves it set), so a
        worker uWSGI respawns during the hand-over's pause parks at the top of its loop
        before it ever accepts; the chaos soak saw the graceful quit miss such a one (it
        SIGHUPs the workers it has at "q"), and worker-reload-mercy does not count it. The
        caller asks only once the quit has had time to reach everyone. The witness that it
        holds no connection is exact where /proc/PID/syscall reads (procs.suspended: poll
        on no descriptor); elsewhere two weaker ones together: born after the pause, so it
        never accepted, and parked in poll now. Killing it loses nothing."""
        named = []
        for pid in self.workers_of(master):
            exact = procs.suspended(pid)
            if exact is None:
                born = procs.started_at(pid)
                exact = born is not None and born > paused_at and procs.parked_in_poll(pid)
            if exact:
                named.append(pid)
        return named

    def signal(self, pid: int, sig: int) -> None:
        procs.signal_quietly(pid, sig)

    def kill_generations(self, masters: list[int]) -> None:
        """SIGKILL masters that never served, with their process groups (a re-forked master
        leads its own group: its workers and their hooks included), and wait for them."""
        for pid in masters:
            procs.kill_group(pid, signal.SIGKILL)
            procs.signal_quietly(pid, signal.SIGKILL)
        procs.wait_gone(masters, KILL_TIMEOUT)

    def send(self, slot: Slot, commands: str) -> None:
        fifo.send(self._fifos[slot], commands)

    def holds(self, master: int, slot: Slot) -> bool:
        return procs.holds_open(master, self._fifos[slot])

    def remove_stale(self, slot: Slot) -> bool:
        return fifo.remove_if_stale(self._fifos[slot])

    def detached(self) -> list[Detached]:
        pids = procs.all_pids()
        found = []
        for slot, path in self._fifos.items():
            holders = fifo.held(path, pids)
            # If another master reads the FIFO now at that path, re-creating the path would
            # take it from that master: leave the detached one alone (it retires, or drains).
            if any(not gone for _, _, gone in holders):
                continue
            found.extend(Detached(slot, pid, fd, path) for pid, fd, gone in holders if gone)
        return found

    def reattach(self, item: Detached) -> None:
        reattach(item)

    def config_drift(self, master: int) -> list[str]:
        """What a re-fork of `master` cannot apply: a changed ini key, or an Emperor."""
        emperor = drift.emperor_refusal(master)
        if emperor:
            return [emperor]
        found = drift.changes(self.cfg, master)
        return [drift.refusal(found, drift.restart_hint(self.cfg))] if found else []

    def handover(self) -> Handover | None:
        return record.read(self.cfg.run_dir)

    def abort(self, master: int, error: str) -> Handover:
        """ABORTED, unless the hand-over committed first: the record as it stands after."""
        try:
            return record.abort(self.cfg.run_dir, master, error)
        except TimeoutError:
            # The lock's holder is stopped inside a transition (a SIGSTOPped hook): only the
            # hook takes it, and killing it releases it.
            current = record.read(self.cfg.run_dir)
            if current and current.performer_pid:
                # Its worker too: uWSGI runs the hook with safeexec, so a worker whose hook
                # dies goes on to accept, before the commit, in a generation being aborted.
                worker = procs.ancestor_below(current.performer_pid, master)
                for pid in (current.performer_pid, worker):
                    if pid:
                        procs.signal_quietly(pid, signal.SIGKILL)
            try:
                return record.abort(self.cfg.run_dir, master, error)
            except TimeoutError as exc:
                raise HotswapError(f"cannot roll back master {master}: {exc}",
                                   ExitCode.INCONSISTENT) from None

    def freeze(self, master: int) -> None:
        procs.kill_group(master, signal.SIGSTOP)

    def resume(self, master: int) -> bool:
        """"p" to the parked old master ("p" toggles: its paused workers resume), recorded in
        the same critical section so that no later rollback toggles them again."""
        with record.locked(self.cfg.run_dir):
            current = record.read(self.cfg.run_dir)
            try:
                fifo.send(self.cfg.fifo_standby, "p")
            except fifo.NoReader:
                return False
            if current and current.master_pid == master:
                record.write(self.cfg.run_dir, dataclasses.replace(current, resumed=True))
            return True

    def record_serving(self, master: int) -> None:
        """After a complete rollback: the record names the master that serves (its respawned
        workers pass the hook's gate at once)."""
        record.write(self.cfg.run_dir, Handover(master_pid=master, state=State.DONE,
                                                at=time.time()))

    def log_mark(self) -> int:
        return uwsgilog.size(self.cfg.log_file)

    def log_since(self, mark: int) -> bytes:
        return uwsgilog.read_since(self.cfg.log_file, mark)

    def healthz(self, timeout: float) -> dict | None:
        return probe.healthz(self.cfg.socket, timeout=timeout, path=self.cfg.health_path)

    def stats(self) -> dict | None:
        return stats.read(self.cfg.stats_socket)

    def notify(self, message: str) -> bool:
        try:
            return notify.notify(message, barrier=True)
        except OSError:
            return False

    def run_dir_space(self) -> tuple[str, int | None]:
        try:
            info = os.statvfs(self.cfg.run_dir)
        except OSError:
            return str(self.cfg.run_dir), None
        return str(self.cfg.run_dir), info.f_bavail * info.f_frsize

    def write_pidfile(self, master: int) -> None:
        files.atomic_write(self.cfg.pidfile, f"{master}\n", owner_of=self.cfg.run_dir)

    def restore_priority(self, master: int) -> str:
        return priority.settle(self.cfg.run_dir, master)

    def memory_room(self, master: int, margin_percent: float) -> memory.Room:
        """Whether a second copy of `master`'s generation fits (memory.py)."""
        return memory.measure(master, self.workers_of(master), margin_percent)

    def oom_kills(self, master: int) -> int | None:
        """The OOM kill counter of `master`'s memory cgroup (None: no such counter)."""
        return memory.oom_kills(master)


def reattach(item: Detached) -> None:
    """Have the master re-create its FIFO path; wait until it reads it again. uWSGI exits if
    its mkfifo fails: the run dir is re-created first, owned by the master's user."""
    folder = item.path.parent
    folder.mkdir(parents=True, exist_ok=True)
    master = os.stat(f"/proc/{item.master}")
    found = os.stat(folder)
    if (found.st_uid, found.st_gid) != (master.st_uid, master.st_gid):
        # e.g. `rm -rf run`, then a command run as root re-created it: the master, as the
        # service's user, could not mkfifo there.
        if os.geteuid() != 0:
            raise PermissionError(errno.EACCES, f"{folder} is owned by uid {found.st_uid}, "
                                  f"master {item.master} runs as uid {master.st_uid}")
        os.chown(folder, master.st_uid, master.st_gid)
    if os.stat(folder).st_mode & 0o700 != 0o700:
        os.chmod(folder, os.stat(folder).st_mode | 0o700)
    fifo.reattach(item.path, item.master, item.fd)

    def reads_it_again() -> bool:
        held = procs.held_fd(item.master, item.path)
        return held is not None and not held[1]

    if not procs.wait_until(reads_it_again, KILL_TIMEOUT):
        raise OSError(errno.ETIMEDOUT, f"master {item.master} did not re-create {item.path}")
