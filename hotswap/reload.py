"""The reload, as a state machine: one swap from the serving generation to a new one.

    PREFLIGHT -> FORKING -> LOADING -> RETIRING -> VERIFYING -> DONE
                              |  (new master died, or --timeout)
                              v
                          ROLLING_BACK -> FAILED

PREFLIGHT   take the reload lock; the master in the pidfile is alive; the standby FIFO is
            free (a stale one is removed); remember the log offset and the old generation.
FORKING     "1f" into the live FIFO: the old master moves to the standby FIFO ("1") and
            forks a fresh master ("f"), which re-reads srv.ini and re-imports the app.
LOADING     wait for the new generation's accepting hook (handover.py) to report that its
            worker 1 is ready and that it told the old master to quit.
RETIRING    the old master drains its in-flight requests and exits.
VERIFYING   /healthz over the socket answers from the new master.
ROLLING_BACK  kill the new generation (its own process group: uWSGI setsid()s a re-forked
            master), write "0" into the standby FIFO so the old master takes the live FIFO
            back, remove the stale standby FIFO. The old generation never stopped serving.

Invariants: one reload at a time (flock); the old generation serves until a new one is
ready; every failure path ends with the old master on the live FIFO and no stale FIFO.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum

from . import fifo, probe, procs, stats
from .config import Config
from .errors import ExitCode, HotswapError

SPAWN_TIMEOUT = 10.0  # uWSGI logs the re-forked master's pid right after fork()
ROLLBACK_TIMEOUT = 10.0
VERIFY_TIMEOUT = 10.0
LOG_TAIL_LINES = 15
SPAWNED_RE = re.compile(rb"new master copy spawned with pid (\d+)")


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
    old_master: int | None = None
    new_master: int | None = None
    old_generation: str | None = None
    new_generation: str | None = None
    phases: list[dict] = field(default_factory=list)  # {"phase", "at", "detail"}
    log_tail: list[str] = field(default_factory=list)
    finished_at: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


class ReloadFailed(Exception):
    """Raised inside the machine to leave for ROLLING_BACK."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@contextmanager
def reload_lock(cfg: Config, action: str = "start another") -> Iterator[None]:
    """Exclusive, non-blocking: a second reload (or a stop) is refused at once."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(cfg.lock_file, "a+")  # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise HotswapError(
                f"a reload is in progress (pid {holder}); refusing to {action}",
                ExitCode.BUSY,
            ) from None
        cfg.give_to_service(cfg.lock_file)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


def lock_holder(cfg: Config) -> int | None:
    """The pid holding the reload lock, if a reload is running now."""
    try:
        with open(cfg.lock_file, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                text = handle.read().strip()
                return int(text) if text.isdigit() else -1
            return None
    except FileNotFoundError:
        return None


def running_master(cfg: Config) -> int | None:
    """The master in the pidfile if it is alive and is a uWSGI process (not a reused pid)."""
    pid = procs.read_pidfile(cfg.pidfile)
    if not procs.alive(pid):
        return None
    cmd = procs.cmdline(pid)
    return pid if ("uwsgi" in cmd.lower()) else None


def read_log_from(cfg: Config, offset: int) -> bytes:
    try:
        with open(cfg.log_file, "rb") as handle:
            handle.seek(offset)
            return handle.read()
    except FileNotFoundError:
        return b""


def log_size(cfg: Config) -> int:
    try:
        return cfg.log_file.stat().st_size
    except FileNotFoundError:
        return 0


# The last line of a Python traceback: "module.path.SomeError: message". uWSGI names a
# wsgi-file's module after its path, so the qualifier may hold any non-space character.
EXCEPTION_LINE_RE = re.compile(r"^(?:\S*\.)?(\w*(?:Error|Exception|Exit|Interrupt)\b:?.*)$")


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
        on_phase: Callable[[Phase, float, str], None] = lambda *_: None,
    ) -> None:
        self.cfg = cfg
        self.timeout = timeout
        self.on_phase = on_phase
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.phases: list[dict] = []
        self.old_master: int | None = None
        self.new_master: int | None = None
        self.old_generation: str | None = None
        self.new_generation: str | None = None
        self.log_offset = 0
        self.woke_old_master = False

    # -- bookkeeping -------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def enter(self, phase: Phase, detail: str) -> None:
        at = round(self.elapsed(), 3)
        self.phases.append({"phase": phase.value, "at": at, "detail": detail})
        self.on_phase(phase, at, detail)

    def result(self, ok: bool, code: ExitCode, message: str, log_tail=()) -> ReloadResult:
        result = ReloadResult(
            ok=ok,
            exit_code=int(code),
            message=message,
            seconds=round(self.elapsed(), 3),
            old_master=self.old_master,
            new_master=self.new_master,
            old_generation=self.old_generation,
            new_generation=self.new_generation,
            phases=self.phases,
            log_tail=list(log_tail),
            finished_at=time.time(),
        )
        self._record(result)
        return result

    def _record(self, result: ReloadResult) -> None:
        tmp = f"{self.cfg.last_reload_file}.tmp.{os.getpid()}"
        with open(tmp, "w") as handle:
            json.dump(result.to_json(), handle, indent=1)
        self.cfg.give_to_service(tmp)
        os.replace(tmp, self.cfg.last_reload_file)

    # -- the machine -------------------------------------------------------------------
    def run(self) -> ReloadResult:
        with reload_lock(self.cfg):
            self.preflight()
            try:
                try:
                    self.fork()
                    self.wait_loaded()
                except KeyboardInterrupt:
                    # SIGINT, or SIGTERM from systemd's reload timeout (see cli.py).
                    raise ReloadFailed("interrupted", ExitCode.RELOAD_FAILED) from None
            except ReloadFailed as failure:
                tail = self.log_tail()
                self.roll_back()
                message = failure.message + cause_from(tail)
                self.enter(Phase.FAILED, message)
                return self.result(False, failure.code, message, tail)
            return self.finish()

    def preflight(self) -> None:
        cfg = self.cfg
        self.old_master = running_master(cfg)
        if not self.old_master:
            raise HotswapError(
                f"nothing is running: no live master in {cfg.pidfile}", ExitCode.NOT_RUNNING
            )
        standby = fifo.state(cfg.fifo_standby)
        if standby is fifo.FifoState.LISTENING:
            raise HotswapError(
                f"a master is parked on the standby FIFO {cfg.fifo_standby} (an interrupted "
                f"swap?); see `hotswap status`, then `hotswap recover`",
                ExitCode.INCONSISTENT,
            )
        if standby is fifo.FifoState.STALE:
            cfg.fifo_standby.unlink(missing_ok=True)
        cfg.handover_file.unlink(missing_ok=True)
        health = probe.healthz(cfg.http_socket, timeout=min(5.0, self.remaining()))
        self.old_generation = health.get("generation") if health else None
        self.log_offset = log_size(cfg)
        self.enter(
            Phase.PREFLIGHT,
            f"master {self.old_master} serving generation {self.old_generation or '?'}",
        )

    def fork(self) -> None:
        try:
            fifo.send(self.cfg.fifo_live, "1f")
        except fifo.NoReader as exc:
            raise HotswapError(
                f"master {self.old_master} is alive but {exc.strerror}; "
                "see `hotswap status`",
                ExitCode.INCONSISTENT,
            ) from None
        self.enter(Phase.FORKING, f'sent "1f" to {self.cfg.fifo_live}')
        self.new_master = procs.wait_until(self._spawned_pid, min(SPAWN_TIMEOUT, self.remaining()))
        if not self.new_master:
            raise ReloadFailed(
                f"master {self.old_master} did not fork a new master within "
                f"{SPAWN_TIMEOUT:g}s", ExitCode.RELOAD_FAILED,
            )
        self.enter(Phase.LOADING, f"new master {self.new_master} is loading the release")

    def _spawned_pid(self) -> int | None:
        """uWSGI's old master logs the re-forked pid; /proc is the fallback (a re-forked
        master is a session leader whose parent is the old master)."""
        match = SPAWNED_RE.search(read_log_from(self.cfg, self.log_offset))
        if match:
            return int(match.group(1))
        for pid in procs.children(self.old_master):
            info = procs.stat(pid)
            if info and info.session == pid:
                return pid
        return None

    def _handover(self) -> dict | None:
        try:
            with open(self.cfg.handover_file) as handle:
                record = json.load(handle)
        except (FileNotFoundError, ValueError):
            return None
        return record if record.get("master_pid") == self.new_master else None

    def wait_loaded(self) -> None:
        def loaded_or_dead():
            record = self._handover()
            if record:
                return record
            if not procs.alive(self.new_master):
                return {"dead": True}
            return None

        outcome = procs.wait_until(loaded_or_dead, self.remaining(), interval=0.02)
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
                pass

    def _old_master_gone(self) -> bool:
        if not procs.alive(self.old_master):
            return True
        workers = [
            p for p in procs.children(self.old_master) if p != self.new_master and procs.alive(p)
        ]
        if not workers and not self.woke_old_master:
            # Its workers have drained and exited, but a master notices that only on its
            # next loop turn, up to a second later (SIGCHLD does not wake it). SIGUSR1 (log
            # the stats) interrupts that wait: the retired generation's final counters land
            # in the log and the master exits at once.
            procs.signal_quietly(self.old_master, signal.SIGUSR1)
            self.woke_old_master = True
        return False

    def _all_workers_accepting(self) -> str | None:
        """'n/n' once the stats socket (re-bound by the newest master) shows every worker of
        the new master accepting."""
        document = stats.read(self.cfg.stats_socket)
        if not document or document.get("pid") != self.new_master:
            return None
        workers = stats.workers(document)
        ready = sum(1 for w in workers if w["accepting"])
        return f"{ready}/{len(workers)}" if workers and ready == len(workers) else None

    def finish(self) -> ReloadResult:
        cfg = self.cfg
        gone = procs.wait_until(self._old_master_gone, self.remaining(), interval=0.05)
        if not gone:
            message = (
                f"new generation {self.new_generation} (master {self.new_master}) serves, but "
                f"old master {self.old_master} is still draining at --timeout {self.timeout:g}s"
            )
            self.enter(Phase.FAILED, message)
            return self.result(False, ExitCode.TIMEOUT, message)
        self.enter(Phase.VERIFYING, f"old master {self.old_master} drained and exited")

        def answers_from_new():
            health = probe.healthz(cfg.http_socket, timeout=2.0)
            return health if health and health.get("master_pid") == self.new_master else None

        health = procs.wait_until(answers_from_new, min(VERIFY_TIMEOUT, self.remaining() + 2.0))
        if not health:
            message = f"/healthz does not answer from new master {self.new_master}"
            self.enter(Phase.FAILED, message)
            return self.result(False, ExitCode.INCONSISTENT, message, self.log_tail())
        self.new_generation = health.get("generation", self.new_generation)
        accepting = procs.wait_until(self._all_workers_accepting, min(VERIFY_TIMEOUT, 2.0))
        if accepting:
            self.enter(
                Phase.VERIFYING, f"{accepting} workers of master {self.new_master} accepting"
            )
        # A retired master re-creates its FIFO on the way out (uwsgi#1492): clear it.
        fifo.remove_if_stale(cfg.fifo_standby)
        message = (
            f"generation {self.old_generation or '?'} (master {self.old_master}) -> "
            f"{self.new_generation} (master {self.new_master})"
        )
        self.enter(Phase.DONE, f"/healthz answers from master {self.new_master}")
        return self.result(True, ExitCode.OK, message)

    def roll_back(self) -> None:
        cfg = self.cfg
        self.enter(Phase.ROLLING_BACK, f"old master {self.old_master} keeps serving")
        if self.new_master and procs.alive(self.new_master):
            # A re-forked master is its own session and process group leader (setsid()).
            procs.kill_group(self.new_master, signal.SIGKILL)
            procs.signal_quietly(self.new_master, signal.SIGKILL)
            procs.wait_until(lambda: not procs.alive(self.new_master), ROLLBACK_TIMEOUT)
        fifo.move_to_live(cfg.fifo_standby, cfg.fifo_live, ROLLBACK_TIMEOUT)
        cfg.handover_file.unlink(missing_ok=True)

    def log_tail(self) -> list[str]:
        text = read_log_from(self.cfg, self.log_offset).decode(errors="replace")
        return text.splitlines()[-LOG_TAIL_LINES:]


def reload(
    cfg: Config, timeout: float, on_phase: Callable[[Phase, float, str], None] = lambda *_: None
) -> ReloadResult:
    return Reload(cfg, timeout, on_phase).run()
