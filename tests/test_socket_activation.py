"""Socket activation without systemd's unit machinery: the test holds the listening socket
(as hotswap.socket does in systemd) and passes it to `hotswap start` with LISTEN_FDS.

Real uWSGI, 32 clients. What it shows: uWSGI adopts the passed socket (with `protocol =
http`, see hotswap/system/activation.py), a re-fork inherits it, `start` neither refuses
the socket that accepts nor unlinks its file, and a stop then a start later refuses
nothing: the connections made in the gap wait in the backlog and are answered.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.loadgen import LoadGenerator, request_once, summarize
from hotswap.system import procs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO, Service  # noqa: E402

pytestmark = pytest.mark.slow
CONNECTIONS = 32


@pytest.fixture
def activated(tmp_path: Path):
    svc = Service(tmp_path)
    ini = svc.ini.read_text()
    # uWSGI adds LISTEN_FDS sockets with the default protocol (uwsgi): name HTTP for them
    svc.ini.write_text(ini.replace("[uwsgi]\n", "[uwsgi]\nprotocol = http\n", 1))
    svc.run_dir.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(svc.socket))
    os.chmod(svc.socket, 0o660)
    listener.listen(1024)
    try:
        yield svc, listener
    finally:
        svc.teardown()
        listener.close()


def start(svc: Service, listener: socket.socket) -> None:
    env = dict(os.environ, SRV_MODE=svc.mode, SRV_TEST_ROUTES="1")
    svc.supervisor = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "socket-activate.py"), str(listener.fileno()),
         sys.executable, "-m", "hotswap", "--ini", str(svc.ini), "start", "--exec"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=svc.root,
        env=env, start_new_session=True, pass_fds=(listener.fileno(),),
    )
    svc.wait_ready()


def test_activated_socket_survives_reload_stop_and_start(activated):
    svc, listener = activated
    start(svc, listener)
    first = svc.master()
    assert "SystemD socket activation detected" in svc.log_tail(200)
    load = LoadGenerator(str(svc.socket), connections=CONNECTIONS, max_seconds=120)
    load.start()
    try:
        procs.wait_until(lambda: len(load.records) >= 4 * CONNECTIONS, 30)
        svc.release("v2")
        done = svc.cli("reload")
        assert done.returncode == 0, done.stderr + svc.log_tail()
        assert svc.health()["resource_version"] == "v2"

        stop = svc.cli("stop")
        assert stop.returncode == 0, stop.stderr
        assert "socket-activated" in stop.stderr, stop.stderr
        assert svc.socket.exists(), "stop unlinked the activated socket"
        svc.supervisor.wait(timeout=30)
        # the deliberate gap of the scenario: connections made now must wait, not fail
        gap: list = []
        threads = [threading.Thread(target=lambda: gap.append(
            request_once(str(svc.socket), "/healthz", 60.0))) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(5)
        start(svc, listener)
        for thread in threads:
            thread.join(timeout=60)
    finally:
        records = load.stop()
    summary = summarize(records)
    assert summary["failed"] == 0, summary
    assert [r.outcome for r in gap] == ["ok"] * 8, gap
    assert svc.master() != first
    print(f"\nreload, stop, 5 s gap, start under {CONNECTIONS} clients: "
          f"{summary['requests']} requests, 0 failed; 8 made in the gap all answered")
