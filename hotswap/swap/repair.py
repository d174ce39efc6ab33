"""Undoing a swap that has not committed, and finishing one that has: the one rule that the
reload's rollback, `recover`, `stop` and the next reload's preflight all follow.

Before the commit point (record.py: COMMITTED), the new generation has served nothing (its
workers wait at the hook's gate): it is killed, the old workers are resumed if they were
paused, systemd is told the old master is the main pid again if it had been told otherwise,
and the old master takes the live FIFO back. From the commit point on, nothing is undone:
whoever finds a committed hand-over finishes it ("q" to the old master if it was not sent).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ExitCode, HotswapError
from ..protocol import fifo
from ..protocol.record import Handover, State
from ..system import procs, uwsgilog
from .host import Host, Slot

ROLLBACK_TIMEOUT = 10.0
# How long "p" may take to show in the log before we conclude it never reached the master.
PAUSE_EVIDENCE_SECONDS = 0.5
# A retiring master SIGHUPs the workers it knows at "q", and they leave within a moment when
# idle: a worker of it still parked this long after is one that "q" never reached.
STRANDED_GRACE = 2.0
STRANDED_CHECK = 1.0  # how often to look again (it reads /proc per worker)


def wait(host: Host, probe, timeout: float, interval: float = 0.02):
    """procs.wait_until on the host's clock."""
    return procs.wait_until(probe, timeout, interval, clock=host.now, sleep=host.sleep)


@dataclass
class Rollback:
    """What abort_generation did, or the committed record that made it roll forward."""

    committed: Handover | None = None
    actions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def abort_generation(host: Host, new_master: int | None, old_master: int | None,
                     cause: str) -> Rollback:
    """Roll back the generation `new_master` (None: whatever `old_master` re-forked). Safe to
    repeat: an ABORTED record remembers what a rollback interrupted halfway still owes."""
    done = Rollback()
    aborted = None
    if new_master is not None:
        aborted = host.abort(new_master, cause)
        if aborted.committed:
            done.committed = aborted  # it committed first: roll forward instead
            return done
    if aborted and aborted.may_have_notified and old_master:
        # systemd may know the new master as the main pid: freeze the new generation (a late
        # MAINPID= from its hook must not land after ours), tell systemd the old master is the
        # main pid, and only then kill: systemd must never see its main pid die.
        host.freeze(new_master)
        host.notify(f"MAINPID={old_master}\nSTATUS=Serving (master {old_master}); "
                    f"the reload was rolled back: {cause}")
        done.actions.append(f"told systemd master {old_master} is the main pid again")
    if aborted and aborted.needs_resume and old_master and (
            aborted.pause_certain or _paused_by_log(host, aborted)):
        if host.resume(new_master):
            done.actions.append(f"resumed the paused workers of master {old_master}")
        else:
            done.warnings.append(f"could not resume the paused workers of {old_master}")
    doomed = set(host.reforked_below(old_master)) if old_master else set()
    doomed |= {new_master} if new_master else set()
    if doomed:
        host.kill_generations(sorted(doomed))
        done.actions.append(f"killed master {', '.join(map(str, sorted(doomed)))}")
    if old_master:
        if move_to_live(host, old_master):
            try:
                host.write_pidfile(old_master)  # the hook may have named the new master there
                host.record_serving(old_master)
            except OSError as exc:  # a full run dir: the old master serves all the same
                done.warnings.append(
                    f"old master {old_master} serves again, but the run dir's records could "
                    f"not be written ({exc.strerror or exc}): free space, then `hotswap "
                    "recover`")
        else:
            done.warnings.append(f"old master {old_master} did not take the live FIFO back; "
                                 "run `hotswap recover`")
    return done


def _paused_by_log(host: Host, aborted: Handover) -> bool:
    """PAUSING: the hook died inside its critical section, "p" may or may not have reached the
    old master. The master's own log line says, once it has read the FIFO. Without one (an
    unwritable log) we assume it did not: resuming workers that were never paused would
    pause them."""
    def verdict():
        return uwsgilog.paused_by_log(host.log_since(aborted.log_offset))

    return bool(wait(host, lambda: verdict() is not None, PAUSE_EVIDENCE_SECONDS)) and bool(
        verdict())


def move_to_live(host: Host, master: int) -> bool:
    """Send `master`, parked on the standby FIFO, back to slot 0. True once it listens on
    the live FIFO (also when it never left it); the standby FIFO it leaves is removed."""
    if not host.holds(master, Slot.LIVE):
        try:
            host.send(Slot.STANDBY, "0")
        except fifo.NoReader:
            pass
    listening = wait(host, lambda: host.holds(master, Slot.LIVE), ROLLBACK_TIMEOUT)
    host.remove_stale(Slot.STANDBY)
    return bool(listening)


def finish_committed(host: Host, committed: Handover) -> str | None:
    """Roll a committed hand-over forward: "q" to the old master if the hook could not."""
    if committed.state is State.COMMITTED and host.alive(committed.retiring_pid):
        try:
            host.send(Slot.STANDBY, "q")
            return f"told old master {committed.retiring_pid} to quit (the hand-over had committed)"
        except fifo.NoReader:
            return None
    return None


def wake(host: Host, master: int) -> None:
    """A master whose workers all exited notices it only on its next loop turn, up to a
    second later (SIGCHLD does not wake it). SIGUSR1 (log the stats) interrupts that wait:
    the retired generation's final counters land in the log and it exits at once."""
    host.signal(master, signal.SIGUSR1)


def exited(host: Host, master: int, paused_at: float | None = None,
           freed: Callable[[int], None] = lambda _pid: None):
    """A probe: True once `master` has exited, waking it (once) when its last worker has.

    Given the hand-over's pause (`paused_at`), it also frees the workers the master's
    graceful quit never reaches (Host.stranded_workers: respawned during the pause, parked
    for good); `freed` hears each pid killed. Found by the chaos soak: one such worker kept
    an old master draining forever, and every later reload was refused (exit 4)."""
    woke: list[int] = []
    started = host.now()
    checked = [started]

    def probe() -> bool:
        if not host.alive(master):
            return True
        now = host.now()
        if paused_at is not None and now - started >= STRANDED_GRACE and \
                now - checked[0] >= STRANDED_CHECK:
            checked[0] = now
            for pid in host.stranded_workers(master, paused_at):
                host.signal(pid, signal.SIGKILL)
                freed(pid)
        if not woke and not host.workers_of(master):
            wake(host, master)
            woke.append(master)
        return False

    return probe


def reattach_fifos(host: Host) -> list[str]:
    """A master whose FIFO path was removed or replaced (an `rm`, a cleanup job) serves on,
    but no command reaches it: have it re-create the path, or say the one way out."""
    actions = []
    for item in host.detached():
        try:
            host.reattach(item)
        except OSError as exc:
            raise HotswapError(
                f"master {item.master} reads {item.path}, which was removed or replaced, and "
                f"cannot re-create it ({exc.strerror or exc}); fix the path, then `hotswap "
                f"recover`, or stop it by pid: kill -TERM {item.master}", ExitCode.INCONSISTENT
            ) from None
        actions.append(f"re-created {item.path}: master {item.master} still read it, but the "
                       "path had been removed or replaced")
    return actions


@dataclass
class Repair:
    actions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    draining: int | None = None  # an old master told to quit, still finishing requests
    draining_since: float | None = None  # wall clock, when known

    def draining_note(self) -> str:
        if not self.draining_since:
            return ""
        return f" (for {max(0.0, time.time() - self.draining_since):.0f}s)"


def repair(host: Host) -> Repair:
    """Clear what an interrupted swap left (a reload SIGKILLed at any phase, by an operator
    or by systemd's timeout): safe to run at any time, with the reload lock held."""
    report = Repair()
    report.actions.extend(reattach_fifos(host))
    masters = host.masters()
    for pid in masters.loading:
        done = abort_generation(host, pid, masters.parked,
                                "left loading by an interrupted reload")
        if done.committed:
            action = finish_committed(host, done.committed)
            report.actions.append(action or f"master {pid} had committed its hand-over")
        else:
            report.actions.append(f"rolled back master {pid} (loading a release nobody "
                                  "waited for)")
            report.actions.extend(done.actions)
        report.warnings.extend(done.warnings)
    masters = host.masters()
    current = host.handover()
    if masters.parked and masters.live:
        if current and current.master_pid == masters.live and current.committed \
                and current.retiring_pid == masters.parked:
            action = finish_committed(host, current)
            if action:
                report.actions.append(action)
            report.draining = masters.parked
            # told to quit when the hand-over committed (the record's last write, DONE)
            report.draining_since = current.at or None
        else:
            # Two masters serve and nothing links them: the live one stays, the parked
            # one retires gracefully.
            host.send(Slot.STANDBY, "q")
            report.actions.append(f"retired master {masters.parked}, parked on the standby FIFO")
            report.draining = masters.parked
    elif masters.parked:
        if not move_to_live(host, masters.parked):
            raise HotswapError(f"master {masters.parked} did not take the live FIFO back",
                               ExitCode.INCONSISTENT)
        host.write_pidfile(masters.parked)
        report.actions.append(f"moved master {masters.parked} back to the live FIFO")
    elif host.remove_stale(Slot.STANDBY):
        report.actions.append("removed a stale standby FIFO")
    return report
