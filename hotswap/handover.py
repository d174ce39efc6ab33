"""The accepting hook: run by uWSGI in worker 1 of every new generation.

srv.ini runs `python -m hotswap.handover --ini srv.ini` as `hook-accepting1-once`, i.e. once
the new generation's app is imported and its first worker is about to accept. In order:

1. Tell systemd (if any) that the new master is the main pid, and wait for its BARRIER
   acknowledgement: systemd must know the new master before the old one exits, or it sees
   its main process die and kills the whole control group, new master included.
2. Point the pidfile at the new master (uWSGI only writes it at a fresh start).
3. Retire the old master: "q" into the standby FIFO, non-blocking. It drains and exits.
4. Record the hand-over in run/handover.json, which `hotswap reload` is waiting for.

This hook always exits 0: a failing hook would make uWSGI destroy the new generation, and the
old one may already be retiring. Problems are logged (stderr goes to the uWSGI log) and
recorded for `hotswap reload` to report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import config, fifo, notify, procs


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


def _write_json(path: os.PathLike, document: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(document, handle)
    os.replace(tmp, path)


def hand_over(cfg: config.Config) -> dict:
    new_master = find_master(os.path.realpath(cfg.uwsgi))
    previous = procs.read_pidfile(cfg.pidfile)
    retiring = previous if previous and previous != new_master and procs.alive(previous) else None
    generation = os.environ.get("HOTSWAP_GENERATION", "unknown")
    record: dict = {
        "master_pid": new_master,
        "retiring_pid": retiring,
        "generation": generation,
        "notified_systemd": False,
        "retire": "none",
    }

    record["notified_systemd"] = notify.notify(
        f"MAINPID={new_master}\nSTATUS=Serving generation {generation} (master {new_master})\n"
        "READY=1",
        barrier=True,
    )
    procs.write_pidfile(cfg.pidfile, new_master)
    if retiring:
        try:
            fifo.send(cfg.fifo_standby, "q")
            record["retire"] = "sent"
        except fifo.NoReader as exc:
            record["retire"] = f"failed: {exc.strerror}"
    elif fifo.remove_if_stale(cfg.fifo_standby):
        # A standby FIFO at a fresh start is a leftover from a crash: nobody to retire.
        record["retire"] = "removed stale standby FIFO"
    record["at"] = time.time()
    _write_json(cfg.handover_file, record)
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
