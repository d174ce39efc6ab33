"""Bring your own app: apps that are not srv.py, set up only through `hotswap init`, swap with
zero lost requests; a broken release and a release failing its smoke check are refused; the
config checks of `hotswap start` refuse what breaks a swap (real uWSGI throughout)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from app_util import (
    CONNECTIONS,
    InitProject,
    flask_project,
    plain_project,
    reload_json,
    swaps_under_load,
)

from bench.loadgen import LoadGenerator, summarize
from hotswap import config
from hotswap.inside import wsgi
from hotswap.protocol.endpoint import Endpoint
from hotswap.service import checks

# more for a soak: HOTSWAP_APP_RELOADS=50 pytest tests/test_app.py -k plain
RELOADS = int(os.environ.get("HOTSWAP_APP_RELOADS", "5"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    project = plain_project(tmp_path_factory.mktemp("plain"))
    try:
        project.start()
        yield project
    finally:
        project.teardown()


@pytest.mark.slow
def test_plain_wsgi_function_swaps_under_load(plain: InitProject):
    swaps_under_load(plain, RELOADS)


@pytest.mark.slow
def test_flask_factory_app_swaps_under_load(tmp_path: Path):
    project = flask_project(tmp_path)
    try:
        health = project.start()
        assert set(health) >= {"status", "master_pid", "worker_pid", "generation",
                               "loaded_at", "load_seconds"}
        probe = project.cli("probe")
        assert probe.returncode == 0 and probe.stdout.startswith("OK - GET /-/ready -> 200")
        assert project.status()["generation"] == health["generation"]
        swaps_under_load(project, 2)
    finally:
        project.teardown()


@pytest.mark.slow
def test_an_ini_naming_the_old_paths_still_swaps(tmp_path: Path):
    """An srv.ini written by `hotswap init` before the layout by role names the entry point
    and the hook by their flat paths; the shims keep both working, swap included."""
    project = plain_project(tmp_path)
    ini = project.root / "srv.ini"
    text = ini.read_text()
    assert "hotswap.inside.entry:application" in text and "-m hotswap.inside.handover" in text
    ini.write_text(text.replace("hotswap.inside.entry", "hotswap.entry")
                   .replace("hotswap.inside.handover", "hotswap.handover"))
    try:
        project.start()
        swaps_under_load(project, 2)
    finally:
        project.teardown()


def refused_under_load(project: InitProject, cause: str) -> None:
    """Reload the release on disk under load: refused with `cause`, the old generation
    serving, and not one answer a client saw other than 2xx."""
    before = project.health()
    with LoadGenerator(str(project.socket), CONNECTIONS, project.paths, max_seconds=120) as load:
        code, result, stderr = reload_json(project)
    assert code == 1, (result, stderr)
    assert result["rolled_back"] and cause in result["message"], result
    summary = summarize(load.records)
    assert summary["requests"] > 0 and summary["failed"] == 0, summary
    assert summary["generations"] == [before["generation"]], summary
    after = project.health()
    assert after["master_pid"] == before["master_pid"]
    assert project.status()["fifos"]["standby"]["state"] == "missing"


@pytest.mark.slow
def test_broken_release_is_rolled_back(plain: InitProject):
    plain.release_app("r-broken", append="\nraise RuntimeError('price list r-broken unreadable')\n")
    try:
        refused_under_load(plain, "RuntimeError: price list r-broken unreadable")
    finally:
        plain.release_app("r-fixed")


@pytest.mark.slow
def test_release_failing_a_smoke_check_never_serves(plain: InitProject):
    plain.release_app("r-500", broken_item=True)  # imports fine; /item answers 500
    try:
        refused_under_load(plain, "SmokeError: smoke check GET /item?k=k1 -> 200 answered "
                                  "500 Internal Server Error")
    finally:
        plain.release_app("r-fixed")
    code, result, stderr = reload_json(plain)
    assert code == 0, (result, stderr)


# -- hotswap start's config checks -------------------------------------------------------

BAD_CONFIGS = {
    "no need-app": (("need-app = true", ""), "does not set need-app = true"),
    "vacuum": (("vacuum = false", "vacuum = true"), "sets vacuum = true"),
    "tcp stats": (("stats = %(run_dir)/stats.sock", "stats = 127.0.0.1:19191"),
                  "has a TCP stats socket (127.0.0.1:19191)"),
    "no hook": (("hook-accepting = ", "; hook-accepting = "), "has no hook-accepting"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_start_refuses_a_config_that_breaks_the_swap(plain: InitProject, name: str):
    (old, new), message = BAD_CONFIGS[name]
    text = plain.ini.read_text()
    assert old in text
    bad = plain.root / f"bad-{name.replace(' ', '-')}.ini"
    bad.write_text(text.replace(old, new, 1))
    done = plain.cli("--ini", str(bad), "start", "--supervise", timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("hotswap: refusing to start: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_config_checks_see_what_uwsgi_sees(plain: InitProject):
    """The values the checks read come from uWSGI itself; the version check on its own."""
    cfg = config.load(plain.ini)
    values = config.read_keys(cfg, checks.KEYS)
    assert values["need-app"] == "true" and values["stats"] == str(cfg.stats_socket)
    assert checks.problems(cfg, checks.uwsgi_version(cfg.uwsgi), values) == []
    old = checks.problems(cfg, (2, 0, 30), values)
    assert len(old) == 1 and "uWSGI 2.0.30" in old[0] and "older than 2.0.31" in old[0]


def test_start_refuses_a_unix_socket_path_uwsgi_cannot_bind(plain: InitProject):
    """uWSGI binds a unix socket path of 102 bytes and refuses 103 ("invalid socket name",
    then nothing serves): start says so in one line, before anything runs."""
    cfg = config.load(plain.ini)
    values = config.read_keys(cfg, checks.KEYS)
    version = checks.uwsgi_version(cfg.uwsgi)
    for length, refused in ((checks.MAX_UNIX_PATH, False), (checks.MAX_UNIX_PATH + 1, True)):
        path = "/tmp/" + "s" * (length - len("/tmp/.sock")) + ".sock"
        long = dataclasses.replace(cfg, sockets=(Endpoint.parse(path),))
        found = checks.problems(long, version, values)
        assert bool(found) is refused, found
        if refused:
            assert f"http-socket = {path}: {length} bytes" in found[0], found
    text = plain.ini.read_text()
    deep = plain.root / ("d" * 90)
    bad = plain.root / "long-socket.ini"
    bad.write_text(text.replace("%(run_dir)/http.sock", f"{deep}/http.sock", 1))
    done = plain.cli("--ini", str(bad), "start", "--supervise", timeout=60)
    assert done.returncode == 2, done.stderr
    assert "longer than the 102 a unix socket path may have" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# -- hotswap init ---------------------------------------------------------------------------

def test_init_refuses_to_overwrite_and_renders_the_unit(plain: InitProject):
    unit = (plain.root / "hotswap.service").read_text()
    assert f"WorkingDirectory={plain.root}" in unit and "@PREFIX@" not in unit
    assert f"--ini {plain.root}/srv.ini reload" in unit
    assert f"ReadWritePaths={plain.root}/run {plain.root}/log" in unit
    before = plain.ini.read_text()
    again = plain.init("--app", "plainapp:application")
    assert again.returncode == 2 and "--force overwrites" in again.stderr
    assert plain.ini.read_text() == before
    bad = plain.init("--app", "not a module", "--force")
    assert bad.returncode == 2 and "expected package.module:callable" in bad.stderr
    forced = plain.init("--app", "plainapp:application", "--force")
    assert forced.returncode == 0 and plain.ini.read_text() == before
    if shutil.which("systemd-analyze"):
        folder = plain.root / "verify"  # the unit alone: deps resolve against real units
        folder.mkdir(exist_ok=True)
        shutil.copy(plain.root / "hotswap.service", folder / "hotswap.service")
        verify = subprocess.run(["systemd-analyze", "verify", "--man=no",
                                 str(folder / "hotswap.service")],
                                capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0 and "hotswap.service" not in verify.stderr, verify


@pytest.mark.parametrize("flag", [("--socket",), ("--socket-tcp", "127.0.0.1:8391")])
def test_init_with_a_socket_unit_matches_the_inis_socket(tmp_path: Path, flag: tuple[str, ...]):
    """`hotswap init --socket` / `--socket-tcp HOST:PORT` also writes hotswap.socket:
    ListenStream= is the ini's socket as uWSGI reads it (uWSGI matches the passed fd to its
    line by that address), the ini speaks `protocol = http`, the service requires the unit."""
    (tmp_path / "tinyapp.py").write_text("def application(environ, start_response):\n"
                                         "    start_response('200 OK', [])\n    return [b'']\n")
    done = subprocess.run([sys.executable, "-m", "hotswap", "init", "--dir", str(tmp_path),
                           "--app", "tinyapp:application", *flag],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote hotswap.socket" in done.stdout.splitlines(), done.stdout
    sock = (tmp_path / "hotswap.socket").read_text()
    listen = [line.split("=", 1)[1] for line in sock.splitlines()
              if line.startswith("ListenStream=")]
    cfg = config.load(tmp_path / "srv.ini")  # what uWSGI itself reads from the ini
    assert listen == [cfg.socket.address], (listen, cfg.socket)
    assert "protocol = http" in cfg.ini.read_text().splitlines()
    unit = (tmp_path / "hotswap.service").read_text()
    assert "Requires=hotswap.socket" in unit and "After=hotswap.socket" in unit
    assert "@" not in sock.replace("@USER@", "?").split("[Unit]", 1)[1], sock
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", "--man=no",
                                 str(tmp_path / "hotswap.socket")],
                                capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0 and "hotswap.socket:" not in verify.stderr, verify


def test_init_refuses_a_socket_tcp_that_is_no_address(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "hotswap", "init", "--dir", str(tmp_path),
                           "--app", "tinyapp:application", "--socket-tcp", "8080"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2, done
    assert done.stderr.strip().splitlines() == [
        "hotswap: --socket-tcp needs HOST:PORT (e.g. 127.0.0.1:8080), not '8080'"], done.stderr


# -- the middleware on its own (no uWSGI) -------------------------------------------------

def call(app, path: str) -> tuple[str, dict, bytes]:
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": ""},
                        start_response))
    return seen["status"], seen["headers"], body


def test_middleware_health_contract_and_readiness_hook():
    def hello(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hi"]

    ready = {"ok": True}

    def readiness() -> dict:
        if not ready["ok"]:
            raise ConnectionError("database unreachable")
        return {"db": "up"}

    app = wsgi.wrap(hello, generation="g7", health=readiness, started=time.monotonic())
    status, headers, body = call(app, "/healthz")
    document = json.loads(body)
    assert status.startswith("200") and document["status"] == "ok" and document["db"] == "up"
    assert document["generation"] == "g7" and document["worker_pid"] == os.getpid()
    status, headers, body = call(app, "/anything")
    assert body == b"hi" and headers["X-Generation"] == "g7" and "X-Master-Pid" in headers
    ready["ok"] = False
    status, _, body = call(app, "/healthz")
    assert status.startswith("503")
    assert json.loads(body)["error"] == "ConnectionError: database unreachable"


def test_smoke_checks_parse_and_fail_the_import():
    assert wsgi.parse_smoke("GET /a?q=1 -> 200 | /b -> 404 | HEAD /c") == [
        wsgi.Smoke("/a?q=1", 200), wsgi.Smoke("/b", 404), wsgi.Smoke("/c", 200, "HEAD")]
    with pytest.raises(wsgi.SmokeError, match="cannot read"):
        wsgi.parse_smoke("GET a b c")

    def broken(environ, start_response):
        raise KeyError("tags")

    with pytest.raises(wsgi.SmokeError, match=r"smoke check GET /x -> 200 failed: KeyError"):
        wsgi.wrap(broken, smoke=[wsgi.Smoke("/x")])
