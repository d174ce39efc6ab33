"""deploy/hotswap.service under a REAL systemd: PID 1 of its own namespaces (tests/systemd_ns.py).

The module installs the service with deploy/install-systemd.sh into /opt/hotswap-test-<id>
(not /tmp: the unit has PrivateTmp=), boots a namespaced systemd on a unit folder holding the
rendered unit, runs the tests in order (start, reloads under load, a broken release, stop),
then stops that systemd by its pid and removes the prefix and, if it created it, the user.

Runs as root only (a system manager, a system user); skips with the reason elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from systemd_ns import NamespaceSystemd, unavailable_reason, wait_for  # noqa: E402

from bench.loadgen import LoadGenerator, request_once, summarize  # noqa: E402
from hotswap.swap import probe  # noqa: E402
from hotswap.system import stats  # noqa: E402
from scripts.gen_resource import write_resource  # noqa: E402

UNIT = "hotswap.service"
SERVICE_USER = "hotswap"
TERMS = 200_000  # imports in well under a second: the tests measure the swap, not the load
CONNECTIONS = 32
RUN_DIR = "/run/hotswap"  # RuntimeDirectory=hotswap

_REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"namespaced systemd: {_REASON}")


@dataclass
class Deployment:
    prefix: Path
    unit_dir: Path
    install_seconds: float

    @property
    def resource(self) -> Path:
        return self.prefix / "app" / "data" / "terms.tsv"

    def release(self, version: str, corrupt: bool = False) -> None:
        """Put a new data release in place (atomically), as an operator would."""
        write_resource(str(self.resource), TERMS, seed=3, version=version)
        if corrupt:
            # Same header, one body byte changed: srv.py refuses it (checksum) at import.
            raw = bytearray(self.resource.read_bytes())
            raw[-2] = ord("x") if raw[-2] != ord("x") else ord("y")
            tmp = self.resource.with_name("terms.tsv.corrupt")
            tmp.write_bytes(bytes(raw))
            os.replace(tmp, self.resource)
        os.chmod(self.resource, 0o644)


def _user_exists(name: str) -> bool:
    return subprocess.run(["getent", "passwd", name], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def deployment():
    prefix = Path(f"/opt/hotswap-test-{uuid.uuid4().hex[:8]}")
    unit_dir = prefix / "units"
    user_existed = _user_exists(SERVICE_USER)
    try:
        started = time.monotonic()
        done = subprocess.run(
            ["bash", str(REPO / "deploy" / "install-systemd.sh"), str(prefix), str(unit_dir)],
            capture_output=True, text=True, timeout=900,
            env=dict(os.environ, HOTSWAP_NO_DAEMON_RELOAD="1"),
        )
        assert done.returncode == 0, f"install failed:\n{done.stdout}\n{done.stderr}"
        deployment = Deployment(prefix, unit_dir, time.monotonic() - started)
        deployment.release("v1")
        # The test-only /sleep route (for the drain test), through a drop-in as an operator
        # would add any local setting; the unit itself stays as installed.
        dropin = unit_dir / f"{UNIT}.d"
        dropin.mkdir()
        # these tests release heap tables (data/terms.tsv); test_store.py covers store mode
        (dropin / "test-routes.conf").write_text(
            "[Service]\nEnvironment=SRV_TEST_ROUTES=1\nEnvironment=SRV_MODE=heap\n")
        yield deployment
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
        if not user_existed and _user_exists(SERVICE_USER):
            subprocess.run(["userdel", SERVICE_USER], check=False)


@pytest.fixture(scope="module")
def systemd(deployment: Deployment):
    manager = NamespaceSystemd(deployment.unit_dir, deployment.prefix / "ns")
    manager.start()
    try:
        yield manager
    finally:
        launcher = manager.launcher
        manager.stop()
        assert launcher is not None and launcher.poll() is not None, "systemd still running"
        assert not manager.cgroup_pids(), "processes left in the manager's cgroup"


# -- helpers ------------------------------------------------------------------------------


def socket_path(sd: NamespaceSystemd) -> str:
    return sd.host_path(f"{RUN_DIR}/http.sock")


def healthz(sd: NamespaceSystemd) -> dict:
    answer = probe.get(socket_path(sd), "/healthz", 5.0)
    assert answer.status == 200, answer
    return json.loads(answer.body)


def unit_state(sd: NamespaceSystemd) -> dict[str, str]:
    return sd.show(UNIT, "ActiveState", "SubState", "MainPID", "StatusText", "Result")


def assert_serving(sd: NamespaceSystemd, generation: str | None = None) -> dict:
    """Active, and MainPID is the master that answers (every worker we reach agrees)."""
    state = unit_state(sd)
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    answers = [healthz(sd) for _ in range(8)]
    masters = {a["master_pid"] for a in answers}
    assert masters == {int(state["MainPID"])}, (state, masters)
    if generation is not None:
        assert {a["resource_version"] for a in answers} == {generation}, answers
        assert generation in state["StatusText"], state
    return answers[0]


def timed_reload(sd: NamespaceSystemd) -> tuple[subprocess.CompletedProcess, float, float]:
    started = time.monotonic()
    result = sd.systemctl("reload", UNIT, check=False, timeout=300)
    return result, time.monotonic() - started, time.time()


def assert_no_failures(records, what: str) -> dict:
    summary = summarize(records)
    assert summary["requests"] > 0, f"{what}: the load generator sent nothing"
    assert summary["failed"] == 0, f"{what}: {summary}"
    return summary


def diagnostics(sd: NamespaceSystemd) -> str:
    journal = sd.journal(UNIT, lines=80)
    log = sd.nsenter("tail", "-n", "40", "/var/log/hotswap/uwsgi.log", check=False).stdout
    return f"--- journal ---\n{journal}\n--- uwsgi.log ---\n{log}"


# -- the unit file ------------------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(deployment: Deployment):
    # A folder holding only the rendered unit: its dependencies resolve against the
    # machine's real units, not the test's stubs.
    folder = deployment.prefix / "verify"
    folder.mkdir(exist_ok=True)
    shutil.copy(deployment.unit_dir / UNIT, folder / UNIT)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(folder / UNIT)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert UNIT not in done.stderr, done.stderr  # no warning about our unit
    # an OOM kill of the loading generation must not stop the unit (docs/memory.md)
    assert "\nOOMPolicy=continue\n" in (folder / UNIT).read_text()


def test_security_exposure_is_ok_or_better(deployment: Deployment):
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager",
         str(deployment.unit_dir / UNIT)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", done.stdout)
    assert match, done.stdout[-2000:]
    exposure, band = float(match.group(1)), match.group(2)
    print(f"\nsystemd-analyze security --offline=true: {exposure} {band}")
    assert band in ("SAFE", "OK"), done.stdout


# -- the service under systemd ------------------------------------------------------------


def test_start_reports_the_serving_master(systemd: NamespaceSystemd):
    result = systemd.systemctl("start", UNIT, check=False, timeout=300)
    assert result.returncode == 0, result.stderr + diagnostics(systemd)
    health = assert_serving(systemd, generation="v1")
    status = systemd.show(UNIT, "StatusText")["StatusText"]
    assert f"(master {health['master_pid']})" in status, status


def test_three_reloads_under_load(systemd: NamespaceSystemd, deployment: Deployment):
    before = assert_serving(systemd)
    masters = [before["master_pid"]]
    load = LoadGenerator(socket_path(systemd), connections=CONNECTIONS, max_seconds=120)
    load.start()
    try:
        # let every connection get going before the first swap
        wait_for(lambda: len(load.records) >= 4 * CONNECTIONS, 30, "load to start")
        swaps = []  # (wall time the reload began, wall time it returned, new master, s)
        for n, version in enumerate(("v2", "v3", "v4"), start=1):
            deployment.release(version)
            began = time.time()
            result, seconds, done_at = timed_reload(systemd)
            assert result.returncode == 0, (
                f"reload {n} failed:\n{result.stderr}\n{diagnostics(systemd)}"
            )
            health = assert_serving(systemd, generation=version)
            assert health["master_pid"] not in masters, "the master did not change"
            masters.append(health["master_pid"])
            swaps.append((began, done_at, health["master_pid"], seconds))
            # keep the load on the new generation for a while before the next swap
            count = len(load.records)
            wait_for(lambda c=count: len(load.records) >= c + 2 * CONNECTIONS, 30, "traffic")
    finally:
        records = load.stop()
    summary = assert_no_failures(records, "3 reloads under load")
    # `systemctl reload` is synchronous: whatever connected after it returned (and before the
    # next reload began) was served by the new master.
    for i, (_, done_at, master, _) in enumerate(swaps):
        until = swaps[i + 1][0] if i + 1 < len(swaps) else float("inf")
        window = [r for r in records if done_at < r.started < until]
        assert window, f"no request between reload {i + 1} and the next"
        assert {r.master_pid for r in window} == {master}, (i + 1, master, summarize(window))
    print(f"\n3 reloads under {CONNECTIONS} connections: {summary['requests']} requests, "
          f"0 failed, reload times {[round(sw[3], 2) for sw in swaps]} s")
    # the generation that serves is back at the unit's own oom_score_adj (docs/memory.md)
    scores = systemd.nsenter("cat", f"/proc/{masters[-1]}/oom_score_adj",
                             f"{RUN_DIR}/oom_score_adj").stdout.split()
    assert scores[0] == scores[1] != "1000", scores


def test_broken_release_keeps_the_old_master(systemd: NamespaceSystemd, deployment: Deployment):
    before = assert_serving(systemd)
    old_main = int(systemd.show(UNIT, "MainPID")["MainPID"])
    load = LoadGenerator(socket_path(systemd), connections=CONNECTIONS, max_seconds=120)
    load.start()
    try:
        wait_for(lambda: len(load.records) >= 4 * CONNECTIONS, 30, "load to start")
        deployment.release("v5-broken", corrupt=True)
        result, _, _ = timed_reload(systemd)
        assert result.returncode != 0, "systemctl reload succeeded on a corrupt release"
        state = unit_state(systemd)
        assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
        assert int(state["MainPID"]) == old_main, state
        after = assert_serving(systemd, generation=before["resource_version"])
        assert after["master_pid"] == old_main
        journal = systemd.journal(UNIT, lines=60)
        assert "checksum mismatch" in journal or "FAILED" in journal, journal

        # the fixed release then goes through
        deployment.release("v6")
        result, _, _ = timed_reload(systemd)
        assert result.returncode == 0, result.stderr + diagnostics(systemd)
        fixed = assert_serving(systemd, generation="v6")
        assert fixed["master_pid"] != old_main
    finally:
        records = load.stop()
    assert_no_failures(records, "broken then fixed release under load")


# A release whose import blocks on a FIFO until the test opens it (or forever): the app
# folder is read-only to the service, so unlike the conftest one it records nothing.
GATED_PREAMBLE = """\
import os as _os
with open(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "release.go")) as _g:
    _g.read()
"""


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def test_reload_killed_by_its_timeout_leaves_the_unit_serving(
        systemd: NamespaceSystemd, deployment: Deployment):
    """ExecReload= overruns TimeoutStartSec=: systemd kills `hotswap reload` mid-load. The
    unit stays active on the old master, and the next `systemctl reload` repairs what the
    killed one left (a master loading, the old one parked) and swaps."""
    before = assert_serving(systemd)
    old_main = int(systemd.show(UNIT, "MainPID")["MainPID"])
    app = deployment.prefix / "app"
    good_source = (app / "srv.py").read_text()
    gate = app / "release.go"
    dropin = deployment.unit_dir / f"{UNIT}.d" / "short-timeout.conf"
    load = LoadGenerator(socket_path(systemd), connections=CONNECTIONS, max_seconds=180)
    load.start()
    try:
        wait_for(lambda: len(load.records) >= 4 * CONNECTIONS, 30, "load to start")
        dropin.write_text("[Service]\nTimeoutStartSec=5\n")
        systemd.systemctl("daemon-reload")
        os.mkfifo(gate, 0o644)
        _replace(app / "srv.py", GATED_PREAMBLE + good_source.replace(
            "from __future__ import annotations\n", ""))
        result, seconds, _ = timed_reload(systemd)
        assert result.returncode != 0, "the hung reload did not time out"
        # journald may write systemd's own line a moment after `systemctl reload` returns
        # (seen in a fresh-clone run): poll for it
        wait_for(lambda: "timed out" in systemd.journal(UNIT, lines=80).lower(), 30,
                 "systemd's 'timed out' line in the journal")
        after = assert_serving(systemd, generation=before["resource_version"])
        assert after["master_pid"] == old_main == int(systemd.show(UNIT, "MainPID")["MainPID"])

        dropin.unlink()
        systemd.systemctl("daemon-reload")
        _replace(app / "srv.py", good_source)
        gate.unlink()  # the hung master stays blocked: the next reload must clear it
        deployment.release("v7")
        result, _, _ = timed_reload(systemd)
        assert result.returncode == 0, result.stderr + diagnostics(systemd)
        fixed = assert_serving(systemd, generation="v7")
        assert fixed["master_pid"] != old_main
        assert "repaired" in systemd.journal(UNIT, lines=80)
    finally:
        records = load.stop()
        dropin.unlink(missing_ok=True)
        gate.unlink(missing_ok=True)
        _replace(app / "srv.py", good_source)
    assert_no_failures(records, "a reload killed by systemd, then a good one")
    print(f"\nreload killed by TimeoutStartSec=5 after {seconds:.1f} s; the next one repaired")


def _busy_workers(sd: NamespaceSystemd) -> int:
    document = stats.read(Path(sd.host_path(f"{RUN_DIR}/stats.sock")))
    return sum(1 for w in stats.workers(document or {}) if w["status"] == "busy")


def test_stop_lets_the_in_flight_request_finish(systemd: NamespaceSystemd):
    assert_serving(systemd)
    unit_pids = systemd.unit_pids(UNIT)
    assert unit_pids, "no process in the unit's cgroup"
    answer: dict = {}

    def slow_request() -> None:
        answer["record"] = request_once(socket_path(systemd), "/sleep?seconds=3", 30.0)

    thread = threading.Thread(target=slow_request)
    thread.start()
    try:
        wait_for(lambda: _busy_workers(systemd) >= 1, 10, "the slow request to be in flight")
        started = time.monotonic()
        result = systemd.systemctl("stop", UNIT, check=False, timeout=200)
        stop_seconds = time.monotonic() - started
    finally:
        thread.join(timeout=40)
    assert result.returncode == 0, result.stderr + diagnostics(systemd)
    record = answer.get("record")
    assert record is not None and record.outcome == "ok", record
    state = unit_state(systemd)
    assert (state["ActiveState"], state["Result"]) == ("inactive", "success"), state
    assert systemd.cgroup_pids(f"system.slice/{UNIT}") == []
    left = [pid for pid in unit_pids if os.path.exists(f"/proc/{pid}")]
    assert not left, f"processes of the unit left: {left}"
    assert not os.path.exists(systemd.host_path(RUN_DIR)), "RuntimeDirectory not removed"
    print(f"\nstop with a 3 s request in flight took {stop_seconds:.2f} s; request: "
          f"{record.outcome} in {record.latency:.2f} s")
