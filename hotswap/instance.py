"""The running instance as a whole: which masters exist, stale files, stop, status, recover.

An instance can hold up to three kinds of uWSGI master at once:
- live:    reads the live FIFO (slot 0) and serves;
- parked:  reads the standby FIFO (slot 1): an old master retiring after a swap, or one
           stranded there by an interrupted swap;
- loading: re-forked by one of them ("f"), still importing the release, not yet handed over.
Masters are recognised by the FIFO they hold open (from /proc), never by a pid alone: a
pidfile can be stale, and its pid reused by another process, even another uWSGI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from . import fifo, files, probe, procs, stats, store
from .config import Config
from .errors import ExitCode, HotswapError
from .lock import hold_instance_lock, holder, reload_lock

KILL_TIMEOUT = 10.0


@dataclass(frozen=True)
class Masters:
    live: int | None = None
    parked: int | None = None
    loading: list[int] = field(default_factory=list)

    @property
    def all(self) -> list[int]:
        return [pid for pid in (self.live, self.parked, *self.loading) if pid]


def handover_record(cfg: Config) -> dict:
    """The last accepting hook's record (see handover.py), or {}."""
    try:
        return json.loads(cfg.handover_file.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def handed_over(cfg: Config, master: int | None) -> dict | None:
    record = handover_record(cfg)
    if master and record.get("master_pid") == master and record.get("phase") == "done":
        return record
    return None


def find_masters(cfg: Config) -> Masters:
    pids = procs.all_pids()
    live = fifo.readers(cfg.fifo_live, pids)
    parked = fifo.readers(cfg.fifo_standby, pids)
    reforked = {
        child for parent in {*live, *parked} for child in procs.session_leaders_below(parent)
    }
    # A re-forked master that has not handed over is still loading, even if it already
    # holds the live FIFO (it creates it before importing the app).
    loading = sorted(pid for pid in reforked if not handed_over(cfg, pid))
    serving = [pid for pid in live if pid not in loading]
    return Masters(
        live=serving[0] if serving else None,
        parked=parked[0] if parked else None,
        loading=loading,
    )


def kill_loading(masters: list[int]) -> None:
    """SIGKILL masters that never served, with their process groups (a re-forked master
    leads its own group, its workers included)."""
    for pid in masters:
        procs.kill_group(pid, signal.SIGKILL)
        procs.signal_quietly(pid, signal.SIGKILL)
    procs.wait_until(lambda: not any(procs.alive(p) for p in masters), KILL_TIMEOUT)


def socket_accepts(path: Path) -> bool:
    """True if something accepts connections on the unix socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
            return True
        except OSError:
            return False


def ensure_not_running(cfg: Config) -> None:
    """Refuse to start over a live instance, whatever evidence it left."""
    masters = find_masters(cfg)
    if masters.all:
        raise HotswapError(
            f"already running: master {masters.all[0]} holds a FIFO in {cfg.run_dir}",
            ExitCode.BUSY,
        )
    if socket_accepts(cfg.http_socket):
        raise HotswapError(
            f"already running: something accepts connections on {cfg.http_socket}",
            ExitCode.BUSY,
        )


def clear_stale_files(cfg: Config) -> list[Path]:
    """Remove what a dead instance left behind; call only after ensure_not_running()."""
    removed = [path for path in (cfg.fifo_live, cfg.fifo_standby) if fifo.remove_if_stale(path)]
    for path in (cfg.http_socket, cfg.stats_socket, cfg.pidfile, cfg.handover_file):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def prepare_start(cfg: Config) -> tuple[int, list[Path]]:
    """Create the folders, refuse a live (or starting) instance, clear a dead one's files.

    Returns the instance lock's fd, for uWSGI to inherit, and the files removed."""
    for folder in (cfg.run_dir, cfg.log_file.parent):
        folder.mkdir(parents=True, exist_ok=True)
    if not os.access(cfg.run_dir, os.W_OK):
        raise HotswapError(f"cannot write to {cfg.run_dir}: permission denied", ExitCode.CONFIG)
    ensure_not_running(cfg)  # names the running master, in the common case
    lock_fd = hold_instance_lock(cfg)  # closes the race between two starts
    return lock_fd, clear_stale_files(cfg)


def stop(cfg: Config, timeout: float) -> list[int]:
    """Graceful stop of every master of the instance; returns their pids.

    Serving masters get "q" (in-flight requests finish); a master still loading a release
    serves nothing and is killed. Files are cleaned once all are gone."""
    with reload_lock(cfg, "stop"):
        masters = find_masters(cfg)
        if not masters.all:
            raise HotswapError(
                f"nothing is running: no master reads a FIFO in {cfg.run_dir}",
                ExitCode.NOT_RUNNING,
            )
        kill_loading(masters.loading)
        for pid, path in ((masters.parked, cfg.fifo_standby), (masters.live, cfg.fifo_live)):
            if pid:
                try:
                    fifo.send(path, "q")
                except fifo.NoReader:
                    # no FIFO to reach it: SIGTERM (with die-on-term, a brutal shutdown)
                    procs.signal_quietly(pid, signal.SIGTERM)
        serving = [pid for pid in (masters.parked, masters.live) if pid]
        if not procs.wait_until(
            lambda: not any(procs.alive(p) for p in serving), timeout, interval=0.05
        ):
            raise HotswapError(
                f"master {', '.join(map(str, serving))} still draining after {timeout:g}s",
                ExitCode.TIMEOUT,
            )
    clear_stale_files(cfg)
    return [*serving, *masters.loading]


def recover(cfg: Config) -> str:
    """Repair the instance after an interrupted swap (e.g. `hotswap reload` SIGKILLed):
    a master left loading is killed, a parked master is retired if another serves, or moved
    back to the live FIFO if none does. Returns what it did."""
    with reload_lock(cfg, "recover"):
        masters = find_masters(cfg)
        done = []
        if masters.loading:
            kill_loading(masters.loading)
            done.append(f"killed master {', '.join(map(str, masters.loading))} (still loading)")
        if masters.parked and masters.live:
            fifo.send(cfg.fifo_standby, "q")
            done.append(f"retired master {masters.parked}, parked on the standby FIFO")
        elif masters.parked:
            parked = masters.parked
            if not fifo.move_to_live(parked, cfg.fifo_standby, cfg.fifo_live, KILL_TIMEOUT):
                raise HotswapError(
                    f"master {parked} did not take {cfg.fifo_live} back", ExitCode.INCONSISTENT
                )
            files.atomic_write(cfg.pidfile, f"{masters.parked}\n", owner_of=cfg.run_dir)
            done.append(f"moved master {masters.parked} back to the live FIFO")
        elif fifo.remove_if_stale(cfg.fifo_standby):
            done.append("removed a stale standby FIFO")
        return "; ".join(done) or "nothing to recover"


def status(cfg: Config) -> dict:
    masters = find_masters(cfg)
    master = masters.live
    health = probe.healthz(cfg.http_socket, timeout=2.0) if master else None
    document = stats.read(cfg.stats_socket) if master else None
    try:
        last_reload = json.loads(cfg.last_reload_file.read_text())
    except (OSError, ValueError):
        last_reload = None
    fifo_states = {
        "live": fifo.FifoState.LISTENING if master else fifo.state(cfg.fifo_live),
        "standby": fifo.FifoState.LISTENING if masters.parked else fifo.state(cfg.fifo_standby),
    }
    return {
        "running": bool(master),
        "master_pid": master,
        "parked_master_pid": masters.parked,
        "loading_master_pids": masters.loading,
        "generation": health.get("generation") if health else None,
        "health": health,
        # each worker's own report of the store it maps (None in heap mode)
        "workers": store.annotate_workers(cfg.run_dir, stats.workers(document))
        if document else [],
        "fifos": {
            name: {"path": str(path), "state": fifo_states[name].value}
            for name, path in (("live", cfg.fifo_live), ("standby", cfg.fifo_standby))
        },
        "socket": str(cfg.http_socket.absolute()),
        "stats_socket": str(cfg.stats_socket.absolute()),
        "pidfile": str(cfg.pidfile.absolute()),
        "log_file": str(cfg.log_file.absolute()),
        "reload_in_progress": holder(cfg),
        "last_reload": last_reload,
    }
