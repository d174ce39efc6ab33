"""uWSGI options that change a swap, each supported and swapped under load, or refused with one
line by `start`, `check` and `reload`: cheaper, max-requests, harakiri (supported); threads,
lazy-apps, the `http =` router, an Emperor (a real `uwsgi --emperor` with one vassal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from app_util import PLAIN_APP, InitProject, plain_project
from conftest import Service
from test_nginx import NGINX, free_port
from test_sockets import swaps_behind_uwsgi_pass, swaps_under_load, with_sockets

from hotswap.protocol.endpoint import UWSGI, Endpoint
from hotswap.service import adopt, checks
from hotswap.system import procs

TUNED = """\
cheaper = 1
cheaper-initial = 1
cheaper-step = 1
max-requests = 300
harakiri = 30
"""

REFUSED = {
    "threads": ("threads = 4", "sets threads = 4: the hand-over's pause"),
    "lazy-apps": ("lazy-apps = true", "sets lazy-apps = true: the app would import in each "
                  "worker"),
    "http router": ("http = 127.0.0.1:{port}", "sets http = 127.0.0.1:{port}: that router is "
                    "a process of its own"),
    "emperor": ("emperor = %dvassals", "runs uWSGI's Emperor"),
}


@pytest.fixture(scope="module")
def idle(tmp_path_factory) -> InitProject:
    """A project made by `init`, never started: what `check` reads."""
    return plain_project(tmp_path_factory.mktemp("idle"))


def test_check_lists_what_the_kit_supports(idle: InitProject):
    done = idle.cli("check")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("supported  sockets ") and "the kit probes" in done.stdout


@pytest.mark.parametrize("name", REFUSED)
def test_start_and_check_refuse_what_a_refork_breaks(idle: InitProject, name: str):
    port = free_port()
    line, message = (part.format(port=port) for part in REFUSED[name])
    bad = idle.root / f"bad-{name.replace(' ', '-')}.ini"
    bad.write_text(idle.ini.read_text() + line + "\n")
    checked = idle.cli("--ini", str(bad), "check")
    assert checked.returncode == 2, checked
    refused = [row for row in checked.stdout.splitlines() if row.startswith("refused")]
    assert len(refused) == 1 and message in refused[0], checked.stdout
    assert checked.stderr.startswith("hotswap: 1 refusal(s) in ") and \
        len(checked.stderr.splitlines()) == 1, checked.stderr
    started = idle.cli("--ini", str(bad), "start", "--supervise", timeout=60)
    assert started.returncode == 2 and message in started.stderr, started.stderr
    assert len(started.stderr.strip().splitlines()) == 1, started.stderr


@pytest.mark.slow
def test_cheaper_and_respawns_swap_under_load(tmp_path: Path):
    """cheaper 1..4 (workers spawned while a generation serves pass the gate),
    max-requests and harakiri (workers respawned during a swap): 3 swaps, 0 failed."""
    project = plain_project(tmp_path)
    with_sockets(project, f"http-socket = %(run_dir)/http.sock\n{TUNED}")
    checked = project.cli("check")
    assert checked.returncode == 0, checked.stderr
    for key in TUNED.splitlines():
        if key.split(" ")[0] in checks.SUPPORTED:
            assert f"supported  {key}: " in checked.stdout, checked.stdout
    try:
        project.start()
        swaps_under_load(project, str(project.socket))
    finally:
        project.teardown()


@pytest.mark.slow
def test_an_emperor_vassal_is_refused_before_forking(tmp_path: Path):
    """A re-forked vassal loses its emperor pipe (hotswap/swap/drift.py): reload refuses it,
    naming the Emperor, and the vassal keeps serving."""
    project = plain_project(tmp_path / "vassal")
    for folder in ("run", "log"):
        (project.root / folder).mkdir(exist_ok=True)
    env = dict(os.environ, HOTSWAP_PYTHON=sys.executable)
    emperor = subprocess.Popen(
        [str(Path(sys.executable).parent / "uwsgi"), "--emperor", str(project.root / "*.ini"),
         "--logto", str(tmp_path / "emperor.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        health = project.wait_ready()
        master = health["master_pid"]
        done = project.cli("reload")
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"hotswap: master {master} is a vassal of uWSGI's "
                                      f"Emperor (pid {emperor.pid})"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert project.health()["master_pid"] == master  # nothing forked, still serving
        assert procs.session_leaders_below(master) == []
        checked = project.cli("check")
        assert checked.returncode == 2 and "is a vassal of uWSGI's Emperor" in checked.stdout
    finally:
        doomed = [emperor.pid, *procs.descendants(emperor.pid)]
        procs.signal_quietly(emperor.pid, signal.SIGINT)  # the Emperor stops its vassals
        if not procs.wait_gone(doomed, 30):
            for pid in doomed:
                procs.signal_quietly(pid, signal.SIGKILL)
        emperor.wait(timeout=30)
        project.teardown()


# -- init --from: inis shaped like the ones teams run ---------------------------------------
SHOP = '''\
"""A Flask shop: its prices load at import."""
from flask import Flask

VERSION = "@VERSION@"
PRICES = {f"p{i}": i for i in range(5000)}
app = Flask(__name__)


@app.get("/price/<name>")
def price(name):
    return {"name": name, "price": PRICES.get(name), "version": VERSION}
'''
FLASK_UWSGI_PASS = """\
[uwsgi]
; the shop, behind nginx uwsgi_pass
chdir = %d
wsgi-file = shop.py
callable = app
socket = %drun/uwsgi.sock
chmod-socket = 660
master = true
processes = 2
vacuum = true
max-requests = 1000
daemonize = /var/log/shop.log
"""
PLAIN_TCP = """\
[uwsgi]
module = plainapp:application
http-socket = 127.0.0.1:{port}
master = true
processes = 2
harakiri = 30
pidfile = /tmp/plain.pid
"""
REFUSED_SHAPE = """\
[uwsgi]
module = plainapp:application
http = 127.0.0.1:{port}
master = true
processes = 2
threads = 4
lazy-apps = true
"""


class Adopted(InitProject):
    """A project whose srv.ini is `init --from` their ini (written beside it)."""

    def __init__(self, root: Path, source: str, module_path: str, theirs: str,
                 paths: tuple[str, ...]) -> None:
        Service.__init__(self, root, sample=False)  # not InitProject's: no `init --app`
        self.health_path, self.source, self.paths = "/healthz", source, paths
        self.module_file = root / module_path
        self.release_app("r1")
        (root / "uwsgi.ini").write_text(theirs)
        self.adopted = self.cli("init", "--from", str(root / "uwsgi.ini"))
        assert self.adopted.returncode == 0, self.adopted.stderr
        self.ini = root / "uwsgi.hotswap.ini"
        assert (root / "uwsgi.ini").read_text() == theirs  # never written over


@pytest.mark.slow
@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")
def test_init_from_a_flask_uwsgi_pass_ini_swaps_behind_nginx(tmp_path: Path):
    project = Adopted(tmp_path, SHOP, "shop.py", FLASK_UWSGI_PASS,
                      ("/healthz", *(f"/price/p{i}" for i in range(40))))
    said = project.adopted.stdout
    assert "hotswap-app = shop:app" in said and "vacuum = true -> the kit's contract" in said
    assert "daemonize = /var/log/shop.log -> " in said and "refused" not in said
    checked = project.cli("check")
    assert checked.returncode == 0 and "max-requests = 1000" in checked.stdout, checked
    sock = project.run_dir / "uwsgi.sock"
    project.socket = Endpoint(str(sock), UWSGI, "socket")
    try:
        project.start()
        swaps_behind_uwsgi_pass(project, sock)
    finally:
        project.teardown()


@pytest.mark.slow
def test_init_from_a_tcp_ini_serves_and_reloads(tmp_path: Path):
    port = free_port()
    project = Adopted(tmp_path, PLAIN_APP, "plainapp.py", PLAIN_TCP.format(port=port),
                      ("/healthz",))
    assert "pidfile = /tmp/plain.pid -> the kit's contract" in project.adopted.stdout
    assert project.cli("check").returncode == 0
    project.socket = f"127.0.0.1:{port}"
    try:
        first = project.start()
        assert project.cli("probe").returncode == 0
        project.release_app("r2")
        done = project.cli("reload")
        assert done.returncode == 0, done.stderr
        assert project.health()["master_pid"] != first["master_pid"]
        assert project.cli("status").returncode == 0
    finally:
        project.teardown()


def test_init_from_an_ini_the_kit_refuses_says_each_refusal(tmp_path: Path):
    port = free_port()
    theirs = REFUSED_SHAPE.format(port=port)
    project = Adopted(tmp_path, PLAIN_APP, "plainapp.py", theirs, ("/healthz",))
    refused = [line for line in project.adopted.stdout.splitlines()
               if line.startswith("refused")]
    assert [line.split()[1] for line in refused] == ["http", "threads", "lazy-apps"], refused
    checked = project.cli("--ini", str(tmp_path / "uwsgi.ini"), "check")
    assert checked.returncode == 2, checked  # their own ini has none of the kit's keys
    assert checked.stderr.strip().endswith("`hotswap init --from uwsgi.ini`)"), checked.stderr
    assert len(checked.stderr.splitlines()) == 1
    written = project.cli("check")
    assert written.returncode == 0, written.stdout
    assert "; hotswap: left out" in project.ini.read_text()


def test_their_app_becomes_hotswap_app(tmp_path: Path):
    (tmp_path / "web").mkdir()
    assert adopt.app_of({"module": ["site_.wsgi:application"]}, tmp_path) == \
        "site_.wsgi:application"
    assert adopt.app_of({"module": ["site_.wsgi"], "callable": ["app"]}, tmp_path) == \
        "site_.wsgi:app"
    assert adopt.app_of({"wsgi-file": ["web/main.py"]}, tmp_path) == "web.main:application"
    assert adopt.app_of({"wsgi-file": ["main.py"], "chdir": [str(tmp_path / "web")],
                         "callable": ["app"]}, tmp_path) == "main:app"
    with pytest.raises(adopt.HotswapError, match="names no app"):
        adopt.app_of({}, tmp_path)
