"""hotswap-watch.service beside hotswap.service under a REAL systemd (tests/systemd_ns.py).

deploy/install-systemd.sh, then deploy/install-releases.sh (the layout in PREFIX/site, the
drop-in that runs hotswap.service from it, the watch unit) into /opt/hotswap-rtest-<id>;
a namespaced systemd runs both units; a release dropped into PREFIX/site/drop is swapped in
by the watcher under load, with nothing lost. Root only; skips with the reason elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from systemd_ns import NamespaceSystemd, unavailable_reason, user_exists, wait_for  # noqa: E402

from bench.loadgen import LoadGenerator, summarize  # noqa: E402
from hotswap.swap import probe  # noqa: E402
from scripts.gen_resource import write_resource  # noqa: E402

SERVICE, WATCH = "hotswap.service", "hotswap-watch.service"
# not "hotswap": tests/test_systemd.py creates and removes that one, maybe at the same time
SERVICE_USER = "hotswap-rtest"
TERMS = 50_000

_REASON = unavailable_reason()
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=f"namespaced systemd: {_REASON}"),
              pytest.mark.slow]


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, HOTSWAP_NO_DAEMON_RELOAD="1",
                                   HOTSWAP_USER=SERVICE_USER))
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def prefix():
    prefix = Path(f"/opt/hotswap-rtest-{uuid.uuid4().hex[:8]}")
    user_existed = user_exists(SERVICE_USER)
    try:
        _run("bash", str(REPO / "deploy" / "install-systemd.sh"), str(prefix),
             str(prefix / "units"))
        resource = prefix / "app" / "data" / "terms.tsv"
        write_resource(str(resource), TERMS, seed=3, version="v1")
        os.chmod(resource, 0o644)
        (prefix / "units" / f"{SERVICE}.d").mkdir(exist_ok=True)
        (prefix / "units" / f"{SERVICE}.d" / "test-mode.conf").write_text(
            "[Service]\nEnvironment=SRV_MODE=heap\n")
        _run("bash", str(REPO / "deploy" / "install-releases.sh"), str(prefix),
             str(prefix / "units"))
        yield prefix
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
        if not user_existed and user_exists(SERVICE_USER):
            subprocess.run(["userdel", SERVICE_USER], check=False)


@pytest.fixture(scope="module")
def systemd(prefix: Path):
    with NamespaceSystemd(prefix / "units", prefix / "ns") as manager:
        yield manager
    assert not manager.cgroup_pids(), "processes left in the manager's cgroup"


def test_units_pass_systemd_analyze_verify(prefix: Path):
    folder = prefix / "verify"
    folder.mkdir()
    units = (SERVICE, WATCH, "hotswap-current.path", "hotswap-reload.service")
    for name in units:
        shutil.copy(prefix / "units" / name, folder / name)
    shutil.copytree(prefix / "units" / f"{SERVICE}.d", folder / f"{SERVICE}.d")
    done = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           *(str(folder / name) for name in units)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not [name for name in units if name in done.stderr], done.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                               str(folder / WATCH)], capture_output=True, text=True, timeout=60)
    assert "Overall exposure level for hotswap-watch.service" in security.stdout, security
    print("\n" + security.stdout.strip().splitlines()[-1])


def test_a_dropped_release_is_swapped_in_by_the_watch_unit(systemd: NamespaceSystemd,
                                                            prefix: Path):
    site = prefix / "site"
    socket = systemd.host_path("/run/hotswap/http.sock")
    systemd.systemctl("start", SERVICE, timeout=300)
    systemd.systemctl("start", WATCH)
    wait_for(lambda: "watching" in systemd.journal(WATCH), 30, "the watcher to start")
    first = probe.healthz(socket)
    assert first and first["resource_version"] == "v1", first

    # the release: a copy of the first, with a new table; staged under a dot name, then
    # renamed into the drop folder (complete when it appears)
    staged = site / ".v2.staging"
    shutil.copytree(site / "current", staged)
    write_resource(str(staged / "data" / "terms.tsv"), TERMS, seed=3, version="v2")
    subprocess.run(["chown", "-R", f"{SERVICE_USER}:{SERVICE_USER}", str(staged)], check=True)
    os.chmod(staged / "data" / "terms.tsv", 0o644)
    with LoadGenerator(socket, 32, ("/healthz",), max_seconds=240) as load:
        wait_for(lambda: len(load.records) >= 64, 30, "load to start")
        os.rename(staged, site / "drop" / "v2")
        wait_for(lambda: (h := probe.healthz(socket)) and h["resource_version"] == "v2",
                 180, f"v2 to serve; journal:\n{systemd.journal(WATCH)}")
        count = len(load.records)
        wait_for(lambda: len(load.records) >= count + 64, 30, "traffic after the swap")
    summary = summarize(load.records)
    assert summary["failed"] == 0, summary
    # serving comes first: the deploy then verifies, records, and the watcher logs it
    wait_for(lambda: f"deploy {site}/drop/v2: ok" in systemd.journal(WATCH), 60,
             "the watcher to log the deploy")
    state = systemd.show(SERVICE, "ActiveState", "MainPID")
    assert state["ActiveState"] == "active"
    assert probe.healthz(socket)["master_pid"] == int(state["MainPID"]), state
    assert os.readlink(site / "current").endswith("-v2")

    started = time.monotonic()
    systemd.systemctl("stop", WATCH)
    watch = systemd.show(WATCH, "ActiveState", "Result")
    assert watch == {"ActiveState": "inactive", "Result": "success"}, watch
    assert time.monotonic() - started < 30
    assert "stopped (SIGTERM)" in systemd.journal(WATCH)
    assert probe.healthz(socket), "stopping the watcher stopped the service"


def test_the_path_unit_reloads_on_the_stamp(systemd: NamespaceSystemd, prefix: Path):
    """The systemd-native alternative: flip `current` by hand, touch the stamp, and
    hotswap-current.path reloads. (The flip alone does not fire PathChanged=: see the unit.)"""
    site = prefix / "site"
    socket = systemd.host_path("/run/hotswap/http.sock")
    assert probe.healthz(socket)["resource_version"] == "v2"
    systemd.systemctl("start", "hotswap-current.path")
    first = next(p.name for p in sorted((site / "releases").iterdir()) if "-v2" not in p.name)
    with LoadGenerator(socket, 32, ("/healthz",), max_seconds=240) as load:
        wait_for(lambda: len(load.records) >= 64, 30, "load to start")
        os.symlink(f"releases/{first}", site / ".current.flip")
        os.replace(site / ".current.flip", site / "current")  # as `hotswap deploy` does
        (site / "state" / "release.stamp").touch()
        wait_for(lambda: (h := probe.healthz(socket)) and h["resource_version"] == "v1",
                 180, f"the reload; journal:\n{systemd.journal()}")
    assert summarize(load.records)["failed"] == 0
    # `systemctl reload` returns once the new generation serves and the old one is gone
    wait_for(lambda: systemd.show("hotswap-reload.service", "ActiveState")["ActiveState"]
             == "inactive", 60, "the reload unit to finish")
    reload = systemd.show("hotswap-reload.service", "Result", "ExecMainStatus")
    assert reload == {"Result": "success", "ExecMainStatus": "0"}, reload
    systemd.systemctl("stop", "hotswap-current.path")
    systemd.systemctl("stop", SERVICE, timeout=200)
