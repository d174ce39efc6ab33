"""The reload, as a state machine: one swap from the serving generation to a new one.

    PREFLIGHT -> FORKING -> LOADING ==(commit point)==> RETIRING -> VERIFYING -> DONE
                   |           |                           ^
                   v           v                           | (the hook committed first)
                   ROLLING_BACK ---------------------------+
                       |
                       v
                     FAILED

PREFLIGHT   repair what an interrupted swap left (repair.py), refuse what it cannot; note the
            serving master and generation; refuse a second generation that does not fit in
            memory (MemoryGuard, memory.py), unless --force.
FORKING     "1f" into the live FIFO: the old master moves to the standby FIFO and forks a
            fresh master, which re-reads srv.ini and re-imports the app.
LOADING     wait for the new generation's hand-over (handover.py) to commit: the moment its
            hook is about to write "q" to the old master, recorded before it does.
            An OOM kill in the service's memory cgroup meanwhile is a failure that says so.
RETIRING    the old master drains its in-flight requests and exits (own budget: --drain);
            an interrupt from here on is noted, and the swap finishes.
VERIFYING   the health path answers from the new master; every worker accepts.
ROLLING_BACK  abort the hand-over (under the record lock, so it cannot commit meanwhile), kill
            the new generation, which has served nothing, and give the old master its FIFO.

The one rule: before the commit point, any failure, timeout or interrupt (SIGINT, SIGTERM)
rolls back; from the commit point on, nothing does: the swap finishes (its waits are bounded
by --drain and VERIFY_TIMEOUT), then reports the interrupt as a warning. Whether an
interrupt may roll back is read from the hand-over record, never from a flag switched around
calls. Signal handlers only call interrupt(); each phase returns the next one; end() is the
only way out.

Everything outside goes through a Host (host.py): tests/test_machine.py drives every
transition with a fake one.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum

from ..config import Config
from ..errors import ExitCode, HotswapError
from ..protocol.record import PAUSE_STATES, Handover, State
from ..system import early, files, memory, stats, uwsgilog
from . import metrics, probe
from .host import Host, RealHost, Slot
from .lock import reload_lock
from .repair import Repair, abort_generation, exited, finish_committed, repair, wait
from .store_switch import repair_switch

# The serving generation's health path, asked before anything changes.
HEALTH_TIMEOUT = 5.0
SPAWN_TIMEOUT = 10.0  # uWSGI logs the re-forked master's pid right after fork()
VERIFY_TIMEOUT = 10.0
# The hook has started the hand-over (systemd's barrier may take 5 s) when the deadline
# hits: let it reach the commit point or fail, rather than abort it halfway.
HANDOVER_GRACE = 10.0
# The hook waits at most 2 s for the old workers to park (handover.PAUSE_TIMEOUT): a
# hand-over still paused well after that is stuck (its hook stopped or frozen), and the old
# workers serve nothing while it is. Roll back.
PAUSE_STALL = 3.5
# A committed hook writes "q" within microseconds; if it has not, we write it.
RETIRE_GRACE = 1.0
# How long an OOM-killed new master may take to die once the cgroup counted the kill.
OOM_SETTLE = 1.0
# The hand-over's records (handover.json, the pidfile, last-reload.json) need a few KiB of
# the run dir: with less, no new generation can commit.
RUN_DIR_MIN_FREE = 16 * 1024
DISK_FULL_GRACE = 2.0  # a run dir that stays that full this long while loading: roll back


class Phase(str, Enum):
    PREFLIGHT = "preflight"
    FORKING = "forking"
    LOADING = "loading"
    RETIRING = "retiring"
    VERIFYING = "verifying"
    DONE = "done"
    ROLLING_BACK = "rolling-back"
    FAILED = "failed"


@dataclass
class ReloadResult:
    ok: bool
    exit_code: int
    message: str
    seconds: float
    rolled_back: bool = False  # the old generation still serves
    old_master: int | None = None
    new_master: int | None = None
    old_generation: str | None = None
    new_generation: str | None = None
    interrupted: str | None = None  # the signal that arrived during the swap, if any
    warnings: list[str] = field(default_factory=list)
    phases: list[dict] = field(default_factory=list)  # {"phase", "at", "detail"}
    log_tail: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Failure:
    cause: str
    code: ExitCode


class Swap:
    """A swap's bookkeeping: deadline, timeline, interrupts, and the one way out (end)."""

    def __init__(self, host: Host, timeout: float, drain_timeout: float,
                 on_phase: Callable[[Phase, float, str], None] = lambda *_: None,
                 force: bool = False,
                 memory_margin: float = memory.DEFAULT_MARGIN_PERCENT) -> None:
        self.host = host
        # swap even when the serving generation does not answer, or a second one won't fit
        self.force = force
        self.memory = MemoryGuard(host, memory_margin, force)
        self.timeout = timeout
        self.drain_timeout = drain_timeout
        self.on_phase = on_phase
        self.started = host.now()
        self.deadline = self.started + timeout
        self.result = ReloadResult(ok=False, exit_code=int(ExitCode.RELOAD_FAILED), message="",
                                   seconds=0.0)
        self.log_mark = 0
        self.interrupted: str | None = None
        self.failure: Failure | None = None
        self.committed: Handover | None = None

    def interrupt(self, name: str) -> None:
        """Called from a signal handler: only noted, read by the phase that runs."""
        self.interrupted = self.interrupted or name
        self.result.interrupted = self.interrupted

    # -- bookkeeping -------------------------------------------------------------------
    def remaining(self) -> float:
        return max(0.0, self.deadline - self.host.now())

    def enter(self, phase: Phase, detail: str) -> None:
        at = round(self.host.now() - self.started, 3)
        self.result.phases.append({"phase": phase.value, "at": at, "detail": detail})
        self.on_phase(phase, at, detail)

    def poll(self, probe, timeout: float, interval: float = 0.02, interruptible: bool = True):
        """wait() for probe, giving up early (None) when interrupted, if `interruptible`."""
        stop = object()
        value = wait(self.host, lambda: stop if interruptible and self.interrupted
                     else probe(), timeout, interval)
        return None if value is stop else value

    def end(self, code: ExitCode, message: str, rolled_back: bool = False) -> Phase:
        result = self.result
        result.ok, result.exit_code, result.message = code is ExitCode.OK, int(code), message
        result.rolled_back = rolled_back
        result.seconds = round(self.host.now() - self.started, 3)
        if code is not ExitCode.OK:
            result.log_tail = self.log_tail()
        phase = Phase.DONE if code is ExitCode.OK else Phase.FAILED
        if phase is Phase.FAILED:
            self.enter(phase, message)
        return phase

    def log_tail(self) -> list[str]:
        text = self.host.log_since(self.log_mark).decode(errors="replace")
        return text.splitlines()[-uwsgilog.TAIL_LINES:]

    def fail(self, cause: str, code: ExitCode = ExitCode.RELOAD_FAILED) -> Phase:
        self.failure = Failure(cause, code)
        return Phase.ROLLING_BACK


class ToCommit(Swap):
    """The phases before the commit point, and the rollback that may end them."""

    def preflight(self) -> Phase:
        host, result = self.host, self.result
        repaired = repair(host)
        for action in repaired.actions:
            self.enter(Phase.PREFLIGHT, f"repaired: {action}")
        result.warnings.extend(repaired.warnings)
        if repaired.draining and not self._wait_drained(repaired):
            return self._interrupted_before_anything()
        live = host.masters().live
        if not live:
            raise HotswapError("nothing is running: no master reads the live FIFO",
                               ExitCode.NOT_RUNNING)
        result.old_master = live
        if host.stopped(live):
            # A stopped master's FIFO still takes "1f" into its pipe buffer: it would fork
            # on `kill -CONT`, long after this reload gave up, with nobody watching.
            raise HotswapError(
                f"master {live} is stopped (state T: kill -STOP, or a debugger holds it); "
                f"nothing was sent to its FIFO. Resume it with `kill -CONT {live}`, then "
                "reload again", ExitCode.INCONSISTENT)
        for refusal in host.config_drift(live):
            raise HotswapError(refusal, ExitCode.CONFIG)
        health = host.healthz(min(HEALTH_TIMEOUT, self.remaining()))
        result.old_generation = health.get("generation") if health else None
        if health is None and not self.force:
            raise HotswapError(
                f"master {live} serves, but the health path did not answer within "
                f"{HEALTH_TIMEOUT:g}s{busy_note(host.stats())}: with nothing healthy to "
                "compare against, a swap could trade a working generation for a broken one; "
                "see `hotswap status`, or swap anyway with `hotswap reload --force`",
                ExitCode.INCONSISTENT)
        self.log_mark = host.log_mark()
        self.enter(Phase.PREFLIGHT,
                   f"master {live} serving generation {result.old_generation or '?'}")
        self.enter(Phase.PREFLIGHT, self.memory.check(live))
        full = run_dir_full(host)
        if full:
            raise HotswapError(
                f"{full}: a new generation could not record its hand-over; nothing was "
                f"changed, master {live} keeps serving. Free space there, then reload",
                ExitCode.NO_ROOM)
        if self.interrupted:
            return self._interrupted_before_anything()
        return Phase.FORKING

    def _interrupted_before_anything(self) -> Phase:
        return self.end(ExitCode.RELOAD_FAILED,
                        f"interrupted by {self.interrupted} before anything changed")

    def _wait_drained(self, repaired: Repair) -> bool:
        """The last swap's old master still finishes its requests (a reload right after an
        interrupted one): wait for it within this reload's own budget (--drain, inside
        --timeout) rather than refuse; a swap now would park a second master beside it."""
        old = repaired.draining
        self.enter(Phase.PREFLIGHT, f"waiting for old master {old} to drain its in-flight "
                                    f"requests from the last swap{repaired.draining_note()}")
        budget = min(self.drain_timeout, self.remaining())
        last = self.host.handover()
        paused_at = last.paused_at if last and last.retiring_pid == old else None
        if self.poll(exited(self.host, old, paused_at, self._freed(old)), budget):
            self.host.remove_stale(Slot.STANDBY)  # re-created on its way out (uwsgi#1492)
            self.enter(Phase.PREFLIGHT, f"old master {old} drained and exited")
            return True
        if self.interrupted:
            return False
        raise HotswapError(
            f"old master {old} is still draining its in-flight requests from the last "
            f"swap{repaired.draining_note()} after waiting {budget:g}s for it; reload "
            "again once it has exited (`hotswap status`)", ExitCode.BUSY)

    def _freed(self, old: int) -> Callable[[int], None]:
        def note(pid: int) -> None:
            self.result.warnings.append(
                f"old master {old}: worker {pid} was respawned during the hand-over's pause "
                "and stayed parked, out of reach of uWSGI's graceful quit; it had accepted "
                "nothing: killed it so the old master can exit")
        return note

    def fork(self) -> Phase:
        old = self.result.old_master
        try:
            self.host.send(Slot.LIVE, "1f")
        except OSError as exc:
            raise HotswapError(f"master {old} stopped reading its FIFO ({exc.strerror}); "
                               "see `hotswap status`", ExitCode.INCONSISTENT) from None
        self.enter(Phase.FORKING, 'sent "1f" to the live FIFO')
        # Not cut short by an interrupt: a rollback must know which master to abort, or the
        # old master could fork one after we "rolled back", with nobody watching it.
        budget = min(SPAWN_TIMEOUT, self.remaining())
        new = self.poll(self._spawned_pid, budget, interruptible=False)
        if not new:
            return self.fail(f"master {old} did not fork a new master within {budget:.3g}s")
        self.result.new_master = new
        self.enter(Phase.LOADING, f"new master {new} is loading the release")
        return Phase.LOADING

    def _spawned_pid(self) -> int | None:
        """uWSGI's old master logs the re-forked pid; /proc is the fallback (a re-forked
        master is a session leader whose parent is the old master)."""
        logged = uwsgilog.spawned_pid(self.host.log_since(self.log_mark))
        if logged:
            return logged
        reforked = self.host.reforked_below(self.result.old_master)
        return reforked[0] if reforked else None

    def wait_committed(self) -> Phase:
        watch = HandoverWatch(self.host, self.result.new_master)
        old = self.result.old_master
        # The release loads at a low priority (system/priority.py): on a busy machine that
        # could cost it the deadline, so past half of what is left it gets the service's own.
        boost_at = self.host.now() + self.remaining() / 2
        boosted = []
        full_since: list[float] = []

        def outcome_or_oom():
            if not boosted and self.host.now() >= boost_at:
                boosted.append(self.host.restore_priority(self.result.new_master))
                self.enter(Phase.LOADING, "still loading at half of --timeout: back to the "
                           f"service's priority ({boosted[0]})")
            return watch.outcome() or self.memory.oom_killed(old) or disk_full()

        def disk_full():
            # No hook can commit on a full run dir (its record would not be written): say
            # so after a short grace instead of waiting out --timeout.
            if not run_dir_full(self.host):
                full_since.clear()
            elif not full_since:
                full_since.append(self.host.now())
            elif self.host.now() - full_since[0] >= DISK_FULL_GRACE:
                return "disk full"
            return None

        outcome = self.poll(outcome_or_oom, self.remaining())
        if outcome is None and not self.interrupted and watch.started:
            outcome = self.poll(outcome_or_oom, HANDOVER_GRACE)
        new = self.result.new_master
        if isinstance(outcome, Handover) and outcome.committed:
            return self._committed(outcome)
        if isinstance(outcome, Handover):  # ABORTED by the hook itself
            return self.fail(outcome.error or "the hand-over was aborted")
        if outcome in ("dead", "oom"):
            return self.fail(self.memory.cause(new, old, outcome == "dead",
                                               self.host.log_since(self.log_mark))
                             or f"new master {new} exited while loading the release")
        if outcome == "disk full":
            return self.fail(f"{run_dir_full(self.host) or 'the run dir is full'}: new master "
                             f"{new} cannot record its hand-over; free space there, then "
                             "reload")
        if outcome == "stalled":
            return self.fail(f"the hand-over of master {new} stalled with the old workers "
                             f"paused (hook pid {watch.performer} stopped or stuck)")
        if self.interrupted:
            return self.fail(f"interrupted by {self.interrupted}")
        return self.fail(f"new master {new} was not ready within --timeout {self.timeout:g}s; "
                         "killed it", ExitCode.TIMEOUT)

    def _committed(self, committed: Handover) -> Phase:
        self.committed = committed
        self.result.new_generation = committed.generation
        self.enter(Phase.RETIRING,
                   f"hand-over committed: generation {committed.generation} (master "
                   f"{committed.master_pid}) serves; old master {self.result.old_master} "
                   f"told to quit (workers paused {committed.paused}; nobody accepted for "
                   f"{_ms(committed.pause_seconds)})")
        return Phase.RETIRING

    def roll_back(self) -> Phase:
        failure, result = self.failure, self.result
        assert failure is not None
        self.enter(Phase.ROLLING_BACK, f"old master {result.old_master} keeps serving")
        done = abort_generation(self.host, result.new_master, result.old_master, failure.cause)
        if done.committed:
            result.warnings.append(f"{failure.cause}; but the hand-over had already committed: "
                                   "finished the swap instead of rolling back")
            return self._committed(done.committed)
        result.warnings.extend(done.warnings)
        message = failure.cause + uwsgilog.cause_from(self.log_tail())
        if not self._answers_from(result.old_master):
            workers = self.host.workers_of(result.old_master)
            if not workers:
                return self.end(ExitCode.INCONSISTENT,
                                f"{message}; and the old generation (master "
                                f"{result.old_master}) has no worker left and does not answer "
                                "the health path: see `hotswap status`")
            result.warnings.append(
                f"old master {result.old_master} serves again with {len(workers)} workers, "
                f"but the health path did not answer within {VERIFY_TIMEOUT:g}s"
                f"{busy_note(self.host.stats())}: busy with long requests, or stuck; "
                "see `hotswap status`")
        return self.end(failure.code, message, rolled_back=True)



class Reload(ToCommit):
    """One swap. `run()` returns a ReloadResult; `on_phase` hears each step as it happens."""

    def run(self) -> ReloadResult:
        steps = {Phase.PREFLIGHT: self.preflight, Phase.FORKING: self.fork,
                 Phase.LOADING: self.wait_committed, Phase.ROLLING_BACK: self.roll_back,
                 Phase.RETIRING: self.retire, Phase.VERIFYING: self.verify}
        phase = Phase.PREFLIGHT
        while phase not in (Phase.DONE, Phase.FAILED):
            phase = steps[phase]()
        return self.result

    # -- from the commit point on -----------------------------------------------------------
    def retire(self) -> Phase:
        host, result, committed = self.host, self.result, self.committed
        assert committed is not None
        if committed.state is State.COMMITTED:
            sent = self.poll(lambda: (h := host.handover()) and h.master_pid == committed.master_pid
                             and h.state in (State.RETIRE_SENT, State.DONE), RETIRE_GRACE,
                             interruptible=False)
            if not sent and not finish_committed(host, committed) and host.alive(
                    committed.retiring_pid):
                result.warnings.append(f"could not tell old master {result.old_master} to quit")
        return self._drain()

    def _drain(self) -> Phase:
        host, result = self.host, self.result
        old, new = result.old_master, result.new_master
        paused_at = self.committed.paused_at if self.committed else None
        old_exited = exited(host, old, paused_at, self._freed(old))

        def gone_or_new_dead():
            if old_exited():
                return "gone"
            return "new dead" if not host.alive(new) else None

        # Past the commit point an interrupt does not cut this short: the swap finishes, and
        # the standby FIFO the old master re-creates on its way out is cleared below.
        outcome = self.poll(gone_or_new_dead, self.drain_timeout, interruptible=False)
        if outcome == "new dead":
            return self.end(ExitCode.INCONSISTENT,
                            f"new master {new} died after taking over, while old master {old} "
                            "was retiring: the service may be down; check the log, then "
                            "`hotswap status` / `hotswap start`")
        if self.interrupted:
            result.warnings.append(f"interrupted by {self.interrupted} after the commit point: "
                                   "finished the swap instead of rolling it back")
        if outcome == "gone":
            self.enter(Phase.VERIFYING, f"old master {old} drained and exited")
        else:
            result.warnings.append(f"old master {old} still draining after --drain "
                                   f"{self.drain_timeout:g}s (uWSGI's worker-reload-mercy "
                                   "bounds it)")
        return Phase.VERIFYING

    def verify(self) -> Phase:
        host, result = self.host, self.result
        if not host.alive(result.old_master):
            # A retired master re-creates its FIFO on the way out (uwsgi#1492): clear it.
            host.remove_stale(Slot.STANDBY)
        health = self._answers_from(result.new_master)
        if not health:
            return self.end(ExitCode.INCONSISTENT,
                            f"the health path does not answer from new master "
                            f"{result.new_master} (200 with its master_pid)")
        result.new_generation = health.get("generation", result.new_generation)
        accepting = wait(host, self._all_workers_accepting, VERIFY_TIMEOUT)
        if not accepting:
            result.warnings.append(f"not every worker of master {result.new_master} accepts yet")
        self.enter(Phase.DONE, f"health path answers from master {result.new_master}, "
                               f"{accepting or '?'} workers accepting")
        return self.end(ExitCode.OK, f"generation {result.old_generation or '?'} (master "
                                     f"{result.old_master}) -> {result.new_generation} (master "
                                     f"{result.new_master})")

    def _answers_from(self, master: int | None) -> dict | None:
        return wait(self.host, lambda: probe.from_master(self.host.healthz(2.0), master),
                    VERIFY_TIMEOUT, interval=0.1)

    def _all_workers_accepting(self) -> str | None:
        """'n/n' once the stats socket (re-bound by the newest master) shows every worker of
        the new master accepting."""
        document = self.host.stats()
        if not document or document.get("pid") != self.result.new_master:
            return None
        workers = [w for w in document.get("workers", []) if w.get("pid")]
        ready = sum(1 for w in workers if w.get("accepting"))
        return f"{ready}/{len(workers)}" if workers and ready == len(workers) else None


class MemoryGuard:
    """The preflight's memory check (refuse a swap that does not fit), and the verdict on a
    new generation that died while loading: the OOM killer, if the cgroup's counter rose."""

    def __init__(self, host: Host, margin_percent: float, force: bool) -> None:
        self.host = host
        self.margin_percent = margin_percent
        self.force = force  # measure (the OOM counter's baseline), never refuse
        self.room: memory.Room | None = None

    def check(self, master: int) -> str:
        """The preflight line; raises NO_ROOM when a second generation does not fit."""
        room = self.room = self.host.memory_room(master, self.margin_percent)
        if self.force:
            return f"memory: {room.describe()}; not checked (--force)"
        if not room.fits:
            raise HotswapError(
                f"not enough memory for a second generation: {room.describe()}; nothing was "
                f"changed, master {master} keeps serving. Free memory, raise the limit, or "
                "`hotswap reload --force` to try anyway", ExitCode.NO_ROOM)
        return f"memory: {room.describe()}"

    def oom_killed(self, master: int | None, in_cgroup: bool = True) -> str | None:
        """"oom" once the OOM killer has struck since check(): in the memory cgroup of
        `master`, or (not `in_cgroup`, without a cgroup) anywhere on the machine."""
        before = self.room.oom_kills if self.room else None
        if before is None or not master or (in_cgroup and not self.room.cgroup):
            return None
        now = self.host.oom_kills(master)
        return "oom" if now is not None and now > before else None

    def cause(self, new: int | None, old: int | None, dead: bool, log: bytes) -> str | None:
        """Why the new generation failed, if it was the OOM killer (`log`: the uWSGI log
        since the swap began, where a master reports a worker killed by SIGKILL)."""
        if not self.oom_killed(old, in_cgroup=not dead):
            return None
        # The kernel counts the kill before its SIGKILL has taken the victim down.
        dead = dead or bool(wait(self.host, lambda: not self.host.alive(new), OOM_SETTLE))
        room = self.room
        limit = f"limit {memory.human(room.limit)}" if room and room.limit else \
            f"no cgroup limit; {memory.human(room.mem_available if room else None)} was available"
        if dead:
            return f"new master {new} was killed by the kernel's OOM killer while loading ({limit})"
        workers = uwsgilog.sigkilled_workers(log)
        if workers:
            return (f"worker {workers[-1]} of new master {new} was killed by the kernel's OOM "
                    f"killer while loading ({limit})")
        return (f"the kernel's OOM killer killed a process of the new generation (master {new}) "
                f"while it loaded ({limit})")


class HandoverWatch:
    """What LOADING waits for: the new master's record committed or aborted, the master
    dead, or a hand-over stalled with the old workers paused."""

    def __init__(self, host: Host, master: int | None) -> None:
        self.host = host
        self.master = master
        self.started = False  # the hook has begun: the deadline gets HANDOVER_GRACE
        self.performer: int | None = None
        self._last: tuple | None = None
        self._since = host.now()

    def outcome(self) -> Handover | str | None:
        current = self.host.handover()
        mine = current if current and current.master_pid == self.master else None
        if mine and (mine.committed or mine.state is State.ABORTED):
            return mine
        if not self.host.alive(self.master):
            return "dead"
        if mine is None:
            return None
        self.started, self.performer = True, mine.performer_pid
        key = (mine.state, mine.performer_pid)
        if key != self._last:
            self._last, self._since = key, self.host.now()
        if mine.state in PAUSE_STATES and self.host.now() - self._since > PAUSE_STALL:
            return "stalled"
        return None


def run_dir_full(host: Host) -> str | None:
    """What to say when the run dir has no room for the hand-over's records, else None."""
    path, free = host.run_dir_space()
    if free is None or free >= RUN_DIR_MIN_FREE:
        return None
    return f"the run dir {path} is full ({free} bytes free)"


def busy_note(document: dict | None) -> str:
    """' (3/4 workers busy with requests)' from a stats document, or ''."""
    workers = stats.workers(document) if document else []
    busy = sum(worker["status"] == "busy" for worker in workers)
    return f" ({busy}/{len(workers)} workers busy with requests)" if busy else ""


def _ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1000:.0f} ms"


def write_last_reload(cfg: Config, result: ReloadResult) -> None:
    document = {**result.to_json(), "finished_at": files.iso_time()}
    files.atomic_write(cfg.last_reload_file, json.dumps(document, indent=1),
                       owner_of=cfg.run_dir)


def reload(cfg: Config, timeout: float, drain_timeout: float,
           on_phase: Callable[[Phase, float, str], None] = lambda *_: None,
           force: bool = False,
           memory_margin: float = memory.DEFAULT_MARGIN_PERCENT,
           lock_held: bool = False) -> ReloadResult:
    """One swap on the real host, with the reload lock held and SIGINT/SIGTERM noted.

    `lock_held`: the caller already holds the reload lock (release.py's deploy holds it from
    the copy to the flip back, so no other swap runs between its flip and its reload)."""
    machine = Reload(RealHost(cfg), timeout, drain_timeout, on_phase, force, memory_margin)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda sig, _frame: machine.interrupt(signal.Signals(sig).name))
        for name in early.take():  # landed while the CLI imported: before anything changed
            machine.interrupt(name)
    if lock_held:
        return _repaired_then_run(cfg, machine, on_phase)
    with reload_lock(cfg, "start another"):
        return _repaired_then_run(cfg, machine, on_phase)


def _repaired_then_run(cfg: Config, machine: Reload,
                       on_phase: Callable[[Phase, float, str], None]) -> ReloadResult:
    """A refresh killed halfway is undone first: the new generation opens what the pointer
    names, which must be a store every worker agreed on. Every outcome, a refusal included,
    is counted in the metrics here, still under the reload lock (metrics.py)."""
    try:
        for action in repair_switch(cfg):
            on_phase(Phase.PREFLIGHT, 0.0, f"repaired: {action}")
        result = machine.run()
    except HotswapError:
        metrics.count(cfg, machine.host, "reloads", "refused",
                      round(machine.host.now() - machine.started, 3))
        raise
    committed = machine.committed
    warning = metrics.count(
        cfg, machine.host, "reloads",
        metrics.outcome(result.ok, result.exit_code, result.interrupted, refused=False),
        result.seconds, committed.pause_seconds if committed else None)
    if warning:
        result.warnings.append(warning)
    return result
