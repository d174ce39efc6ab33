"""Every socket a re-fork inherits swaps: a TCP `http-socket`, a service whose only socket is
`socket =` (the uwsgi protocol) behind a real nginx `uwsgi_pass`; the probe speaks both
protocols; drift detection sees a changed TCP port (real uWSGI and nginx throughout)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from app_util import InitProject, plain_project
from test_nginx import NGINX, free_port, nginx_in_front

from bench.loadgen import LoadGenerator, summarize
from hotswap import config
from hotswap.protocol import endpoint
from hotswap.protocol.endpoint import UWSGI, Endpoint
from hotswap.service import instance
from hotswap.swap import probe
from hotswap.system import procs

CONNECTIONS = 32
RELOADS = 3


# -- units ---------------------------------------------------------------------------------
def test_endpoints_parse_as_uwsgi_reads_them():
    assert Endpoint.parse("/run/x/http.sock").path == Path("/run/x/http.sock")
    tcp = Endpoint.parse("127.0.0.1:8000")
    assert tcp.is_tcp and tcp.path is None and tcp.host_port == ("127.0.0.1", 8000)
    assert Endpoint.parse(":8000").host_port == ("127.0.0.1", 8000)  # uWSGI: every address
    assert Endpoint.parse("0.0.0.0:8000").host_port == ("127.0.0.1", 8000)
    assert Endpoint.parse("[::1]:8000").host_port == ("::1", 8000)
    assert Endpoint.parse("run/uwsgi.sock", "socket").protocol == UWSGI
    assert Endpoint.parse("@abstract").path is None and not Endpoint.parse("@abstract").is_tcp


def test_the_probed_socket_is_http_first_unless_the_ini_names_one():
    values = {"socket": ["/r/uwsgi.sock"], "http-socket": ["127.0.0.1:9000"]}
    assert endpoint.from_values(values)[0].address == "127.0.0.1:9000"
    assert endpoint.from_values({"socket": ["/r/u.sock"]})[0].protocol == UWSGI
    named = endpoint.from_values(values, "/r/uwsgi.sock")
    assert [item.address for item in named] == ["/r/uwsgi.sock", "127.0.0.1:9000"]
    with pytest.raises(ValueError, match="names none of the ini's sockets"):
        endpoint.from_values(values, "/elsewhere.sock")


def test_uwsgi_packet_is_header_then_sized_vars():
    packet = probe.uwsgi_packet("/healthz?x=1")
    modifier1, size, modifier2 = struct.unpack("<BHB", packet[:4])
    assert (modifier1, modifier2, size) == (0, 0, len(packet) - 4)
    pairs, rest = {}, packet[4:]
    while rest:
        (klen,) = struct.unpack("<H", rest[:2])
        key, rest = rest[2:2 + klen], rest[2 + klen:]
        (vlen,) = struct.unpack("<H", rest[:2])
        pairs[key.decode()], rest = rest[2:2 + vlen].decode(), rest[2 + vlen:]
    assert pairs["PATH_INFO"] == "/healthz" and pairs["QUERY_STRING"] == "x=1"


def test_a_tcp_socket_is_missing_not_stale_when_nothing_runs():
    where = Endpoint.parse("127.0.0.1:9")
    assert instance.socket_state(where, master=False, answered=False) == "missing"
    assert instance.socket_state(where, master=True, answered=False) == "no answer"


def test_proc_tcp_addresses_decode():
    assert procs._tcp_address("0100007F:1F40") == "127.0.0.1:8000"
    assert procs._tcp_address("00000000000000000000000001000000:1F40") == "[::1]:8000"


def test_an_ini_without_any_socket_is_refused(tmp_path: Path):
    ini = tmp_path / "x.ini"
    ini.write_text("[uwsgi]\nrun_dir = %d\nfifo_live = a\nfifo_standby = b\npidfile = p\n"
                   "stats = s\nlogto = l\n")
    with pytest.raises(config.HotswapError, match="http-socket or socket or uwsgi-socket"):
        config.load(ini)


# -- real services -------------------------------------------------------------------------
def with_sockets(project: InitProject, lines: str) -> None:
    """Replace the ini's http-socket line with `lines` (what a user's ini binds instead)."""
    text = project.ini.read_text()
    project.ini.write_text(re.sub(r"^http-socket = .*$", lines, text, count=1, flags=re.M))


def swaps_under_load(project: InitProject, target) -> None:
    """3 releases under 32 connections to `target`, 0 failed, a new master each time, and
    `status` exit 0 before and after."""
    assert project.cli("status").returncode == 0
    health = project.health()
    with LoadGenerator(target, CONNECTIONS, project.paths, max_seconds=240) as load:
        for n in range(2, RELOADS + 2):
            project.release_app(f"r{n}")
            done = project.cli("reload", "--json")
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout)
            project.seen_masters.add(result["new_master"])
            after = project.health()
            assert after["master_pid"] == result["new_master"] != health["master_pid"]
            health = after
    summary = summarize(load.records)
    assert summary["failed"] == 0, summary
    assert len(summary["generations"]) == RELOADS + 1, summary
    assert project.cli("status").returncode == 0


def swaps_behind_uwsgi_pass(project: InitProject, sock: Path) -> None:
    """swaps_under_load() through a real nginx with deploy/nginx-uwsgi-site.conf."""
    port = free_port()
    with nginx_in_front(project, port, site_name="nginx-uwsgi-site.conf",
                        shipped_socket="/run/hotswap/uwsgi.sock", socket=str(sock)):
        swaps_under_load(project, ("127.0.0.1", port))


@pytest.fixture
def tcp_project(tmp_path: Path):
    project = plain_project(tmp_path)
    port = free_port()
    with_sockets(project, f"http-socket = 127.0.0.1:{port}")
    project.socket = f"127.0.0.1:{port}"
    try:
        project.start()
        yield project, port
    finally:
        project.teardown()


@pytest.mark.slow
def test_tcp_http_socket_swaps_under_load(tcp_project):
    project, port = tcp_project
    status = json.loads(project.cli("status", "--json").stdout)
    assert status["socket"] == f"127.0.0.1:{port}" and status["socket_state"] == "listening"
    assert project.cli("probe").returncode == 0
    swaps_under_load(project, ("127.0.0.1", port))


def test_a_changed_tcp_port_is_refused_before_forking(tcp_project):
    project, port = tcp_project
    master = project.master()
    text = project.ini.read_text()
    other = free_port()
    project.ini.write_text(text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{other}"))
    # without start's record, the port the master holds is read from /proc/net/tcp
    (project.run_dir / "instance.json").unlink()
    done = project.cli("reload")
    assert done.returncode == 2, done.stderr
    assert f"http-socket changed in the ini (127.0.0.1:{port} -> 127.0.0.1:{other})" \
        in done.stderr
    assert project.master() == master
    project.ini.write_text(text)


@pytest.mark.slow
@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")
def test_only_a_uwsgi_socket_swaps_behind_nginx_uwsgi_pass(tmp_path: Path):
    project = plain_project(tmp_path)
    sock = project.run_dir / "uwsgi.sock"
    with_sockets(project, "socket = %(run_dir)/uwsgi.sock")
    project.socket = Endpoint(str(sock), UWSGI, "socket")  # the fixture's own probe
    try:
        project.start()
        status = json.loads(project.cli("status", "--json").stdout)
        assert status["socket_protocol"] == "uwsgi" and status["socket_state"] == "listening"
        assert "listening  run/uwsgi.sock (uwsgi protocol)" in project.cli("status").stdout
        probed = project.cli("probe")
        assert probed.returncode == 0 and probed.stdout.startswith("OK - GET /healthz -> 200")
        swaps_behind_uwsgi_pass(project, sock)
    finally:
        project.teardown()
