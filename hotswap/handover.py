"""The accepting hook: run by uWSGI in worker 1 of every new generation.

srv.ini runs `python -m hotswap.handover --ini srv.ini` as `hook-accepting1-once`, i.e. once
the new generation's app is imported and its first worker is about to accept. In order:

1. Record "started" in run/handover.json: `hotswap reload` then lets the hand-over finish
   even if its deadline passes meanwhile.
2. Tell systemd (if any) that the new master is the main pid, and wait for its BARRIER
   acknowledgement: systemd must know the new master before the old one exits, or it sees
   its main process die and kills the whole control group, new master included.
3. Point the pidfile at the new master (uWSGI only writes it at a fresh start).
4. Retire the old master, the new master's parent parked on the standby FIFO: "q" into
   that FIFO, non-blocking. It drains and exits. At a fresh start there is nobody to retire,
   and a standby FIFO left by a crash is removed.
5. Record "done", which `hotswap reload` is waiting for.

This hook always exits 0: a failing hook would make uWSGI destroy the new generation, and the
old one may already be retiring. Problems are logged (stderr goes to the uWSGI log) and
recorded for `hotswap reload` to report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time

from . import config, fifo, files, notify, procs


def _is_uwsgi(pid: int, uwsgi_binary: str) -> bool:
    try:
        exe = os.path.realpath(f"/proc/{pid}/exe")
    except OSError:
        return False
    return exe == uwsgi_binary or os.path.basename(exe) == "uwsgi"


def find_master(uwsgi_binary: str) -> int:
    """The hook runs as python <- sh -c <- worker 1 <- master: climb to the first uWSGI
    process (the worker); its parent is this generation's master."""
    pid = os.getppid()
    while pid > 1:
        info = procs.stat(pid)
        if info is None:
            break
        if _is_uwsgi(pid, uwsgi_binary):
            return info.ppid
        pid = info.ppid
    raise RuntimeError("not started by a uWSGI worker")


SUSPENDED_RE = re.compile(rb"\*\*\* worker (\d+) suspended \*\*\*")
PAUSE_TIMEOUT = 2.0


def pause_workers(cfg: config.Config, master: int) -> str:
    """Park the retiring generation's workers before it is told to quit.

    uWSGI's graceful quit sends SIGHUP to every worker, and a worker that is not inside a
    request exits on the spot: if it had just accept()ed a connection and not yet marked
    itself busy, that connection is reset (measured: 8 resets over 40 reloads under 32
    concurrent clients; none over 100 with the pause). "p" instead marks the workers
    suspended, and a worker only suspends at the top of its loop, before accepting: once
    all of them log "suspended",
    none holds an unanswered connection, and "q" is safe. SIGTSTP (what "p" sends) nudges
    a worker blocked in epoll back to the top of its loop; it is harmless to the others.
    Returns "n/m" workers paused (below m only if the deadline hit first)."""
    reforked = procs.session_leaders_below(master)  # the new master: not a worker
    workers = [pid for pid in procs.children(master) if pid not in reforked]
    offset = cfg.log_file.stat().st_size if cfg.log_file.exists() else 0
    fifo.send(cfg.fifo_standby, "p")

    def all_suspended() -> bool:
        try:
            with open(cfg.log_file, "rb") as log:
                log.seek(offset)
                suspended = set(SUSPENDED_RE.findall(log.read()))
        except OSError:
            suspended = set()
        if len(suspended) >= len(workers):
            return True
        for pid in workers:
            procs.signal_quietly(pid, signal.SIGTSTP)
        counts[0] = len(suspended)
        return False

    counts = [0]
    done = procs.wait_until(all_suspended, PAUSE_TIMEOUT, interval=0.01)
    return f"{len(workers) if done else counts[0]}/{len(workers)}"


def hand_over(cfg: config.Config) -> dict:
    new_master = find_master(os.path.realpath(cfg.uwsgi))
    parent = procs.stat(new_master).ppid
    retiring = parent if procs.holds_open(parent, cfg.fifo_standby) else None
    record: dict = {
        "phase": "started",  # `hotswap reload` gives a started hand-over time to finish
        "master_pid": new_master,
        "retiring_pid": retiring,
        "generation": os.environ.get("HOTSWAP_GENERATION", "unknown"),
        "notified_systemd": False,
        "retire": "none",
    }

    def save() -> None:
        files.atomic_write(cfg.handover_file, json.dumps(record))

    save()
    try:
        record["notified_systemd"] = notify.notify(
            f"MAINPID={new_master}\nSTATUS=Serving generation {record['generation']} "
            f"(master {new_master})\nREADY=1",
            barrier=True,
        )
    except OSError as exc:  # includes the barrier's TimeoutError: go on, and say so
        record["notified_systemd"] = f"failed: {exc}"
    files.atomic_write(cfg.pidfile, f"{new_master}\n")
    if retiring:
        try:
            record["paused_workers"] = pause_workers(cfg, retiring)
            save()  # a rollback must know the old workers are paused
            fifo.send(cfg.fifo_standby, "q")
            record["retire"] = "sent"
        except Exception as exc:  # noqa: BLE001 - `hotswap reload` retries, and reports it
            record["retire"] = f"failed: {type(exc).__name__}: {exc}"
    elif fifo.remove_if_stale(cfg.fifo_standby):
        # A standby FIFO at a fresh start is a leftover from a crash: nobody to retire.
        record["retire"] = "removed stale standby FIFO"
    record["phase"] = "done"
    record["at"] = time.time()
    save()
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hotswap.handover")
    parser.add_argument("--ini", required=True)
    args = parser.parse_args(argv)
    try:
        record = hand_over(config.load(args.ini))
    except Exception as exc:  # noqa: BLE001 - never fail the hook, see the module docstring
        print(f"hotswap handover: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 0
    print(
        f"hotswap handover: master {record['master_pid']} serving generation "
        f"{record['generation']}; retiring {record['retiring_pid'] or 'nobody'} "
        f"({record['retire']})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
