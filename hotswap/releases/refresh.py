"""`hotswap refresh STORE`: a data-only release, without new processes.

1. preflight: a live master, no swap in progress (the reload lock: a refresh and a reload
   exclude each other), every worker in store mode (each has a report, hotswap/protocol/store.py);
2. validate the named store once, in a child process (a store bad enough to crash LMDB kills
   the child, not the CLI), before any worker sees it; a bad store changes nothing;
3. point the workers' pointer (data/store/current) at it, so a later reload or restart
   serves the same data, then write `<run_dir>/store.switch`: the master's file monitor
   raises a uWSGI signal in every worker, which switches between two requests
   (hotswap/inside/live_store.py);
4. wait until every worker of the live master reports the new store (each worker writes its
   own report; none is inferred from another). Past --timeout, the pointer goes back and the
   workers are switched back (exit 5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import Config
from ..errors import ExitCode, HotswapError
from ..inside.live_store import SWITCH_FILE
from ..protocol import store
from ..service.instance import find_masters
from ..swap import probe
from ..swap.lock import reload_lock
from ..system import files, procs, stats

# An idle worker waiting for uWSGI's thunder lock (srv.ini: thunder-lock) cannot read its
# signal until the lock holder lets go, which an idle holder only does after a request: while
# some worker has not reported, a health request every NUDGE_INTERVAL moves the lock on.
NUDGE_INTERVAL = 0.01
# Reading the stats socket costs the master work; the worker set changes rarely.
STATS_INTERVAL = 0.1

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

    def to_json(self) -> dict:
        return asdict(self)


def validate_in_child(path: Path, timeout: float) -> store.StoreInfo:
    """StoreInfo of `path`, or HotswapError(RELOAD_FAILED) with the validator's one line."""
    try:
        done = subprocess.run([sys.executable, "-m", "hotswap.protocol.store", "validate",
                               str(path)], capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise HotswapError(f"validating {path} took over {timeout:g}s",
                           ExitCode.TIMEOUT) from None
    if done.returncode == 0:
        return store.StoreInfo(**json.loads(done.stdout))
    if done.returncode < 0:
        reason = f"the validator died of signal {-done.returncode} (a corrupt store)"
    else:
        reason = (done.stderr.strip().splitlines() or ["no detail"])[-1]
    raise HotswapError(f"store refused: {reason}", ExitCode.RELOAD_FAILED)


def live_workers(cfg: Config) -> list[int]:
    document = stats.read(cfg.stats_socket)
    return [w["pid"] for w in stats.workers(document or {}) if w.get("pid")]


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


def signal_switch(cfg: Config) -> float:
    """Modify the watched file in place (a rename would end the master's inotify watch)."""
    with open(cfg.run_dir / SWITCH_FILE, "w") as handle:
        handle.write(f"{time.time()}\n")
    return time.monotonic()


def wait_switched(cfg: Config, info: store.StoreInfo, timeout: float
                  ) -> dict[int, store.WorkerReport] | None:
    """Every worker's report once all name `info`'s store (asked of each pid), else None."""
    last_nudge = last_stats = time.monotonic()
    pids = live_workers(cfg)

    def switched(of: list[int]) -> bool:
        reports = store.read_reports(cfg.run_dir, of)
        return bool(of) and len(reports) == len(of) and all(
            r.sha256 == info.sha256 and r.path == info.path for r in reports.values())

    def all_switched() -> dict[int, store.WorkerReport] | None:
        nonlocal last_nudge, last_stats, pids
        if time.monotonic() - last_stats > STATS_INTERVAL:
            pids, last_stats = live_workers(cfg), time.monotonic()
        if switched(pids):
            pids, last_stats = live_workers(cfg), time.monotonic()  # exact: ask again
            if switched(pids):
                return store.read_reports(cfg.run_dir, pids)
        if time.monotonic() - last_nudge > NUDGE_INTERVAL:
            probe.healthz(cfg.socket, timeout=1.0, path=cfg.health_path)
            last_nudge = time.monotonic()
        return None

    return procs.wait_until(all_switched, timeout, interval=0.002)


def refresh(cfg: Config, path: str, timeout: float, show: Show) -> RefreshResult:
    started = time.monotonic()

    def at() -> float:
        return time.monotonic() - started

    target = Path(path).absolute()
    if not target.is_file():
        raise HotswapError(f"no store at {target}", ExitCode.CONFIG)
    with reload_lock(cfg, "refresh"):
        pids, before = preflight(cfg)
        old = next(iter(before.values()))
        show("preflight", at(), f"{len(pids)} workers serve store {old.version} "
             f"({old.path})")
        show("validating", at(), str(target))
        try:
            info = validate_in_child(target, timeout)
        except HotswapError as error:
            show("refused", at(), f"{error.message}; {old.version} still serves")
            return RefreshResult(False, int(error.code), f"{error.message}; store "
                                 f"{old.version} still serves", at(), old.version)
        show("validated", at(), f"version {info.version}, {info.entries} entries, "
             f"{info.size_bytes / 1e6:.1f} MB, sha256 {info.sha256[:12]} in "
             f"{info.validate_seconds:.2f}s")
        master = find_masters(cfg).live  # a /proc scan: not inside the timed switch
        store.point(old.pointer, info.path)
        signalled = signal_switch(cfg)
        show("switching", at(), f"{old.pointer} -> {os.path.basename(info.path)}; "
             f"signalled the workers of master {master}")
        reports = wait_switched(cfg, info, timeout)
        if reports is None:
            return roll_back(cfg, old, info, at, timeout, show)
        switch_seconds = time.monotonic() - signalled
        signalled_wall = time.time() - switch_seconds
        workers = [WorkerSwitch(pid, before[pid].version if pid in before else "(new)",
                                r.version, round(max(0.0, r.opened_at - signalled_wall)
                                                 * 1000, 1))
                   for pid, r in sorted(reports.items())]
        store.remove_dead_reports(cfg.run_dir)
        show("done", at(), f"{len(workers)}/{len(workers)} workers serve {info.version}")
    return RefreshResult(True, ExitCode.OK, f"store {old.version} -> {info.version} on "
                         f"{len(workers)} workers", at(), old.version, info.version,
                         info.validate_seconds, round(switch_seconds, 4), workers)


def roll_back(cfg: Config, old: store.WorkerReport, info: store.StoreInfo,
              at: Callable[[], float], timeout: float, show: Show) -> RefreshResult:
    pids = live_workers(cfg)
    reports = store.read_reports(cfg.run_dir, pids)
    stuck = [p for p in pids if p not in reports or reports[p].sha256 != info.sha256]
    show("rolling-back", at(), f"worker {', '.join(map(str, stuck))} did not switch "
         f"within {timeout:g}s; pointing back to {old.version}")
    store.point(old.pointer, old.path)
    signal_switch(cfg)
    old_info = store.StoreInfo(old.path, old.version, 0, old.sha256, 0, 0.0)
    back = wait_switched(cfg, old_info, timeout)
    message = (f"worker {', '.join(map(str, stuck))} did not switch to {info.version} "
               f"within {timeout:g}s; " + (f"store {old.version} serves again" if back
                                           else "the workers may serve mixed versions"))
    show("failed", at(), message)
    return RefreshResult(False, int(ExitCode.TIMEOUT if back else ExitCode.INCONSISTENT),
                         message, at(), old.version, info.version, info.validate_seconds)


def record(cfg: Config, result: RefreshResult) -> None:
    """Kept beside last-reload.json for `status` and post-mortems."""
    document = {**result.to_json(), "finished_at": files.iso_time()}
    files.atomic_write(cfg.run_dir / "last-refresh.json", json.dumps(document),
                       owner_of=cfg.run_dir)
