"""The running instance as a whole: is it up, clearing stale files, stop, status, recover."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

from . import fifo, probe, procs, stats
from .config import Config
from .errors import ExitCode, HotswapError
from .reload import lock_holder, reload_lock, running_master


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
    master = running_master(cfg)
    if master:
        raise HotswapError(f"already running: master {master} ({cfg.pidfile})", ExitCode.BUSY)
    for path in (cfg.fifo_live, cfg.fifo_standby):
        if fifo.state(path) is fifo.FifoState.LISTENING:
            raise HotswapError(
                f"already running: a master reads {path} (pidfile {cfg.pidfile} is stale)",
                ExitCode.BUSY,
            )
    if socket_accepts(cfg.http_socket):
        raise HotswapError(
            f"something already accepts connections on {cfg.http_socket}", ExitCode.BUSY
        )


def clear_stale_files(cfg: Config) -> list[Path]:
    """Remove what a dead instance left behind; call only after ensure_not_running()."""
    removed = []
    for path in (cfg.fifo_live, cfg.fifo_standby):
        if fifo.remove_if_stale(path):
            removed.append(path)
    for path in (cfg.http_socket, cfg.stats_socket, cfg.pidfile, cfg.handover_file):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def prepare_start(cfg: Config) -> list[Path]:
    for folder in (cfg.run_dir, cfg.log_file.parent):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise HotswapError(
                f"cannot create {folder}: permission denied", ExitCode.CONFIG
            ) from None
    if not os.access(cfg.run_dir, os.W_OK):
        raise HotswapError(f"cannot write to {cfg.run_dir}: permission denied", ExitCode.CONFIG)
    ensure_not_running(cfg)
    return clear_stale_files(cfg)


def stop(cfg: Config, timeout: float) -> int:
    """Graceful stop: "q" to the master; in-flight requests finish; files are cleaned.

    Returns the pid that was stopped."""
    master = running_master(cfg)
    if not master:
        raise HotswapError(
            f"nothing is running: no live master in {cfg.pidfile}", ExitCode.NOT_RUNNING
        )
    with reload_lock(cfg, "stop"):
        try:
            fifo.send(cfg.fifo_live, "q")
        except fifo.NoReader:
            # Not on its FIFO (a swap was interrupted?): SIGINT is uWSGI's "stop now".
            procs.signal_quietly(master, 2)
        # A master parked on the standby FIFO (interrupted swap) must go too.
        try:
            fifo.send(cfg.fifo_standby, "q")
        except fifo.NoReader:
            pass
        if not procs.wait_until(lambda: not procs.alive(master), timeout, interval=0.05):
            raise HotswapError(
                f"master {master} is still draining after {timeout:g}s", ExitCode.TIMEOUT
            )
    clear_stale_files(cfg)
    return master


def recover(cfg: Config) -> str:
    """Repair the FIFO slots after an interrupted swap. Returns what it did."""
    with reload_lock(cfg, "recover"):
        live = fifo.state(cfg.fifo_live)
        standby = fifo.state(cfg.fifo_standby)
        if standby is not fifo.FifoState.LISTENING:
            removed = fifo.remove_if_stale(cfg.fifo_standby)
            return "nothing to recover" + (" (removed a stale standby FIFO)" if removed else "")
        if live is fifo.FifoState.LISTENING:
            # Two generations: the parked one was on its way out; finish retiring it.
            fifo.send(cfg.fifo_standby, "q")
            return "retired the master parked on the standby FIFO"
        fifo.move_to_live(cfg.fifo_standby, cfg.fifo_live, 10.0)
        return "moved the parked master back to the live FIFO"


def status(cfg: Config) -> dict:
    master = running_master(cfg)
    health = probe.healthz(cfg.http_socket, timeout=2.0) if master else None
    document = stats.read(cfg.stats_socket) if master else None
    try:
        last_reload = json.loads(cfg.last_reload_file.read_text())
    except (FileNotFoundError, ValueError):
        last_reload = None
    except OSError as exc:
        if exc.errno != errno.EACCES:
            raise
        last_reload = None
    return {
        "running": bool(master),
        "master_pid": master,
        "generation": health.get("generation") if health else None,
        "health": health,
        "workers": stats.workers(document) if document else [],
        "fifos": {
            "live": {"path": str(cfg.fifo_live), "state": fifo.state(cfg.fifo_live).value},
            "standby": {"path": str(cfg.fifo_standby), "state": fifo.state(cfg.fifo_standby).value},
        },
        "socket": str(cfg.http_socket.absolute()),
        "stats_socket": str(cfg.stats_socket.absolute()),
        "pidfile": str(cfg.pidfile.absolute()),
        "log_file": str(cfg.log_file.absolute()),
        "reload_in_progress": lock_holder(cfg),
        "last_reload": last_reload,
    }
