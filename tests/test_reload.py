"""Reloads against real uWSGI masters under load: nothing lost, every fault rolled back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
from conftest import Service, SlowRequest, sample_paths

from bench.loadgen import LoadGenerator, summarize
from hotswap.system import procs

CONNECTIONS = 32


def reload_json(service: Service, *args: str) -> tuple[int, dict]:
    done = service.cli("reload", "--json", *args)
    result = json.loads(done.stdout)
    if result.get("new_master"):
        service.seen_masters.add(result["new_master"])
    return done.returncode, result


def assert_serving(service: Service, master: int, generation: str) -> None:
    health = service.health()
    assert health["master_pid"] == master
    assert health["generation"] == generation
    status = json.loads(service.cli("status", "--json").stdout)
    assert status["fifos"]["live"]["state"] == "listening"
    assert status["fifos"]["standby"]["state"] == "missing", "stale standby FIFO left behind"


# More reloads for a soak: HOTSWAP_RELOADS=100 pytest tests/test_reload.py -k reloads_under
RELOADS = int(os.environ.get("HOTSWAP_RELOADS", "5"))


def test_reloads_under_load_lose_nothing(service: Service):
    health = service.start()
    load = LoadGenerator(str(service.socket), CONNECTIONS, sample_paths(service),
                         max_seconds=max(240, 3 * RELOADS))
    reloads = []
    with load:
        for n in range(2, RELOADS + 2):
            service.release(version=f"v{n}")
            reloads.append(time.time())
            code, result = reload_json(service)
            assert code == 0, result
            after = service.health()
            assert after["generation"] != health["generation"]
            assert after["generation"] == result["new_generation"] == f"v{n}+" + after[
                "generation"].split("+")[1]
            assert after["master_pid"] == result["new_master"] != health["master_pid"]
            assert not procs.alive(health["master_pid"]), "old master left running"
            health = after
    summary = summarize(load.records)
    assert summary["requests"] > 500, summary
    assert summary["failed"] == 0, (summary, failures_by_reload(load.records, reloads))
    assert len(summary["generations"]) == RELOADS + 1, summary


def failures_by_reload(records, reload_starts: list[float]) -> list[str]:
    """Each failed request, placed relative to the reload that preceded it."""
    lines = []
    for record in (r for r in records if r.outcome != "ok"):
        before = [t for t in reload_starts if t <= record.started]
        where = f"{record.started - before[-1]:+.3f}s after reload {len(before)}" if before \
            else "before the first reload"
        lines.append(f"{record.outcome} at {where}, after {record.latency:.3f}s")
    return lines[:10]


def test_reload_prints_phases_and_outcome(service: Service):
    service.start()
    service.release(version="v2")
    done = service.cli("reload")
    assert done.returncode == 0, done.stderr
    for phase in ("preflight", "forking", "loading", "retiring", "verifying", "done"):
        assert phase in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("reload ok in ")
    assert "v1+" in done.stdout and "v2+" in done.stdout


def import_error(service: Service):
    service.release_code("raise ImportError('release 42 is broken')\n")
    return service.cli("reload"), 1, "ImportError: release 42 is broken"


def corrupt_resource(service: Service):
    path = service.root / "data" / "terms.tsv"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return service.cli("reload"), 1, "checksum mismatch"


def import_hangs_past_timeout(service: Service):
    service.release_hanging_import()
    done = service.cli("reload", "--timeout", "3")
    assert not procs.alive(service.loading_pid()), "the hung new master was not killed"
    return done, 5, "not ready within --timeout 3s"


def new_master_killed_mid_load(service: Service):
    service.release_hanging_import()
    reload = service.cli_background("reload")
    new_master = service.loading_pid()
    assert new_master not in service.seen_masters
    os.kill(new_master, signal.SIGKILL)
    out, err = reload.communicate(timeout=60)
    done = subprocess.CompletedProcess(reload.args, reload.returncode, out, err)
    return done, 1, f"new master {new_master} exited while loading"


@pytest.mark.parametrize(
    "break_release",
    [import_error, corrupt_resource, import_hangs_past_timeout, new_master_killed_mid_load],
)
def test_failed_release_rolls_back_under_load(service: Service, break_release):
    before = service.start()
    with LoadGenerator(str(service.socket), CONNECTIONS, sample_paths(service)) as load:
        done, expected_code, cause = break_release(service)
        assert done.returncode == expected_code, done.stdout + done.stderr
        first_line = done.stderr.splitlines()[0]
        assert first_line.startswith("hotswap: reload FAILED") and cause in first_line
        assert_serving(service, before["master_pid"], before["generation"])
        # the fixed release then reloads fine
        service.restore_code()
        service.release(version="v2")
        code, result = reload_json(service)
        assert code == 0, result
    summary = summarize(load.records)
    assert summary["failed"] == 0, summary
    assert service.health()["generation"].startswith("v2+")


def test_second_reload_is_refused_while_one_runs(service: Service):
    service.start()
    service.release_hanging_import()
    first = service.cli_background("reload")
    service.loading_pid()
    second = service.cli("reload", timeout=30)
    assert second.returncode == 4, second.stderr
    assert "reload is in progress" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    # stop is refused too while the swap runs
    assert service.cli("stop").returncode == 4
    service.let_import_finish()
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, out + err
    service.seen_masters.add(service.master())


def test_inflight_slow_request_survives_reload(service: Service):
    before = service.start()
    slow = SlowRequest(service, seconds=2)
    service.release(version="v2")
    assert service.cli("reload").returncode == 0
    answer = slow.result()
    assert answer.status == 200
    assert answer.json()["generation"] == before["generation"]


def test_drain_past_its_budget_still_succeeds(service: Service):
    before = service.start()
    service.release_hanging_import()
    reload = service.cli_background("reload", "--drain", "0.5")
    service.loading_pid()
    # in flight in an old worker while the new generation waits to finish its import
    slow = SlowRequest(service, seconds=6)
    service.let_import_finish()
    out, err = reload.communicate(timeout=120)
    assert reload.returncode == 0, out + err
    assert f"old master {before['master_pid']} still draining" in err
    service.seen_masters.add(service.health()["master_pid"])
    assert service.health()["master_pid"] != before["master_pid"]
    answer = slow.result()
    assert answer.status == 200 and answer.json()["generation"] == before["generation"]
    assert procs.wait_until(lambda: not procs.alive(before["master_pid"]), 30)
    service.restore_code()
    service.release(version="v3")
    assert service.cli("reload").returncode == 0


def test_status_polled_during_reloads_does_not_disturb_them(service: Service):
    """`status` must not open the FIFOs (uWSGI re-creates a FIFO after every writer)."""
    service.start()
    stop = threading.Event()

    def poll_status():
        while not stop.is_set():
            service.cli("status", "--json", timeout=30)

    poller = threading.Thread(target=poll_status)
    poller.start()
    try:
        for n in range(2, 5):
            service.release(version=f"v{n}")
            code, result = reload_json(service)
            assert code == 0, result
    finally:
        stop.set()
        poller.join(timeout=60)
