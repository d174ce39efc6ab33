"""Switching the workers of the live master from one store to another, and undoing or finishing
a switch that a killed refresh left (hotswap/protocol/store_record.py says which).

`hotswap refresh` (releases/refresh.py) drives a switch; `recover` and the next `refresh` or
`reload` call repair_switch() under the reload lock, so whoever wrote an unfinished record is
gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import Config
from ..inside.live_store import SWITCH_FILE
from ..protocol import store, store_state
from ..protocol.store_record import Phase, StoreSwitch
from ..system import procs, stats
from . import probe

# An idle worker waiting for uWSGI's thunder lock (srv.ini: thunder-lock) cannot read its
# signal until the lock holder lets go, which an idle holder only does after a request: while
# some worker has not reported, a health request every NUDGE_INTERVAL moves the lock on.
NUDGE_INTERVAL = 0.01
# Reading the stats socket costs the master work; the worker set changes rarely.
STATS_INTERVAL = 0.1
REPAIR_TIMEOUT = 30.0


def live_workers(cfg: Config) -> list[int]:
    document = stats.read(cfg.stats_socket)
    return [w["pid"] for w in stats.workers(document or {}) if w.get("pid")]


def signal_switch(cfg: Config) -> float:
    """Modify the watched file in place (a rename would end the master's inotify watch)."""
    with open(cfg.run_dir / SWITCH_FILE, "w") as handle:
        handle.write(f"{time.time()}\n")
    return time.monotonic()


def wait_switched(cfg: Config, path: str, sha256: str, timeout: float,
                  stop: Callable[[], bool] = lambda: False
                  ) -> dict[int, store.WorkerReport] | None:
    """Every worker's report once all name the store at `path` (asked of each pid), else
    None (at the deadline, or as soon as `stop()` says so)."""
    last_nudge = last_stats = time.monotonic()
    pids = live_workers(cfg)

    def switched(of: list[int]) -> bool:
        reports = store.read_reports(cfg.run_dir, of)
        return bool(of) and len(reports) == len(of) and all(
            r.sha256 == sha256 and r.path == path for r in reports.values())

    def all_switched() -> dict[int, store.WorkerReport] | bool | None:
        nonlocal last_nudge, last_stats, pids
        if stop():
            return True
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

    found = procs.wait_until(all_switched, timeout, interval=0.002)
    return found if isinstance(found, dict) else None


def switch_back(cfg: Config, record: StoreSwitch, timeout: float) -> bool:
    """Before the commit point: the pointer names the old store again and every worker
    serves it. True once they all report it."""
    record = record.to(Phase.ROLLING_BACK)
    record.write(cfg.run_dir)
    store.point(record.pointer, record.old_path)
    signal_switch(cfg)
    # no worker (nothing runs): the pointer is all there is to put back
    back = wait_switched(cfg, record.old_path, record.old_sha256, timeout) \
        if live_workers(cfg) else {}
    if back is not None:
        record.to(Phase.ROLLED_BACK).write(cfg.run_dir)
    return back is not None


def finish(cfg: Config, record: StoreSwitch) -> None:
    """From the commit point: what is left of the refresh, safe to repeat."""
    store_state.remember_good(cfg.run_dir, store_state.Mark.of(
        record.new_path, record.new_version, record.new_sha256))
    store_state.clear_fallback(cfg.run_dir)  # the pointer names a good store again
    store.remove_dead_reports(cfg.run_dir)
    record.to(Phase.DONE).write(cfg.run_dir)


def repair_switch(cfg: Config, timeout: float = REPAIR_TIMEOUT) -> list[str]:
    """Undo (before its commit point) or finish (after it) a refresh that was killed; the
    caller holds the reload lock. Returns what it did."""
    record = StoreSwitch.read(cfg.run_dir)
    if record is None or not record.orphaned:
        return []
    if record.phase is Phase.COMMITTED:
        finish(cfg, record)
        return [f"finished the refresh to store {record.new_version} (pid {record.pid} was "
                "killed after its commit point)"]
    if switch_back(cfg, record, timeout):
        return [f"rolled back the refresh to store {record.new_version} (pid {record.pid} "
                f"was killed before its commit point): every worker serves "
                f"{record.old_version} again"]
    return [f"pointed back to store {record.old_version} after a killed refresh, but not "
            f"every worker reported it within {timeout:g}s; run `hotswap recover` again"]
