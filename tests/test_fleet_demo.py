"""`make fleet-demo`, as docs/fleet.md shows it, in a short form: 3 hosts, small tables.

The demo is a documented command; this keeps it from breaking unseen (it once did, when
srv.py began to serve from a store by default and the demo's hosts had only terms.tsv).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import REPO

from hotswap.system import procs
from scripts.fleet_demo import BIN, TABLE_HEAD

pytestmark = pytest.mark.skipif(
    not (BIN / "ansible-playbook").exists(),
    reason="ansible-core is not installed (make test installs the fleet extra)",
)
DEMO_TIMEOUT = 900


@pytest.mark.slow
@pytest.mark.timeout(DEMO_TIMEOUT + 60)
def test_make_fleet_demo_rolls_three_releases_and_loses_nothing():
    # not tmp_path: under pytest-xdist its path is long enough that a host's
    # run/http.sock passes the 102 bytes uWSGI binds ("invalid socket name", seen)
    workdir = tempfile.mkdtemp(prefix="fleet-demo-", dir="/tmp")
    try:
        check_demo(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def check_demo(workdir: str) -> None:
    demo = subprocess.Popen(
        ["make", "-s", "-C", str(REPO), "fleet-demo",
         # two batches, [host1] then [host2, host3]: each batch costs Ansible's time
         f"FLEET_ARGS=--hosts 3 --terms 2000 --batches '[1, 2]' --workdir {workdir}/demo"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = demo.communicate(timeout=DEMO_TIMEOUT)
    finally:
        if demo.poll() is None:
            procs.kill_group(demo.pid, signal.SIGKILL)
            demo.wait(timeout=30)
    assert demo.returncode == 0, out[-6000:]
    assert out.rstrip().endswith("fleet-demo: ok"), out[-6000:]
    for step, code in (("release v2", 0), ("release v2 again (idempotent)", 0),
                       ("release v3, broken on host2", 2)):
        assert f"==== {step}: exit {code} (as expected)" in out, out[-6000:]
    # the second run swapped nothing on any host
    second = out.split("==== release v2 again")[1].split("==== release v3")[0]
    assert second.count('"msg": "already serves release ') == 3, second[-4000:]
    assert TABLE_HEAD in out
    for host in ("host1", "host2", "host3"):
        assert f"fleet-demo: {host}: " in out and " 0 failed " in out.split(
            f"fleet-demo: {host}: ")[-1].splitlines()[0], out[-3000:]
    # the store's app side wrote into the layout's run/, never into a release (which must
    # stay as shipped, or the next run's --if-changed would find it changed)
    assert not list((Path(workdir) / "demo" / "hosts").glob("*/releases/*/run"))
    # the demo stopped every host it started
    pidfiles = list((Path(workdir) / "demo" / "hosts").glob("*/run/master.pid"))
    assert not [p for p in pidfiles if procs.alive(procs.read_pidfile(p))]
