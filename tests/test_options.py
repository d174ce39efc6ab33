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
from app_util import InitProject, plain_project
from test_nginx import free_port
from test_sockets import swaps_under_load, with_sockets

from hotswap.service import checks
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
