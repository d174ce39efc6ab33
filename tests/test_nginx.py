"""deploy/nginx-site.conf with a real nginx in front: reloads lose nothing through the proxy."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, Service

from bench.loadgen import LoadGenerator, request_once, summarize
from hotswap.system import procs

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(
    not Path(NGINX).exists(), reason="nginx is not installed (scripts/install-system-deps.sh)"
)


UWSGI_PARAMS = Path("/etc/nginx/uwsgi_params")  # Debian's nginx-common ships it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def render(service: Service, port: int, site_name: str = "nginx-site.conf",
           shipped_socket: str = "/run/hotswap/http.sock", socket: str | None = None) -> Path:
    """A shipped site, pointed at the test's socket and a loopback port, in a minimal
    top-level config that keeps every nginx file inside the test's folder."""
    site = (REPO / "deploy" / site_name).read_text()
    site = site.replace(f"unix:{shipped_socket}", f"unix:{socket or service.socket}")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    folder = service.root / "nginx"
    folder.mkdir()
    # `include uwsgi_params` is read beside nginx.conf (nginx's prefix is -c's folder)
    if UWSGI_PARAMS.exists():
        shutil.copy(UWSGI_PARAMS, folder / "uwsgi_params")
    (folder / "site.conf").write_text(site)
    temp_paths = "".join(
        f"    {kind}_temp_path {folder}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx's workers would run as nobody and could not open the test's 0660
    # socket inside a 0700 temp folder (in production: add www-data to group hotswap).
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = (
        f"{user}pid {folder}/nginx.pid;\nerror_log {folder}/error.log warn;\ndaemon off;\n"
        f"worker_processes 1;\nevents {{ worker_connections 1024; }}\n"
        f"http {{\n    access_log off;\n{temp_paths}    include {folder}/site.conf;\n}}\n"
    )
    (folder / "nginx.conf").write_text(main)
    return folder / "nginx.conf"


def test_sample_site_is_valid_nginx(service: Service):
    conf = render(service, free_port())
    check = subprocess.run([NGINX, "-t", "-c", str(conf)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stderr


@contextlib.contextmanager
def nginx_in_front(service: Service, port: int, **site):
    """A real nginx with a shipped site (render()'s arguments) on 127.0.0.1:port, answering;
    stopped by its process group."""
    conf = render(service, port, **site)
    nginx = subprocess.Popen([NGINX, "-c", str(conf)], stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        assert procs.wait_until(
            lambda: request_once(("127.0.0.1", port), "/healthz", 2.0).outcome == "ok", 30
        ), "nginx did not come up"
        yield nginx
    finally:
        procs.kill_group(nginx.pid, signal.SIGQUIT)  # nginx: graceful shutdown
        try:
            nginx.wait(timeout=20)
        except subprocess.TimeoutExpired:
            procs.kill_group(nginx.pid, signal.SIGKILL)
            nginx.wait(timeout=10)
        nginx.stderr.close()


def test_reloads_through_nginx_lose_nothing(service: Service):
    service.start()
    port = free_port()
    with nginx_in_front(service, port):
        with LoadGenerator(("127.0.0.1", port), 32, ("/healthz",), max_seconds=120) as load:
            for version in ("v2", "v3"):
                service.release(version=version)
                done = service.cli("reload")
                assert done.returncode == 0, done.stderr
                service.health()
        summary = summarize(load.records)
        assert summary["failed"] == 0, summary
        assert len(summary["generations"]) == 3, summary
