"""The accepting hook: run by uWSGI in every worker of every generation before it accepts.

srv.ini runs `python -m hotswap.inside.handover ...` as `hook-accepting` through `safeexec:` (uWSGI
ignores its exit code: a failing hook would destroy the new generation while the old one may
already be retiring). Its paths come as arguments (uWSGI expands them), so a hook costs one
Python start and no `uwsgi --get`. Each worker's hook, in short:

- gate: a worker of a generation that has not committed does not accept. So before the
  commit point only the old generation serves, and a rollback kills nothing that served.
  New connections wait in the listen backlog for the milliseconds between "p" and "q".
- one worker's hook (whichever takes the performer lock first) performs the hand-over; if it
  dies before the commit point, another worker's hook takes over where the record says.
- a worker of an older generation (its master parked on the standby FIFO), or of a generation
  that has committed, passes at once; so do respawned workers later in a generation's life.
- the others wait on the performer lock (in the kernel, no polling), and pass once they find
  the record committed; if the performer died, the first of them to get the lock goes on
  where the record says. If the generation was aborted, or its master died, a waiting hook
  kills its own worker: a worker of a generation that did not commit never accepts.

Known limit: a SIGUSR1 sent to a worker while it waits for its hook interrupts uWSGI's
waitpid(), and that worker then accepts before the commit (uWSGI installs the handler without
SA_RESTART). Nothing in the kit sends one there.

The hand-over, each step recorded (record.py) before the act it names:
1. STARTED, NOTIFYING; tell systemd (if any) the new master is the main pid and wait for
   its BARRIER acknowledgement (systemd must know the new master before the old one exits);
   the pidfile then names the new master -> NOTIFIED.
2. PAUSING / "p" to the old master / PAUSED, in one critical section: its workers stop
   accepting (see pause_workers for why), then wait until they are all parked.
3. COMMITTED / "q" to the old master / RETIRE_SENT, in one critical section: the commit
   point. A rollback that took the record lock first has written ABORTED instead, and the hook
   stops there.
4. DONE.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..protocol import fifo, record
from ..protocol.record import Handover, State
from ..system import files, memory, notify, priority, procs, uwsgilog

PAUSE_TIMEOUT = 2.0
QUIET_SECONDS = 0.25
ABORTED_POLL = 0.05
RETRY_SECONDS = 1.0
# The chain above the hook: python <- sh -c <- worker. A few levels, never further: an
# orphaned hook must not mistake some other uWSGI ancestor for its worker.
MAX_CLIMB = 3


@dataclass(frozen=True)
class Paths:
    run_dir: Path
    fifo_standby: Path
    pidfile: Path
    log_file: Path


def log(message: str) -> None:
    """One line in the uWSGI log (our stderr). Never raises: a full log disk is not a reason
    to fail a hand-over."""
    try:
        print(f"hotswap handover [{os.getpid()}]: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _exe(pid: int) -> str | None:
    try:
        return os.path.realpath(f"/proc/{pid}/exe")
    except OSError:
        return None


def find_worker() -> tuple[int, int] | None:
    """(worker, master): the uWSGI worker that runs this hook and its generation's master, or
    None if that worker is gone (the hook was orphaned). A worker runs the same binary as its
    parent, the master (whatever its name: uwsgi, uwsgi-core, ...); the shell and Python
    between it and us do not."""
    pid = os.getppid()
    for _ in range(MAX_CLIMB):
        info = procs.stat(pid)
        if info is None or pid <= 1:
            return None
        exe = _exe(pid)
        if exe and (exe == _exe(info.ppid) or os.path.basename(exe).startswith("uwsgi")):
            return pid, info.ppid
        pid = info.ppid
    return None


def parked_parent(master: int, fifo_standby: Path) -> int | None:
    """The master this generation replaces: its parent, if it waits on the standby FIFO."""
    info = procs.stat(master)
    parent = info.ppid if info else None
    return parent if parent and procs.holds_open(parent, fifo_standby) else None


def _mine(paths: Paths, master: int) -> Handover | None:
    current = record.read(paths.run_dir)
    return current if current and current.master_pid == master else None


def gate(paths: Paths) -> str:
    """Return once this worker may accept (the outcome, for the log)."""
    found = find_worker()
    if found is None:
        return "no uWSGI worker above this hook"
    worker, master = found
    performer_fd = record.open_lock(paths.run_dir, record.PERFORMER_LOCK_NAME)
    while procs.alive(master):
        mine = _mine(paths, master)
        if mine and mine.committed:
            return "committed"
        if mine is None and procs.holds_open(master, paths.fifo_standby):
            return "older generation"  # a respawned worker of a retiring master
        if mine and mine.state is State.ABORTED:
            time.sleep(ABORTED_POLL)  # the rollback kills this generation; until then, wait
            continue
        fcntl.flock(performer_fd, fcntl.LOCK_EX)  # blocks while another hook performs
        try:
            mine = _mine(paths, master)  # what the previous holder left, if anything
            if mine and (mine.committed or mine.state is State.ABORTED):
                continue
            log(perform(paths, master, mine))
        except Exception as exc:  # noqa: BLE001 - keep gating; a rollback or a retry follows
            log(f"hand-over of master {master} failed: {type(exc).__name__}: {exc}")
            time.sleep(RETRY_SECONDS)  # back off before another worker's hook retries
        finally:
            fcntl.flock(performer_fd, fcntl.LOCK_UN)
    # The generation died (or was aborted and killed) before it committed: its worker must
    # never accept, not even for the moment before it notices its master is gone.
    procs.signal_quietly(worker, signal.SIGKILL)
    return f"master {master} is gone: killed worker {worker}"


def perform(paths: Paths, master: int, existing: Handover | None) -> str:
    if existing is None:
        with record.locked(paths.run_dir):
            if _mine(paths, master):
                return "the record changed under us (a rollback?)"
            current = Handover(
                master_pid=master, state=State.STARTED,
                retiring_pid=parked_parent(master, paths.fifo_standby),
                generation=os.environ.get("HOTSWAP_GENERATION", "unknown"),
                performer_pid=os.getpid(), at=time.time(),
            )
            record.write(paths.run_dir, current)
    else:  # taking over from a performer that died
        taken = record.transition(paths.run_dir, master, existing.state, [existing.state],
                                  performer_pid=os.getpid())
        if taken is None:
            return "the record changed under the take-over"
        current = taken
        log(f"took over the hand-over of master {master} at {current.state.value}")
    # The generation loaded with a high oom_score_adj (srv.ini): it is about to serve, so it
    # goes back to the service's own before the old master is told to quit (docs/memory.md).
    log(memory.settle(paths.run_dir, master))
    # It also loaded at a low CPU and I/O priority (inside/loading.py): it serves at the
    # service's own from here, and this hook pauses the old workers at it.
    log(priority.settle(paths.run_dir, master, also=(os.getpid(),)))
    steps = [(State.STARTED, _notify), (State.NOTIFYING, _notify), (State.NOTIFIED, _pause),
             (State.PAUSING, _wait_paused), (State.PAUSED, _wait_paused),
             (State.COMMITTED, _retire), (State.RETIRE_SENT, _finish)]
    for state, step in steps:
        if current.state is state:
            current = step(paths, current)
        if current.state is State.ABORTED or current.master_pid != master:
            return f"stopped at {state.value}: {current.error or 'rolled back'}"
    return (f"master {master} serving generation {current.generation}; retiring "
            f"{current.retiring_pid or 'nobody'} ({current.state.value}, paused {current.paused})")


def _advance(paths: Paths, current: Handover, to: State, **changes) -> Handover:
    """CAS to `to`; on a lost race, the record as the winner left it (ABORTED)."""
    new = record.transition(paths.run_dir, current.master_pid, to, [current.state], **changes)
    if new is not None:
        return new
    now = record.read(paths.run_dir)
    if now is not None and now.master_pid == current.master_pid:
        return now
    return current.to(State.ABORTED, error="the record now names another master")


def _notify(paths: Paths, current: Handover) -> Handover:
    """NOTIFYING is recorded before systemd hears anything: a rollback then knows it must
    tell systemd the old master is the main pid again."""
    if current.state is State.STARTED:
        current = _advance(paths, current, State.NOTIFYING)
        if current.state is not State.NOTIFYING:
            return current
    master = current.master_pid
    try:
        notified = notify.notify(
            f"MAINPID={master}\nSTATUS=Serving generation {current.generation} "
            f"(master {master})\nREADY=1",
            barrier=True,
        )
    except OSError as exc:  # includes the barrier's TimeoutError
        # Retiring the old master now would make systemd see its main process exit and stop
        # the whole unit: the swap stops here, before the commit point.
        return _advance(paths, current, State.ABORTED, aborted_from=State.NOTIFYING,
                        error=f"systemd did not confirm MAINPID={master}: {exc}")
    files.atomic_write(paths.pidfile, f"{master}\n")
    return _advance(paths, current, State.NOTIFIED, notified_systemd=notified)


def _pause(paths: Paths, current: Handover) -> Handover:
    """PAUSING, "p", PAUSED in one critical section (nothing to pause at a fresh start)."""
    if current.retiring_pid is None:
        return _advance(paths, current, State.PAUSED, paused="0/0")
    with record.locked(paths.run_dir):
        now = record.read(paths.run_dir)
        if now is None or now.master_pid != current.master_pid or now.state is not State.NOTIFIED:
            return now or current.to(State.ABORTED, error="record lost")
        pausing = now.to(State.PAUSING, log_offset=uwsgilog.size(paths.log_file),
                         paused_at=time.time())
        record.write(paths.run_dir, pausing)
        try:
            fifo.send(paths.fifo_standby, "p")
        except fifo.NoReader:
            if procs.alive(now.retiring_pid):
                record.write(paths.run_dir, now)  # "p" was not sent: back to NOTIFIED
                raise
            # The old master is gone: nothing to pause, nothing to retire.
            pausing = dataclasses.replace(pausing, retiring_pid=None)
        paused = pausing.to(State.PAUSED)
        record.write(paths.run_dir, paused)
    return paused


def pause_workers_wait(paths: Paths, retiring: int, offset: int) -> str:
    """Wait until the retiring generation's idle workers are parked; "n/m" parked.

    uWSGI's graceful quit sends SIGHUP to every worker, and a worker that is not inside a
    request exits on the spot: if it had just accept()ed a connection and not yet marked
    itself busy, that connection is reset (measured: 8 resets over 40 reloads under 32
    concurrent clients; none over 100 with the pause). "p" marks the workers suspended, and a
    worker only suspends at the top of its loop, before accepting: once it logs "suspended",
    it holds no unanswered connection. SIGTSTP nudges a worker blocked in epoll back to the
    top of its loop at once; a worker that has not parked QUIET_SECONDS after the last one
    did is inside a request, which a SIGHUP lets it finish. So "q" is safe then, and nobody
    accepts for no longer than that (not for the whole of a long request)."""
    reforked = procs.session_leaders_below(retiring)  # the new master: not a worker
    workers = [pid for pid in procs.children(retiring) if pid not in reforked]
    seen = [0, time.monotonic()]  # parked so far, when that number last grew

    def parked_or_busy() -> bool:
        # Two witnesses: the log line, and /proc (a rotated or full log shows no line). A
        # busy worker polling a socket inside its request counts too: harmless, it is past
        # accept() and finishes its request after "q".
        parked = max(len(uwsgilog.suspended_workers(uwsgilog.read_since(paths.log_file, offset))),
                     sum(procs.parked_in_poll(pid) for pid in workers))
        if parked >= len(workers):
            seen[0] = parked
            return True
        if parked > seen[0]:
            seen[0], seen[1] = parked, time.monotonic()
        elif time.monotonic() - seen[1] >= QUIET_SECONDS:
            return True  # the others are busy with requests
        for pid in workers:
            if procs.worker_initialised(pid):  # else SIGTSTP is its master's pause toggle
                procs.signal_quietly(pid, signal.SIGTSTP)
        return False

    procs.wait_until(parked_or_busy, PAUSE_TIMEOUT, interval=0.01)
    return f"{seen[0]}/{len(workers)}"


def _wait_paused(paths: Paths, current: Handover) -> Handover:
    if current.retiring_pid is not None:
        paused = pause_workers_wait(paths, current.retiring_pid, current.log_offset)
    else:
        paused = current.paused
    return _commit(paths, current, paused)


def _commit(paths: Paths, current: Handover, paused: str | None) -> Handover:
    """The commit point: COMMITTED, "q", RETIRE_SENT, in one critical section."""
    with record.locked(paths.run_dir):
        now = record.read(paths.run_dir)
        if now is None or now.master_pid != current.master_pid or \
                now.state not in record.PAUSE_STATES:
            return now or current.to(State.ABORTED, error="record lost")
        if not procs.alive(now.master_pid):
            return now  # our master died: the rollback is the CLI's to do
        window = round(time.time() - now.paused_at, 4) if now.paused_at else None
        committed = now.to(State.COMMITTED, paused=paused, pause_seconds=window)
        record.write(paths.run_dir, committed)
        if committed.retiring_pid is None:
            # A fresh start: nobody to retire; a standby FIFO here is a crash's leftover.
            fifo.remove_if_stale(paths.fifo_standby)
            sent = committed.to(State.RETIRE_SENT)
        else:
            try:
                fifo.send(paths.fifo_standby, "q")
                sent = committed.to(State.RETIRE_SENT)
            except OSError as exc:  # `hotswap reload` retries "q", and reports it
                log(f"could not tell old master {committed.retiring_pid} to quit: {exc}")
                return committed
        record.write(paths.run_dir, sent)
    return sent


def _retire(paths: Paths, current: Handover) -> Handover:
    """Committed, but our "q" failed: one more try (the CLI, or `recover`, tries too)."""
    try:
        fifo.send(paths.fifo_standby, "q")
    except OSError as exc:
        log(f"could not tell old master {current.retiring_pid} to quit: {exc}")
        return current
    return _advance(paths, current, State.RETIRE_SENT)


def _finish(paths: Paths, current: Handover) -> Handover:
    return _advance(paths, current, State.DONE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hotswap.inside.handover")
    for name in ("--run-dir", "--fifo-standby", "--pidfile", "--log-file"):
        parser.add_argument(name, required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        outcome = gate(Paths(args.run_dir, args.fifo_standby, args.pidfile, args.log_file))
    except Exception as exc:  # noqa: BLE001 - never fail the hook, see the module docstring
        log(f"{type(exc).__name__}: {exc}")
        return 0
    if outcome not in ("committed", "older generation"):
        log(outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
