"""Witnesses about uWSGI workers that the swap relies on, on a real uWSGI (both found by
the chaos soak, at a worker respawned in the middle of a hand-over):
- the drain frees a stranded worker (hotswap/swap/host.py, RealHost.stranded_workers): a
  suspended worker holds no connection, a respawned one parks before it accepts, and a
  serving one is never named. The drain's decision (when, and what it says) is
  tests/test_machine.py's, on the fake host;
- the hand-over nudges with SIGTSTP only a worker that runs its own signal handlers
  (procs.worker_initialised): to a worker just forked, SIGTSTP is its master's pause toggle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hotswap.config import load
from hotswap.swap.host import RealHost
from hotswap.system import procs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import Service  # noqa: E402

pytestmark = pytest.mark.slow


def _write(fifo: Path, command: str) -> None:
    with open(fifo, "w") as handle:
        handle.write(command)


def _parked(workers: list[int]) -> bool:
    """All parked yet? Nudging the others, as the hand-over does: a worker already back in
    epoll when "p" set its flag notices it only at its next loop turn (the master's own
    SIGTSTP can land before the worker's handler is there)."""
    waiting = [w for w in workers if not procs.parked_in_poll(w)]
    for pid in waiting:
        if procs.worker_initialised(pid):
            procs.signal_quietly(pid, signal.SIGTSTP)
    return not waiting


def test_suspended_workers_are_named_and_serving_ones_never(service: Service):
    """"p" suspends every worker, a respawned one included (its slot's flag survives the
    respawn); each is named (exactly, by procs.suspended, or by the fallback: born after the
    pause). Resumed, they serve again and none is named: nothing that may hold a connection
    is ever killed by the drain."""
    service.start()
    host = RealHost(load(service.ini))
    master = service.master()
    before = host.workers_of(master)
    assert host.stranded_workers(master, time.time() - 3600) == []  # serving: none
    paused_at = time.time()
    _write(host.cfg.fifo_live, "p")
    assert procs.wait_until(lambda: _parked(before), 20), service.log_tail()
    exact = procs.suspended(before[0]) is not None
    if exact:
        assert procs.wait_until(lambda: set(host.stranded_workers(master, paused_at))
                                == set(before), 20), service.log_tail()
        assert procs.suspended(master) is False
    else:  # the fallback names only a worker born after the pause
        assert host.stranded_workers(master, paused_at) == []

    os.kill(before[0], signal.SIGKILL)
    respawned = procs.wait_until(
        lambda: [w for w in host.workers_of(master) if w not in before], 30)
    assert respawned, service.log_tail()
    assert procs.wait_until(lambda: set(respawned) <= set(host.stranded_workers(
        master, paused_at)), 30), service.log_tail()

    # resumed, they accept like any other: no longer suspended, so never named
    _write(host.cfg.fifo_live, "p")
    assert procs.wait_until(lambda: host.stranded_workers(master, paused_at) == [], 30)
    assert service.health()["master_pid"] == master


def test_only_workers_past_their_init_are_nudged(service: Service):
    service.start()
    host = RealHost(load(service.ini))
    master = service.master()
    workers = host.workers_of(master)
    assert workers and all(procs.worker_initialised(w) for w in workers), workers
    assert not procs.worker_initialised(master)  # what a just-forked worker still is
    plain = subprocess.Popen(["sleep", "60"])
    try:
        assert not procs.worker_initialised(plain.pid)
    finally:
        plain.kill()
        plain.wait()
    assert not procs.worker_initialised(2**22 + 1)  # no such process
