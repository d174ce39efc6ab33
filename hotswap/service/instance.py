"""The running instance as a whole: start's checks, stop, status, recover.

Which masters exist, and how a swap is undone or finished, is host.py's and repair.py's.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

from ..config import Config
from ..errors import ExitCode, HotswapError
from ..inside import handover
from ..protocol import fifo, record, store, store_record, store_state
from ..protocol.endpoint import Endpoint
from ..swap import drift, probe
from ..swap.host import Host, RealHost, Slot
from ..swap.lock import hold_instance_lock, holder, reload_lock
from ..swap.repair import abort_generation, reattach_fifos, repair
from ..swap.store_repair import repair_store, store_problems
from ..system import activation, files, memory, priority, procs, stats


def find_masters(cfg: Config):
    return RealHost(cfg).masters()


def socket_accepts(path: Path | Endpoint) -> bool:
    """True if something accepts connections on the socket (a unix path, or an Endpoint)."""
    return probe.endpoint_of(path).accepts()


def ensure_not_running(cfg: Config, activated: tuple[str, ...] = ()) -> None:
    """Refuse to start over a live instance, whatever evidence it left. An `activated`
    address (a socket systemd passed in) accepts with no uWSGI behind it: the kernel queues
    the connection for whoever serves next, so it is no evidence."""
    host = RealHost(cfg)
    masters = host.masters()
    if masters.all:
        lost = host.detached()
        hint = (f" ({lost[0].path} was removed; `hotswap recover` re-creates it)" if lost
                else "")
        raise HotswapError(
            f"already running: master {masters.all[0]} holds a FIFO in {cfg.run_dir}{hint}",
            ExitCode.BUSY,
        )
    for where in cfg.sockets:
        if where.address not in activated and where.accepts():
            raise HotswapError(
                f"already running: something accepts connections on {where.address} (the "
                f"ini's {where.key}); stop it first, or give this instance another address",
                ExitCode.BUSY,
            )


def clear_stale_files(cfg: Config, activated: tuple[str, ...] = ()) -> list[Path]:
    """Remove what a dead instance left behind; call only after ensure_not_running().
    An activated socket's file is systemd's, live, and stays."""
    removed = [path for path in (cfg.fifo_live, cfg.fifo_standby) if fifo.remove_if_stale(path)]
    store.remove_dead_reports(cfg.run_dir)  # one per worker that ever mapped a store
    # a TCP port leaves no file
    unix = [where.path for where in cfg.sockets if where.path and where.address not in activated]
    # a refresh killed before a stop, a fallback: no worker is left to agree with, and the
    # new master validates whatever the pointer names
    for path in (*unix, cfg.stats_socket, cfg.pidfile,
                 cfg.run_dir / record.RECORD_NAME, cfg.run_dir / store_record.RECORD_NAME,
                 cfg.run_dir / store_state.FALLBACK_NAME):
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
    activated = tuple(activation.activated_addresses())  # systemd's hotswap.socket, if any
    ensure_not_running(cfg, activated)  # names the running master, in the common case
    lock_fd = hold_instance_lock(cfg)  # closes the race between two starts
    removed = clear_stale_files(cfg, activated)
    drift.record_start(cfg, activated)
    # what each generation returns to once it serves: its OOM score, its priority
    memory.remember_normal_score(cfg.run_dir)
    priority.remember_normal(cfg.run_dir)
    return lock_fd, removed


def stop(cfg: Config, timeout: float) -> list[int]:
    """Graceful stop of every master of the instance; returns their pids.

    The live master is paused, then gets "q" (quit_paused: in-flight requests finish, no
    just-accepted connection is reset), a parked one "q"; a generation still loading serves
    nothing and is rolled back first (repair.py), unless its hand-over had committed, in
    which case it serves and is stopped like the others. Files are cleaned once all are gone.
    """
    # systemd's socket stays, queued connections and all, for the next start
    activated = (cfg.socket.address,) if drift.socket_activated(cfg) else ()
    with reload_lock(cfg, "stop"):
        stopping, serving = begin_stop(cfg)
        if not procs.wait_gone(serving, timeout):
            raise HotswapError(
                f"master {', '.join(map(str, serving))} still draining after {timeout:g}s",
                ExitCode.TIMEOUT,
            )
    clear_stale_files(cfg, activated)
    return stopping


def begin_stop(cfg: Config) -> tuple[list[int], list[int]]:
    """The non-blocking half of stop (the caller holds the reload lock): roll back what is
    loading, "p" then "q" to what serves. Returns (every master, the serving ones to wait for)."""
    host = RealHost(cfg)
    masters = host.masters()
    if not masters.all:
        raise HotswapError(
            f"nothing is running: no master reads a FIFO in {cfg.run_dir}", ExitCode.NOT_RUNNING
        )
    reattach_fifos(host)  # "q" must reach a master whose FIFO path was removed
    for pid in masters.loading:
        abort_generation(host, pid, masters.parked, "the instance is stopping")
    after = host.masters()
    if after.parked:  # a retiring or stranded master: its own swap already paused it, or not
        try:
            fifo.send(cfg.fifo_standby, "q")
        except fifo.NoReader:
            # no FIFO to reach it: SIGTERM (with die-on-term, a brutal shutdown)
            procs.signal_quietly(after.parked, signal.SIGTERM)
    if after.live:
        paths = handover.Paths(cfg.run_dir, cfg.fifo_standby, cfg.pidfile, cfg.log_file)
        quit_paused(host, Slot.LIVE, after.live,
                    lambda pid, mark: handover.pause_workers_wait(paths, pid, mark))
    serving = [pid for pid in (after.parked, after.live) if pid]
    return sorted({*serving, *masters.all}), serving


def quit_paused(host: Host, slot: Slot, master: int,
                wait_parked: Callable[[int, int], str]) -> str | None:
    """"p", wait until the master's idle workers are parked, then "q"; returns "n/m" parked.

    A bare "q" resets a connection now and then (a worker that has just accept()ed exits on
    the SIGHUP: docs/how-a-swap-works.md); paused first, no worker holds an unanswered one.
    From "p" to "q" nobody accepts, so "q" follows whatever happens in between: SIGINT and
    SIGTERM wait until it is sent (at most pause_workers_wait's 2.25 s), and a failed wait
    still sends it. A stop never leaves a paused master serving nothing."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        mark = host.log_mark()
        try:
            host.send(slot, "p")
        except fifo.NoReader:
            host.signal(master, signal.SIGTERM)  # no FIFO reaches it: with die-on-term, brutal
            return None
        try:
            return wait_parked(master, mark)
        finally:
            try:
                host.send(slot, "q")
            except fifo.NoReader:
                host.signal(master, signal.SIGTERM)  # paused, and unreachable: stop it anyway
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def recover(cfg: Config) -> str:
    """Repair the instance after an interrupted swap (e.g. `hotswap reload` SIGKILLed): a
    generation left loading is rolled back (or, if its hand-over had committed, finished), a
    parked master is retired if another serves, or moved back to the live FIFO if none does;
    after a store fallback, `current` is pointed at the store the workers fell back to.
    Returns what it did."""
    with reload_lock(cfg, "recover"):
        report = repair(RealHost(cfg))
        store_actions = repair_store(cfg)
    lines = [*report.actions, *store_actions, *(f"warning: {w}" for w in report.warnings)]
    if report.draining:
        lines.append(f"old master {report.draining} is draining its in-flight requests and "
                     "exits on its own")
    return "; ".join(lines) or "nothing to recover"


def status(cfg: Config) -> dict:
    cfg = drift.as_started(cfg)  # an edited socket line is a notice, not an outage
    host = RealHost(cfg)
    masters = host.masters()
    handover = record.read(cfg.run_dir)
    # While a swap loads, the old master has moved to the standby FIFO and its workers still
    # serve: that master serves, and the instance is swapping, not stopped. (Without a
    # reload holding the lock, the same pair is a swap left by a killed one: `recover`.)
    parked_alone = masters.live is None and bool(masters.parked)
    swapping = parked_alone and holder(cfg) is not None
    # A parked master with no swap under way was left by an interrupted one (a killed
    # reload, a rollback on a full disk): its workers still serve, so it runs, wrongly.
    stranded = parked_alone and not swapping
    master = masters.live or masters.parked
    # what a reload would need, and whether it fits (memory.py)
    room = host.memory_room(master, memory.DEFAULT_MARGIN_PERCENT) if master else None
    health = probe.healthz(cfg.socket, timeout=2.0, path=cfg.health_path) if master else None
    document = stats.read(cfg.stats_socket) if master else None
    if document and document.get("pid") != master:
        document = None  # the stats socket was re-bound by a master that is gone
    try:
        last_reload = json.loads(cfg.last_reload_file.read_text())
    except (OSError, ValueError):
        last_reload = None
    workers = (store.annotate_workers(cfg.run_dir, stats.workers(document)) if document
               else [{"id": None, "pid": pid, "status": "?", "requests": None,
                      "accepting": None} for pid in (host.workers_of(master) if master else [])])
    return {
        "running": bool(master),
        "swapping": swapping,
        "healthy": bool(master) and health is not None,
        "problems": ([stranded_problem(masters)] if stranded else []) + (
            problems(cfg, host, master, health, document) if master else []),
        # not wrong, worth knowing: ini changes only a restart applies, a rotated log
        "notices": notices(cfg, host, master, document) if master else [],
        "master_pid": master,
        "parked_master_pid": masters.parked,
        "loading_master_pids": masters.loading,
        "generation": health.get("generation") if health else None,
        "health": health,
        # each worker's own report of the store it maps (None in heap mode)
        "workers": workers,
        "fifos": {
            name: {"path": str(path), "state": fifo.state(path).value}
            for name, path in (("live", cfg.fifo_live), ("standby", cfg.fifo_standby))
        },
        "socket": (cfg.socket.address if cfg.socket.is_tcp
                   else str(Path(cfg.socket.address).absolute())),
        "socket_protocol": cfg.socket.protocol,
        "socket_state": socket_state(cfg.socket, bool(master), bool(health)),
        "stats_socket": str(cfg.stats_socket.absolute()),
        "pidfile": str(cfg.pidfile.absolute()),
        "log_file": str(cfg.log_file.absolute()),
        "reload_in_progress": holder(cfg),
        "handover": with_iso_times(handover.to_json()) if handover else None,
        "last_reload": last_reload,
        "memory": room.to_json() if room else None,
        "oom_score_adj": memory.score(master) if master else None,
    }


def stranded_problem(masters) -> str:
    loading = (f", and new master {', '.join(map(str, masters.loading))} still loading"
               if masters.loading else "")
    return (f"master {masters.parked} serves from the standby FIFO, left there by an "
            f"interrupted swap{loading}: no reload can reach it; `hotswap recover` gives it "
            "its live FIFO back")


def socket_state(where: Endpoint | Path, master: bool, answered: bool) -> str:
    """The probed socket as `status` shows it, in the FIFOs' words."""
    where = probe.endpoint_of(where)
    if not where.exists() or (where.is_tcp and not master):  # a port leaves no stale file
        return "missing"
    if answered:
        return "listening"
    return "no answer" if master else "stale"


def with_iso_times(document: dict) -> dict:
    """The hand-over record keeps epoch seconds (the hook computes with them); `status
    --json` shows every time as ISO 8601 in a `*_at` field, like `loaded_at` and the last
    reload's `finished_at`."""
    shown = dict(document)
    epoch = shown.pop("at", None)
    shown["updated_at"] = files.iso_time(epoch) if epoch else None
    if shown.get("paused_at"):
        shown["paused_at"] = files.iso_time(shown["paused_at"])
    return shown


def notices(cfg: Config, host: RealHost, master: int, document: dict | None) -> list[str]:
    found = host.config_drift(master)
    if document is None:
        found.append(f"the stats socket {cfg.stats_socket} does not answer for master {master} "
                     "(its file removed, or re-bound by a generation that was rolled back): "
                     "workers are listed from /proc; their details return with the next reload")
    try:
        writes_to = os.readlink(f"/proc/{master}/fd/1")
    except OSError:
        writes_to = None
    if writes_to and writes_to != str(cfg.log_file.absolute()):
        found.append(f"master {master} logs to {writes_to} (the log was rotated by rename); "
                     f"the next swap's generation writes to {cfg.log_file} again")
    return found


def problems(cfg: Config, host: RealHost, master: int, health: dict | None,
             document: dict | None) -> list[str]:
    """What is wrong with a running instance, each with the command that fixes it."""
    found = [f"master {item.master} serves, but its {item.slot.value} FIFO {item.path} was "
             "removed or replaced: no command reaches it; `hotswap recover` re-creates it"
             for item in host.detached()]
    if not cfg.socket.accepts():
        why = "(its port was closed?)" if cfg.socket.is_tcp else "(the socket file was removed?)"
        found.append(f"master {master} runs, but nothing accepts on {cfg.socket.address} {why}: "
                     "clients cannot connect, and a reload cannot re-create it; restart: "
                     + drift.restart_hint(cfg))
    elif health is None:
        busy = sum(w["status"] == "busy" for w in stats.workers(document or {}))
        found.append(f"master {master} runs, but {cfg.health_path} does not answer" + (
            f" ({busy} workers busy with requests)" if busy else "") + ": see the log")
    found.extend(store_problems(cfg.run_dir))
    return found
