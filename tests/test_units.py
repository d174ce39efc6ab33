"""Pieces tested alone: FIFO writes never block, sd_notify's barrier, resource checks, routes."""

from __future__ import annotations

import importlib
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.loadgen import _parse_answer
from hotswap.inside import wsgi
from hotswap.protocol import fifo
from hotswap.system import notify
from scripts.gen_resource import write_resource


def test_fifo_write_without_reader_fails_at_once(tmp_path: Path):
    path = tmp_path / "0.fifo"
    with pytest.raises(fifo.NoReader, match="missing"):
        fifo.send(path, "q")
    os.mkfifo(path)
    started = time.monotonic()
    with pytest.raises(fifo.NoReader, match="no master is reading"):
        fifo.send(path, "1f")
    assert time.monotonic() - started < 1
    assert fifo.state(path) is fifo.FifoState.STALE
    assert fifo.remove_if_stale(path) and not path.exists()


def test_fifo_write_reaches_a_reader(tmp_path: Path):
    path = tmp_path / "0.fifo"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert fifo.state(path) is fifo.FifoState.LISTENING
        fifo.send(path, "1f")
        assert os.read(reader, 16) == b"1f"
    finally:
        os.close(reader)


def test_notify_waits_for_the_barrier(tmp_path: Path):
    """A stand-in systemd on a real datagram socket: the barrier returns only after it
    has read the message and closed the passed pipe end."""
    address = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    received = []

    def systemd():
        for _ in range(2):
            data, fds, _, _ = socket.recv_fds(server, 4096, 4)
            received.append(data.decode())
            for fd in fds:
                os.close(fd)

    thread = threading.Thread(target=systemd)
    thread.start()
    assert notify.notify("MAINPID=42\nREADY=1", barrier=True, path=address)
    thread.join(timeout=5)
    server.close()
    assert received == ["MAINPID=42\nREADY=1", "BARRIER=1"]


def test_notify_is_a_no_op_outside_systemd(monkeypatch):
    for name in notify.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert notify.notify("READY=1") is False


def test_loadgen_parses_answers():
    raw = b"HTTP/1.1 200 OK\r\nX-Master-Pid: 12\r\nX-Generation: v2+ab\r\n\r\n{}"
    assert _parse_answer(raw) == ("ok", 12, "v2+ab")
    assert _parse_answer(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")[0] == "http_502"
    assert _parse_answer(b"garbage")[0] == "bad_response"


@pytest.fixture
def srv_module(tmp_path: Path, monkeypatch):
    resource = tmp_path / "terms.tsv"
    write_resource(str(resource), 1000, seed=1, version="unit")
    monkeypatch.setenv("SRV_RESOURCE", str(resource))
    monkeypatch.setenv("SRV_MODE", "heap")
    sys.modules.pop("srv", None)
    module = importlib.import_module("srv")
    yield module
    sys.modules.pop("srv", None)


def test_resource_validation(srv_module, tmp_path: Path):
    path = tmp_path / "t.tsv"
    write_resource(str(path), 100, seed=2, version="x")
    header, table = srv_module.load_resource(str(path))
    assert header["version"] == "x" and len(table) == 100
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(srv_module.ResourceError, match="checksum mismatch"):
        srv_module.load_resource(str(path))
    path.write_bytes(b"not a resource\n")
    with pytest.raises(srv_module.ResourceError, match="bad header"):
        srv_module.load_resource(str(path))
    with pytest.raises(srv_module.ResourceError, match="cannot read"):
        srv_module.load_resource(str(tmp_path / "missing.tsv"))


def test_routes_answer_json_and_4xx_for_bad_input(srv_module):
    client = srv_module.app.test_client()
    health = client.get("/healthz").get_json()
    assert health["status"] == "ok" and health["generation"].startswith("unit+")
    assert {"master_pid", "worker_pid", "loaded_at", "load_seconds"} <= set(health)
    term = next(iter(srv_module.HEAP.table))
    found = client.get(f"/lookup?q={term}")
    assert found.status_code == 200 and found.get_json()["term"] == term
    for url, status in [("/lookup", 400), ("/lookup?q=", 400), ("/lookup?q=" + "x" * 300, 400),
                        ("/lookup?q=nosuchterm", 404), ("/nowhere", 404)]:
        answer = client.get(url)
        assert answer.status_code == status, url
        assert answer.get_json()["status"] == status
    assert client.post("/healthz").status_code == 405


def test_an_empty_q_is_called_empty_not_missing(srv_module):
    client = srv_module.app.test_client()
    assert client.get("/lookup").get_json()["error"] == "missing query parameter q"
    for url in ("/lookup?q=", "/lookup?q=%20"):
        assert client.get(url).get_json()["error"] == "empty query parameter q"


# -- hotswap/inside/wsgi.py: the app spec and the default generation -----------------------------
@pytest.mark.parametrize("spec", ["pkg.mod:", ":app", "pkg..mod:app", "pkg.mod:a-b", ""])
def test_app_specs_that_name_nothing_are_refused(spec: str):
    with pytest.raises(wsgi.EntryError):
        wsgi.parse_target(spec)


def test_app_specs():
    assert wsgi.parse_target("pkg.mod:make()") == ("pkg.mod", "make", True)
    assert wsgi.parse_target("pkg.mod") == ("pkg.mod", "application", False)


def test_the_default_generation_covers_the_whole_top_level_package(tmp_path: Path):
    package = tmp_path / "myapp"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__.py", "wsgi.py", "views.py", "sub/__init__.py"):
        (package / name).write_text("x = 1\n")
    before = wsgi.source_digest(package / "wsgi.py")
    assert wsgi.source_digest(package / "sub" / "__init__.py") == before
    (package / "views.py").write_text("x = 2\n")
    assert wsgi.source_digest(package / "wsgi.py") != before
