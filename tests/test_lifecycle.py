"""start / stop / status / probe with real processes, and every operator mistake."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, Service, SlowRequest

from hotswap.swap import probe
from hotswap.system import procs

NOT_RUNNING, CONFIG, BUSY = 3, 2, 4


def one_clear_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_stale_fifos_socket_and_pidfile_at_start(service: Service):
    run = service.run_dir
    run.mkdir()
    os.mkfifo(run / "0.fifo")
    os.mkfifo(run / "1.fifo")  # the one that hangs worker 1 of the bare recipe
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(run / "http.sock"))
    stale.close()  # bound, never listened, not unlinked: a dead instance's socket
    (run / "master.pid").write_text("999999\n")
    service.start()
    assert procs.wait_until(service.all_workers_accepting, 30)
    handover = json.loads((run / "handover.json").read_text())
    assert handover["state"] == "done" and handover["retiring_pid"] is None
    assert not (run / "1.fifo").exists()
    # every worker accepts: four concurrent slow requests land on four distinct workers
    answers = []
    threads = [
        threading.Thread(target=lambda: answers.append(
            probe.get(service.socket, "/sleep?seconds=1", timeout=20)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [a.status for a in answers] == [200] * 4
    assert len({a.json()["worker_pid"] for a in answers}) == 4
    status = json.loads(service.cli("status", "--json").stdout)
    assert all(w["accepting"] for w in status["workers"]) and len(status["workers"]) == 4


def test_start_refuses_a_second_instance(service: Service):
    health = service.start()
    done = service.cli("start", timeout=30)
    assert done.returncode == BUSY
    assert f"already running: master {health['master_pid']}" in one_clear_line(done.stderr)
    assert service.health()["master_pid"] == health["master_pid"]


@pytest.mark.parametrize("command", [["reload"], ["stop"], ["status"], ["recover"]])
def test_commands_with_nothing_running(service: Service, command):
    started = time.monotonic()
    done = service.cli(*command, timeout=30)
    assert time.monotonic() - started < 10
    if command == ["recover"]:
        assert done.returncode == 0 and "nothing to recover" in done.stdout
        return
    assert done.returncode == NOT_RUNNING, done.stderr
    if command != ["status"]:
        assert "nothing is running" in one_clear_line(done.stderr)
    else:
        assert "stopped" in done.stdout


def test_probe_exit_codes(service: Service):
    assert service.cli("probe").returncode == 2  # nothing listening: CRITICAL
    service.start()
    ok = service.cli("probe")
    assert ok.returncode == 0 and ok.stdout.startswith("OK - GET /healthz -> 200")
    assert service.cli("probe", "--path", "/nope").returncode == 1  # 404: WARNING
    assert service.cli("probe", "--path", "/nope", "--expect-status", "404").returncode == 0
    assert service.cli("probe", "--path", "nope").returncode == 3  # UNKNOWN
    bad = service.cli("probe", "--path", "/sleep?seconds=5", "--timeout", "0.5")
    assert bad.returncode == 2 and "CRITICAL" in bad.stderr


@pytest.mark.parametrize("script", ["check-curl.sh", "check-socat.sh"])
def test_shell_health_checks(service: Service, script: str):
    path = REPO / "scripts" / script
    down = subprocess.run([path, str(service.socket)], capture_output=True, text=True,
                          timeout=30)
    assert down.returncode == 2, down.stderr
    service.start()
    up = subprocess.run([path, str(service.socket)], capture_output=True, text=True,
                        timeout=30)
    assert up.returncode == 0 and up.stdout.startswith("OK - GET /healthz -> 200"), up.stderr
    assert '"status":"ok"' in up.stdout
    missing = subprocess.run([path, str(service.socket), "/nope"], capture_output=True,
                             text=True, timeout=30)
    assert missing.returncode == 1


def test_graceful_stop_finishes_inflight_request(service: Service):
    health = service.start()
    slow = SlowRequest(service, seconds=2)
    done = service.cli("stop", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    assert f"stopped master {health['master_pid']}" in done.stdout
    assert slow.result().status == 200
    assert not procs.alive(health["master_pid"])
    # the supervisor (foreground `hotswap start`) exits with the last master
    assert service.supervisor.wait(timeout=10) == 0
    assert not service.socket.exists() and not (service.run_dir / "0.fifo").exists()
    assert service.all_pids() == []


def test_status_reports_master_generation_workers_and_last_reload(service: Service):
    health = service.start()
    service.release(version="v2")
    assert service.cli("reload").returncode == 0
    status = json.loads(service.cli("status", "--json").stdout)
    assert status["running"] and status["master_pid"] == service.master() != health["master_pid"]
    service.seen_masters.add(status["master_pid"])
    assert status["generation"].startswith("v2+")
    assert status["socket"] == str(service.socket) and os.path.isabs(status["socket"])
    assert len(status["workers"]) == 4
    assert status["last_reload"]["ok"] is True
    text = service.cli("status").stdout
    assert "running     master" in text and "last reload ok" in text


def test_bad_ini_is_one_clear_line(tmp_path: Path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "hotswap", *args], capture_output=True,
                              text=True, timeout=30, cwd=tmp_path)

    missing = run("--ini", str(tmp_path / "nope.ini"), "status")
    assert missing.returncode == CONFIG
    assert "no such ini file" in one_clear_line(missing.stderr)
    (tmp_path / "partial.ini").write_text("[uwsgi]\nrun_dir = %drun\n")
    partial = run("--ini", str(tmp_path / "partial.ini"), "reload")
    assert partial.returncode == CONFIG
    assert "does not set fifo_live" in one_clear_line(partial.stderr)
    directory = run("--ini", str(tmp_path), "stop")
    assert directory.returncode == CONFIG and "not a file" in one_clear_line(directory.stderr)
    usage = run("reload", "--timeout", "soon")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_ctrl_c_in_a_terminal_stops_gracefully(service: Service):
    """Ctrl-C signals the terminal's whole foreground process group."""
    health = service.start()
    slow = SlowRequest(service, seconds=2)
    os.killpg(service.supervisor.pid, signal.SIGINT)
    assert slow.result().status == 200
    assert service.supervisor.wait(timeout=30) == 0
    assert not procs.alive(health["master_pid"])


def test_two_starts_at_once_make_one_instance(service: Service):
    service.release(version="v1")
    starts = [
        subprocess.Popen(
            [sys.executable, "-m", "hotswap", "--ini", str(service.ini), "start"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env=dict(os.environ, SRV_MODE=service.mode),
        )
        for _ in range(2)
    ]
    service.background.extend(starts)
    health = service.wait_ready()
    refused = procs.wait_until(lambda: [p for p in starts if p.poll() is not None], 30)
    assert refused and len(refused) == 1 and refused[0].returncode == BUSY
    assert "already running" in refused[0].stderr.read()
    winner = next(p for p in starts if p not in refused)
    service.supervisor = winner
    service.background.remove(winner)
    masters = {service.health()["master_pid"] for _ in range(20)}
    assert masters == {health["master_pid"]}


def test_stale_pidfile_naming_another_instance(service: Service, tmp_path_factory):
    other = Service(tmp_path_factory.mktemp("other"))
    try:
        theirs = other.start()
        service.run_dir.mkdir()
        (service.run_dir / "master.pid").write_text(f"{theirs['master_pid']}\n")
        for command in ("stop", "reload"):
            done = service.cli(command, timeout=30)
            assert done.returncode == NOT_RUNNING, done.stderr
        assert other.health()["master_pid"] == theirs["master_pid"]
        ours = service.start()  # and ours starts beside theirs
        assert ours["master_pid"] != theirs["master_pid"]
    finally:
        other.teardown()


def strand_a_swap(service: Service) -> tuple[dict, int]:
    """SIGKILL `hotswap reload` while the new master loads: the old master is left parked
    on the standby FIFO and the new one loading. Returns (old /healthz, loading pid)."""
    before = service.start()
    service.release_hanging_import()
    reload = service.cli_background("reload")
    loading = service.loading_pid()
    reload.kill()
    reload.communicate(timeout=30)
    return before, loading


def test_killed_reload_is_recovered(service: Service):
    """`hotswap reload` SIGKILLed mid-load leaves a parked old master and a loading new one;
    `recover` kills the orphaned load and gives the old master its FIFO back."""
    before, loading = strand_a_swap(service)
    done = service.cli("status", "--json")
    status = json.loads(done.stdout)
    assert status["parked_master_pid"] == before["master_pid"]
    assert status["loading_master_pids"] == [loading]
    # its workers still serve: running, with the problem named and its fix (exit 6)
    assert done.returncode == 6 and status["running"] and not status["swapping"], status
    assert status["master_pid"] == before["master_pid"]
    assert any("left there by an interrupted swap" in p and "`hotswap recover`" in p
               for p in status["problems"]), status["problems"]
    done = service.cli("recover")
    assert done.returncode == 0 and f"rolled back master {loading}" in done.stdout, done.stderr
    assert not procs.alive(loading)
    status = json.loads(service.cli("status", "--json").stdout)
    assert status["master_pid"] == before["master_pid"]
    assert status["parked_master_pid"] is None and status["loading_master_pids"] == []
    assert status["fifos"]["standby"]["state"] == "missing"
    service.restore_code()
    service.release(version="v2")
    assert service.cli("reload").returncode == 0


def test_next_reload_repairs_a_killed_one(service: Service):
    """What systemd's ExecReload timeout leaves (the CLI SIGKILLed mid-load) does not block
    the next reload: it repairs, says so, and swaps."""
    before, loading = strand_a_swap(service)
    service.restore_code()
    service.release(version="v2")
    done = service.cli("reload")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"repaired: rolled back master {loading}" in done.stdout
    assert not procs.alive(loading) and not procs.alive(before["master_pid"])
    health = service.health()
    assert health["generation"].startswith("v2+")
    status = json.loads(service.cli("status", "--json").stdout)
    assert status["parked_master_pid"] is None and status["loading_master_pids"] == []


def test_stop_after_a_killed_reload_stops_everything(service: Service):
    before, loading = strand_a_swap(service)
    done = service.cli("stop", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    assert not procs.alive(before["master_pid"]) and not procs.alive(loading)
    assert service.supervisor.wait(timeout=30) == 0
