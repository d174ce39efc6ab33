"""Faults landed between two steps of a real hand-over, under 32 clients (issue 7).

Each test asserts what an operator relies on: no request lost, exactly one generation
serving afterwards (no master parked or loading, no stale standby FIFO), a truthful exit
code and message, and a next reload that works.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import Lines, Service, SlowRequest, sample_paths

from bench.loadgen import LoadGenerator, summarize
from hotswap.system import procs

CONNECTIONS = 32
pytestmark = pytest.mark.slow


def assert_one_generation(service: Service, master: int, generation_prefix: str) -> None:
    health = service.health()
    assert health["master_pid"] == master, health
    assert health["generation"].startswith(generation_prefix), health
    status = service.status()
    assert status["running"] and status["master_pid"] == master, status
    assert status["parked_master_pid"] is None and status["loading_master_pids"] == [], status
    assert status["fifos"]["standby"]["state"] == "missing", status


def assert_swapped(service: Service, old_master: int, generation_prefix: str) -> int:
    """A new master serves `generation_prefix`, alone; returns its pid."""
    new = service.health()["master_pid"]
    service.seen_masters.add(new)
    assert new != old_master
    assert_one_generation(service, new, generation_prefix)
    return new


def next_reload_works(service: Service, version: str) -> None:
    service.restore_code()
    service.release(version=version)
    done = service.cli("reload")
    assert done.returncode == 0, done.stdout + done.stderr
    service.seen_masters.add(service.health()["master_pid"])
    assert service.health()["generation"].startswith(f"{version}+")


def no_failures(load: LoadGenerator) -> dict:
    summary = summarize(load.records)
    assert summary["requests"] > 100, summary
    assert summary["failed"] == 0, summary
    return summary


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("phase", ["loading", "retiring", "verifying"])
def test_signal_to_reload_at_each_phase(service: Service, phase: str, signum: int):
    """Before the commit point (loading) the swap rolls back; after it (retiring,
    verifying), it finishes. Either way one generation serves."""
    before = service.start()
    if phase == "loading":
        service.release_hanging_import()  # the signal surely lands before the commit
    else:
        service.release(version="v2")
    with LoadGenerator(str(service.socket), CONNECTIONS, sample_paths(service)) as load:
        lines = Lines(service.cli_background("reload"))
        lines.wait_for(f"] {phase}")
        loading = service.loading_pid() if phase == "loading" else None
        os.kill(lines.process.pid, signum)
        code, out, err = lines.finish()
        name = signal.Signals(signum).name
        if phase == "loading":
            assert code == 1, out + err
            assert f"interrupted by {name}" in err.splitlines()[0], err
            assert not procs.alive(loading)
            assert_one_generation(service, before["master_pid"], "v1+")
        else:
            assert code == 0, out + err
            assert_swapped(service, before["master_pid"], "v2+")
        next_reload_works(service, "v3")
    no_failures(load)


def test_log_directory_full(service: Service):
    """uWSGI cannot log, the hook cannot print: the instance starts and serves, the swap goes
    through, nothing is lost."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    log_dir = service.root / "log"
    log_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(log_dir)], check=True)
    try:
        filler = log_dir / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        assert os.statvfs(log_dir).f_bavail == 0, "the log filesystem is not full"
        before = service.start()
        with LoadGenerator(str(service.socket), CONNECTIONS, sample_paths(service)) as load:
            service.release(version="v2")
            done = service.cli("reload")
            assert done.returncode == 0, done.stdout + done.stderr
            assert_swapped(service, before["master_pid"], "v2+")
            next_reload_works(service, "v3")
        no_failures(load)
    finally:
        service.teardown()
        subprocess.run(["umount", "-l", str(log_dir)], check=False)


@pytest.mark.parametrize("fault", ["hook SIGKILL", "hook SIGSTOP", "new master SIGKILL"])
def test_fault_between_p_and_q(service: Service, fault: str):
    before = service.start()
    with LoadGenerator(str(service.socket), CONNECTIONS, sample_paths(service),
                       max_seconds=120) as load:
        SlowRequest(service, seconds=3)
        service.release(version="v2")
        lines = Lines(service.cli_background("reload"))
        paused = procs.wait_until(
            lambda: (h := service.handover()).get("state") == "paused"
            and h["master_pid"] != before["master_pid"] and h, 60, interval=0.002)
        assert paused, f"never saw the pause; record {service.handover()}"
        new = paused["master_pid"]
        if fault == "hook SIGKILL":
            os.kill(paused["performer_pid"], signal.SIGKILL)
        elif fault == "hook SIGSTOP":
            os.kill(paused["performer_pid"], signal.SIGSTOP)
        else:
            os.kill(new, signal.SIGKILL)
        code, out, err = lines.finish()
        if fault == "hook SIGKILL":
            # another worker's hook takes the hand-over over and finishes it
            assert code == 0, out + err
            service.seen_masters.add(new)
            assert_one_generation(service, new, "v2+")
        else:
            assert code == 1, out + err
            cause = "stalled with the old workers paused" if fault == "hook SIGSTOP" \
                else f"new master {new} exited"
            assert cause in err.splitlines()[0], err
            assert not procs.alive(new)
            assert_one_generation(service, before["master_pid"], "v1+")
        next_reload_works(service, "v3")
    no_failures(load)


def test_worker_killed_as_its_hook_starts(service: Service):
    """The worker running the hand-over dies with it: the other workers' hooks take over;
    no worker of the new generation accepted before the commit, so nothing is lost."""
    before = service.start()
    service.release_hanging_import()
    with LoadGenerator(str(service.socket), CONNECTIONS, sample_paths(service)) as load:
        lines = Lines(service.cli_background("reload"))
        new = service.loading_pid()
        service.let_import_finish()
        first = procs.wait_until(lambda: procs.children(new), 30, interval=0.001)
        assert first, "the new master forked no worker"
        os.kill(min(first), signal.SIGKILL)  # worker 1: the first one forked
        code, out, err = lines.finish()
        assert code in (0, 1), out + err
        serving = service.health()["master_pid"]
        service.seen_masters.add(serving)
        if code == 0:
            assert serving == new
        else:
            assert serving == before["master_pid"] and not procs.alive(new)
        assert_one_generation(service, serving, "v1+")
        next_reload_works(service, "v3")
    no_failures(load)


def test_ctrl_c_to_start_during_a_reload_stops_cleanly(service: Service):
    """The supervisor waits for the reload to settle, then stops what serves: never a new
    generation left running after "stopping"."""
    before = service.start()
    service.release_hanging_import()
    with LoadGenerator(str(service.socket), 8, sample_paths(service)) as load:
        reload = Lines(service.cli_background("reload"))
        new = service.loading_pid()
        os.killpg(service.supervisor.pid, signal.SIGINT)
        service.let_import_finish()
        code, out, err = reload.finish()
        settled = time.time()
        assert service.supervisor.wait(timeout=120) == 0
    stderr = service.supervisor.stderr.read()
    assert "stopping once the reload in progress" in stderr and "stopped" in stderr, stderr
    assert code in (0, 1), out + err
    assert not procs.alive(new) and not procs.alive(before["master_pid"])
    assert service.all_pids() == []
    # Everything was served while the reload ran (the stop waited for it); the stop itself
    # then refuses new connections and resets those still queued (its poll turn is 0.5 s).
    early = [r for r in load.records if r.outcome != "ok" and r.started < settled - 1.0]
    assert not early, summarize(early)
