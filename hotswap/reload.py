"""The reload, as a state machine: one swap from the serving generation to a new one.

    PREFLIGHT -> FORKING -> LOADING -> RETIRING -> VERIFYING -> DONE
                              |  (new master died, --timeout, or interrupted)
                              v
                          ROLLING_BACK -> FAILED

PREFLIGHT   take the reload lock; a master serves on the live FIFO; nothing is parked on
            the standby FIFO or left loading by an interrupted swap; remember the log
            offset and the serving generation.
FORKING     "1f" into the live FIFO: the old master moves to the standby FIFO ("1") and
            forks a fresh master ("f"), which re-reads srv.ini and re-imports the app.
LOADING     wait for the new generation's accepting hook (handover.py) to report that its
            worker 1 accepts and that it told the old master to quit.
RETIRING    the old master drains its in-flight requests and exits (own budget: --drain).
VERIFYING   /healthz over the socket answers from the new master; every worker accepts.
ROLLING_BACK  kill the new generation (its own process group: uWSGI setsid()s a re-forked
            master), write "0" into the standby FIFO so the old master takes the live FIFO
            back, remove the stale standby FIFO. The old generation never stopped serving.

Invariants: one reload at a time (flock); the old generation serves until a new one is
ready; every failure before RETIRING ends with the old master on the live FIFO and no
stale FIFO. From RETIRING on, the swap is committed: SIGINT/SIGTERM no longer interrupt it,
and neither can they interrupt a rollback halfway.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum

from . import fifo, files, notify, probe, procs, stats
from .config import Config
from .errors import ExitCode, HotswapError
from .instance import find_masters, handed_over, handover_record, kill_loading
from .lock import reload_lock

SPAWN_TIMEOUT = 10.0  # uWSGI logs the re-forked master's pid right after fork()
ROLLBACK_TIMEOUT = 10.0
VERIFY_TIMEOUT = 10.0
# The hook has started the hand-over (MAINPID, "q") when the deadline hits: let it finish
# rather than kill a master systemd may already track and the old one may already leave.
HANDOVER_GRACE = notify.BARRIER_TIMEOUT + 5.0
LOG_TAIL_LINES = 15
SPAWNED_RE = re.compile(rb"new master copy spawned with pid (\d+)")
# The last line of a Python traceback: "module.path.SomeError: message". uWSGI names a
# wsgi-file's module after its path, so the qualifier may hold any non-space character.
EXCEPTION_LINE_RE = re.compile(r"^(?:\S*\.)?(\w*(?:Error|Exception|Exit|Interrupt)\b:?.*)$")


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
    warnings: list[str] = field(default_factory=list)
    phases: list[dict] = field(default_factory=list)  # {"phase", "at", "detail"}
    log_tail: list[str] = field(default_factory=list)
    finished_at: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


class ReloadFailed(HotswapError):
    """A failure after "1f": the machine rolls back before reporting it."""


def cause_from(log_tail: list[str]) -> str:
    """': <the last exception line>' from a startup log tail, or '' if none."""
    for line in reversed(log_tail):
        match = EXCEPTION_LINE_RE.match(line.strip())
        if match:
            return f": {match.group(1).strip()}"
    return ""


class Reload:
    """One swap. `run()` returns a ReloadResult; `on_phase` hears each step as it happens."""

    def __init__(
        self,
        cfg: Config,
        timeout: float,
        drain_timeout: float,
        on_phase: Callable[[Phase, float, str], None] = lambda *_: None,
    ) -> None:
        self.cfg = cfg
        self.timeout = timeout
        self.drain_timeout = drain_timeout
        self.on_phase = on_phase
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.phases: list[dict] = []
        self.warnings: list[str] = []
        self.old_master: int | None = None
        self.new_master: int | None = None
        self.old_generation: str | None = None
        self.new_generation: str | None = None
        self.log_offset = 0
        self.interruptible = False
        self.interrupted = False

    # -- bookkeeping -------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def enter(self, phase: Phase, detail: str) -> None:
        at = round(self.elapsed(), 3)
        self.phases.append({"phase": phase.value, "at": at, "detail": detail})
        self.on_phase(phase, at, detail)

    def result(self, code: ExitCode, message: str, rolled_back: bool = False,
               log_tail: list[str] | None = None) -> ReloadResult:
        result = ReloadResult(
            ok=code is ExitCode.OK,
            exit_code=int(code),
            message=message,
            seconds=round(self.elapsed(), 3),
            rolled_back=rolled_back,
            old_master=self.old_master,
            new_master=self.new_master,
            old_generation=self.old_generation,
            new_generation=self.new_generation,
            warnings=self.warnings,
            phases=self.phases,
            log_tail=log_tail or [],
            finished_at=time.time(),
        )
        files.atomic_write(
            self.cfg.last_reload_file, json.dumps(result.to_json(), indent=1),
            owner_of=self.cfg.run_dir,
        )
        return result

    # -- signals: interrupt while loading, never once committed ------------------------
    def handle_interrupt(self, signum: int, _frame: object) -> None:
        if self.interruptible:
            raise KeyboardInterrupt
        self.interrupted = True  # noted; the swap (or rollback) runs to its end

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, self.handle_interrupt)

    # -- the machine -------------------------------------------------------------------
    def run(self) -> ReloadResult:
        self._install_signal_handlers()
        with reload_lock(self.cfg, "start another"):
            self.preflight()
            try:
                self.interruptible = True
                try:
                    self.fork()
                    self.wait_loaded()
                except KeyboardInterrupt:
                    # SIGINT, or SIGTERM from systemd's reload timeout.
                    raise ReloadFailed("interrupted", ExitCode.RELOAD_FAILED) from None
                finally:
                    self.interruptible = False
            except ReloadFailed as failure:
                tail = self.log_tail()
                self.roll_back()
                message = failure.message + cause_from(tail)
                if not self._old_generation_answers():
                    message += (f"; and the old generation (master {self.old_master}) does not "
                                "answer /healthz either: see `hotswap status`")
                    self.enter(Phase.FAILED, message)
                    return self.result(ExitCode.INCONSISTENT, message, log_tail=tail)
                self.enter(Phase.FAILED, message)
                return self.result(failure.code, message, rolled_back=True, log_tail=tail)
            return self.finish()

    def preflight(self) -> None:
        cfg = self.cfg
        masters = find_masters(cfg)
        if masters.loading:
            raise HotswapError(
                f"master {masters.loading[0]} is loading a release nobody waits for (an "
                "interrupted reload?); run `hotswap recover`", ExitCode.INCONSISTENT,
            )
        if masters.parked:
            raise HotswapError(
                f"master {masters.parked} is parked on the standby FIFO (still draining, or "
                "left by an interrupted swap); wait for it to exit or run `hotswap recover`",
                ExitCode.INCONSISTENT,
            )
        if not masters.live:
            raise HotswapError(
                f"nothing is running: no master reads {cfg.fifo_live}", ExitCode.NOT_RUNNING
            )
        fifo.remove_if_stale(cfg.fifo_standby)
        self.old_master = masters.live
        health = probe.healthz(cfg.http_socket, timeout=min(5.0, self.remaining()))
        self.old_generation = health.get("generation") if health else None
        self.log_offset = self._log_size()
        self.enter(
            Phase.PREFLIGHT,
            f"master {self.old_master} serving generation {self.old_generation or '?'}",
        )

    def fork(self) -> None:
        try:
            fifo.send(self.cfg.fifo_live, "1f")
        except fifo.NoReader as exc:
            raise HotswapError(
                f"master {self.old_master} stopped reading its FIFO ({exc.strerror}); "
                "see `hotswap status`", ExitCode.INCONSISTENT,
            ) from None
        self.enter(Phase.FORKING, f'sent "1f" to {self.cfg.fifo_live}')
        budget = min(SPAWN_TIMEOUT, self.remaining())
        self.new_master = procs.wait_until(self._spawned_pid, budget)
        if not self.new_master:
            raise ReloadFailed(
                f"master {self.old_master} did not fork a new master within {budget:.3g}s",
                ExitCode.RELOAD_FAILED,
            )
        self.enter(Phase.LOADING, f"new master {self.new_master} is loading the release")

    def _spawned_pid(self) -> int | None:
        """uWSGI's old master logs the re-forked pid; /proc is the fallback (a re-forked
        master is a session leader whose parent is the old master)."""
        match = SPAWNED_RE.search(self._read_log())
        if match:
            return int(match.group(1))
        reforked = procs.session_leaders_below(self.old_master)
        return reforked[0] if reforked else None

    def wait_loaded(self) -> None:
        def loaded_or_dead():
            record = handed_over(self.cfg, self.new_master)
            if record:
                return record
            return None if procs.alive(self.new_master) else {"dead": True}

        outcome = procs.wait_until(loaded_or_dead, self.remaining())
        if outcome is None and self._handover_started():
            outcome = procs.wait_until(loaded_or_dead, HANDOVER_GRACE)
        if outcome is None:
            raise ReloadFailed(
                f"new master {self.new_master} was not ready within --timeout "
                f"{self.timeout:g}s; killed it", ExitCode.TIMEOUT,
            )
        if outcome.get("dead"):
            raise ReloadFailed(
                f"new master {self.new_master} exited while loading the release",
                ExitCode.RELOAD_FAILED,
            )
        self.new_generation = outcome.get("generation")
        self.enter(
            Phase.RETIRING,
            f"worker 1 of master {self.new_master} accepting, generation "
            f"{self.new_generation}; old master {self.old_master}: {outcome.get('retire')}",
        )
        if outcome.get("retire") != "sent":
            # The hook could not reach the old master; try once more ourselves.
            try:
                fifo.send(self.cfg.fifo_standby, "q")
            except fifo.NoReader:
                self.warnings.append(f"could not tell old master {self.old_master} to quit")

    def _handover_started(self) -> bool:
        record = handover_record(self.cfg)
        return record.get("master_pid") == self.new_master and record.get("phase") == "started"

    def finish(self) -> ReloadResult:
        drain_deadline = time.monotonic() + self.drain_timeout
        woke = False
        while procs.alive(self.old_master):
            if not procs.alive(self.new_master):
                message = (
                    f"new master {self.new_master} died after taking over, while old master "
                    f"{self.old_master} was retiring: the service may be down; check the log, "
                    "then `hotswap status` / `hotswap start`"
                )
                self.enter(Phase.FAILED, message)
                return self.result(ExitCode.INCONSISTENT, message, log_tail=self.log_tail())
            if time.monotonic() >= drain_deadline:
                self.warnings.append(
                    f"old master {self.old_master} still draining after --drain "
                    f"{self.drain_timeout:g}s (uWSGI's worker-reload-mercy bounds it)"
                )
                break
            if not woke and not self._old_workers():
                self._wake(self.old_master)
                woke = True
            time.sleep(0.02)
        else:
            self.enter(Phase.VERIFYING, f"old master {self.old_master} drained and exited")
        return self.verify()

    def _old_workers(self) -> list[int]:
        return [p for p in procs.children(self.old_master) if p != self.new_master]

    @staticmethod
    def _wake(master: int) -> None:
        """A master whose workers all exited notices it only on its next loop turn, up to a
        second later (SIGCHLD does not wake it). SIGUSR1 (log the stats) interrupts that
        wait: the retired generation's final counters land in the log and it exits at once."""
        procs.signal_quietly(master, signal.SIGUSR1)

    def verify(self) -> ReloadResult:
        cfg = self.cfg

        def answers_from_new():
            health = probe.healthz(cfg.http_socket, timeout=2.0)
            return health if health and health.get("master_pid") == self.new_master else None

        health = procs.wait_until(answers_from_new, VERIFY_TIMEOUT)
        if not health:
            message = f"/healthz does not answer from new master {self.new_master}"
            self.enter(Phase.FAILED, message)
            return self.result(ExitCode.INCONSISTENT, message, log_tail=self.log_tail())
        self.new_generation = health.get("generation", self.new_generation)
        accepting = procs.wait_until(self._all_workers_accepting, VERIFY_TIMEOUT)
        if not accepting:
            self.warnings.append(f"not every worker of master {self.new_master} accepts yet")
        if not procs.alive(self.old_master):
            # A retired master re-creates its FIFO on the way out (uwsgi#1492): clear it.
            fifo.remove_if_stale(cfg.fifo_standby)
        message = (
            f"generation {self.old_generation or '?'} (master {self.old_master}) -> "
            f"{self.new_generation} (master {self.new_master})"
        )
        self.enter(
            Phase.DONE,
            f"/healthz answers from master {self.new_master}, {accepting or '?'} workers accepting",
        )
        return self.result(ExitCode.OK, message)

    def _all_workers_accepting(self) -> str | None:
        """'n/n' once the stats socket (re-bound by the newest master) shows every worker of
        the new master accepting."""
        document = stats.read(self.cfg.stats_socket)
        if not document or document.get("pid") != self.new_master:
            return None
        workers = stats.workers(document)
        ready = sum(1 for w in workers if w["accepting"])
        return f"{ready}/{len(workers)}" if workers and ready == len(workers) else None

    def roll_back(self) -> None:
        cfg = self.cfg
        self.enter(Phase.ROLLING_BACK, f"old master {self.old_master} keeps serving")
        # Whatever the old master re-forked is this failed release, even a master whose pid
        # we never learned (an interrupt right after "1f").
        doomed = {*procs.session_leaders_below(self.old_master), self.new_master} - {None}
        kill_loading(sorted(doomed))
        record = handover_record(cfg)
        if record.get("master_pid") == self.new_master and record.get("paused_workers") \
                and record.get("retire") != "sent":
            # The hook paused the old workers ("p") but never told them to quit: "p" again
            # resumes them (it toggles).
            try:
                fifo.send(cfg.fifo_standby, "p")
            except fifo.NoReader:
                self.warnings.append(f"could not resume the paused workers of {self.old_master}")
        if not fifo.move_to_live(self.old_master, cfg.fifo_standby, cfg.fifo_live,
                                 ROLLBACK_TIMEOUT):
            self.warnings.append(
                f"old master {self.old_master} did not take {cfg.fifo_live} back; "
                "run `hotswap recover`"
            )
        cfg.handover_file.unlink(missing_ok=True)

    def _old_generation_answers(self) -> bool:
        def answers():
            health = probe.healthz(self.cfg.http_socket, timeout=2.0)
            return bool(health and health.get("master_pid") == self.old_master)

        return bool(procs.wait_until(answers, VERIFY_TIMEOUT, interval=0.1))

    # -- the uWSGI log -------------------------------------------------------------------
    def _log_size(self) -> int:
        try:
            return self.cfg.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    def _read_log(self) -> bytes:
        """What the log gained since PREFLIGHT (all of it if it was truncated or rotated)."""
        try:
            with open(self.cfg.log_file, "rb") as handle:
                size = handle.seek(0, 2)
                handle.seek(self.log_offset if size >= self.log_offset else 0)
                return handle.read()
        except FileNotFoundError:
            return b""

    def log_tail(self) -> list[str]:
        return self._read_log().decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]


def reload(
    cfg: Config,
    timeout: float,
    drain_timeout: float,
    on_phase: Callable[[Phase, float, str], None] = lambda *_: None,
) -> ReloadResult:
    return Reload(cfg, timeout, drain_timeout, on_phase).run()
