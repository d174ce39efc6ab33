"""`hotswap refresh STORE`: a data-only release, without new processes, with a commit point.

1. preflight: a live master, no swap in progress (the reload lock: a refresh and a reload
   exclude each other), a refresh killed earlier undone or finished (swap/store_switch.py),
   every worker in store mode (each has a report, hotswap/protocol/store.py);
2. validate the named store in a child process (a store bad enough to crash LMDB kills the
   child, not the CLI), then import the app against it in another child (app_check.py: the
   app's own validation and smoke checks, those a reload runs); a refused store changes
   nothing;
3. SWITCHING (hotswap/protocol/store_record.py, written first): point the workers' pointer
   (data/store/current) at it, then write `<run_dir>/store.switch`: the master's file monitor
   raises a uWSGI signal in every worker, which switches between two requests
   (hotswap/inside/live_store.py);
4. wait until every worker of the live master reports the new store (each worker writes its
   own report; none is inferred from another), then COMMITTED: the commit point.

Before the commit point, a timeout (exit 5), SIGINT or SIGTERM (exit 1; the handlers only
note it) points back and switches every worker back; after it, the refresh finishes. A
SIGKILL leaves the record, which the workers, `recover` and the next refresh/reload follow.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import Config
from ..errors import ExitCode, HotswapError
from ..protocol import store
from ..protocol.store_record import Phase, StoreSwitch
from ..service.instance import find_masters
from ..swap import metrics
from ..swap.host import RealHost
from ..swap.lock import reload_lock
from ..swap.store_switch import (
    finish,
    live_workers,
    repair_switch,
    signal_switch,
    switch_back,
    wait_switched,
)
from ..system import files
from .app_check import check_app, run_child

Show = Callable[[str, float, str], None]


@dataclass(frozen=True)
class WorkerSwitch:
    pid: int
    old_version: str
    new_version: str
    after_signal_ms: float  # from writing the switch file to the worker's report


@dataclass
class RefreshResult:
    ok: bool
    exit_code: int
    message: str
    seconds: float
    old_version: str = ""
    new_version: str = ""
    validate_seconds: float = 0.0
    switch_seconds: float = 0.0  # from the signal until every worker reported
    workers: list[WorkerSwitch] = field(default_factory=list)
    interrupted: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def validate_in_child(path: Path, timeout: float, stop: Callable[[], bool]
                      ) -> store.StoreInfo:
    """StoreInfo of `path`, or HotswapError(RELOAD_FAILED) with the validator's one line."""
    done = run_child([sys.executable, "-m", "hotswap.protocol.store", "validate", str(path)],
                     timeout, stop, what=f"validating {path}")
    if done.returncode == 0:
        return store.StoreInfo(**json.loads(done.stdout))
    if done.returncode < 0:
        reason = f"the validator died of signal {-done.returncode} (a corrupt store)"
    else:
        reason = (done.stderr.strip().splitlines() or ["no detail"])[-1]
    raise HotswapError(f"store refused: {reason}", ExitCode.RELOAD_FAILED)


def preflight(cfg: Config) -> tuple[list[int], dict[int, store.WorkerReport]]:
    masters = find_masters(cfg)
    if not masters.live:
        raise HotswapError(f"nothing is running: no master reads {cfg.fifo_live}",
                           ExitCode.NOT_RUNNING)
    if masters.parked or masters.loading:
        raise HotswapError("a swap was interrupted (a master is parked or loading); "
                           "run `hotswap recover` first", ExitCode.INCONSISTENT)
    pids = live_workers(cfg)
    reports = store.read_reports(cfg.run_dir, pids)
    if not pids or len(reports) < len(pids):
        raise HotswapError("the service is not in store mode (no store report from worker "
                           f"{', '.join(str(p) for p in pids if p not in reports) or '?'}); "
                           "a heap-mode release needs `hotswap reload`", ExitCode.CONFIG)
    return pids, reports


@contextmanager
def noting_interrupts(noted: list[str]) -> Iterator[None]:
    """SIGINT and SIGTERM are only noted (each step reads `noted`); the handlers go back
    after. A signal must never cut the refresh between two of its acts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, lambda sig, _frame: noted.append(signal.Signals(sig).name))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def refresh(cfg: Config, path: str, timeout: float, show: Show) -> RefreshResult:
    """One refresh under the reload lock, its outcome counted in the metrics (metrics.py)."""
    target = Path(path).absolute()
    if not target.is_file():
        raise HotswapError(f"no store at {target}", ExitCode.CONFIG)
    with reload_lock(cfg, "refresh"):
        host, started_at = RealHost(cfg), time.monotonic()
        try:
            result = _locked(cfg, target, timeout, show)
        except HotswapError:
            metrics.count(cfg, host, "refreshes", "refused", time.monotonic() - started_at)
            raise
        # refused: validation or the app check said no, before the pointer moved
        refused = not result.ok and not result.new_version and not result.interrupted
        metrics.count(cfg, host, "refreshes", metrics.outcome(
            result.ok, result.exit_code, result.interrupted, refused), result.seconds,
            result.switch_seconds if result.ok else None)
    return result


def _locked(cfg: Config, target: Path, timeout: float, show: Show) -> RefreshResult:
    """The refresh itself; the caller holds the reload lock."""
    started = time.monotonic()

    def at() -> float:
        return time.monotonic() - started

    noted: list[str] = []
    with noting_interrupts(noted):
        for action in repair_switch(cfg):
            show("preflight", at(), f"repaired: {action}")
        pids, before = preflight(cfg)
        old = next(iter(before.values()))
        show("preflight", at(), f"{len(pids)} workers serve store {old.version} "
             f"({old.path})")
        master = find_masters(cfg).live  # a /proc scan: not inside the timed switch
        try:
            show("validating", at(), str(target))
            info = validate_in_child(target, timeout, lambda: bool(noted))
            show("validated", at(), f"version {info.version}, {info.entries} entries, "
                 f"{info.size_bytes / 1e6:.1f} MB, sha256 {info.sha256[:12]} in "
                 f"{info.validate_seconds:.2f}s")
            show("checking", at(), f"the app's import and smoke checks against it, in a "
                 f"child with master {master}'s environment")
            checking = time.monotonic()
            check_app(cfg, info.path, master, timeout, lambda: bool(noted))
            show("checked", at(), f"the app imported it and passed its smoke checks in "
                 f"{time.monotonic() - checking:.2f}s")
            if noted:
                raise HotswapError(f"interrupted by {noted[0]} before the switch",
                                   ExitCode.RELOAD_FAILED)
        except HotswapError as error:
            show("refused", at(), f"{error.message}; {old.version} still serves")
            return RefreshResult(False, int(error.code), f"{error.message}; store "
                                 f"{old.version} still serves", at(), old.version,
                                 interrupted=noted[0] if noted else None)
        record = StoreSwitch(Phase.SWITCHING, old.pointer, old.path, old.version, old.sha256,
                             info.path, info.version, info.sha256, os.getpid(), time.time())
        record.write(cfg.run_dir)  # before the pointer moves: a kill from here is undone
        store.point(old.pointer, info.path)
        signalled = signal_switch(cfg)
        show("switching", at(), f"{old.pointer} -> {os.path.basename(info.path)}; "
             f"signalled the workers of master {master}")
        reports = wait_switched(cfg, info.path, info.sha256, timeout, lambda: bool(noted))
        if reports is None:
            return roll_back(cfg, record, noted, at, timeout, show)
        switch_seconds = time.monotonic() - signalled
        record = record.to(Phase.COMMITTED)
        record.write(cfg.run_dir)  # the commit point: from here the refresh finishes
        finish(cfg, record)
        signalled_wall = time.time() - (time.monotonic() - signalled)
        workers = [WorkerSwitch(pid, before[pid].version if pid in before else "(new)",
                                r.version, round(max(0.0, r.opened_at - signalled_wall)
                                                 * 1000, 1))
                   for pid, r in sorted(reports.items())]
        show("done", at(), f"{len(workers)}/{len(workers)} workers serve {info.version}"
             + (f" (committed before {noted[0]} arrived)" if noted else ""))
    return RefreshResult(True, ExitCode.OK, f"store {old.version} -> {info.version} on "
                         f"{len(workers)} workers", at(), old.version, info.version,
                         info.validate_seconds, round(switch_seconds, 4), workers,
                         noted[0] if noted else None)


def roll_back(cfg: Config, record: StoreSwitch, noted: list[str], at: Callable[[], float],
              timeout: float, show: Show) -> RefreshResult:
    if noted:
        cause = f"interrupted by {noted[0]} before the commit point"
    else:
        pids = live_workers(cfg)
        reports = store.read_reports(cfg.run_dir, pids)
        stuck = [p for p in pids if p not in reports or reports[p].path != record.new_path]
        cause = (f"worker {', '.join(map(str, stuck))} did not switch to "
                 f"{record.new_version} within {timeout:g}s")
    show("rolling-back", at(), f"{cause}; pointing back to {record.old_version}")
    back = switch_back(cfg, record, timeout)
    message = f"{cause}; " + (f"store {record.old_version} serves again" if back else
                              "the workers may serve mixed versions: `hotswap recover`")
    show("failed", at(), message)
    code = (ExitCode.RELOAD_FAILED if noted else ExitCode.TIMEOUT) if back \
        else ExitCode.INCONSISTENT
    return RefreshResult(False, int(code), message, at(), record.old_version,
                         record.new_version, interrupted=noted[0] if noted else None)

def record(cfg: Config, result: RefreshResult) -> None:
    """Kept beside last-reload.json for `status` and post-mortems."""
    document = {**result.to_json(), "finished_at": files.iso_time()}
    files.atomic_write(cfg.run_dir / "last-refresh.json", json.dumps(document),
                       owner_of=cfg.run_dir)
