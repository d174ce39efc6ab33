"""deploy/ansible/rolling-release.yml with real Ansible against hotswap release layouts.

One fleet for the module: four hosts, each its own release layout (tests/releases_util.py's
LayoutService) under load over its unix socket for every rollout. host4 goes through a real
sshd on 127.0.0.1 when the test runs as root (else it is local like the others). The tests
run in file order and each starts from what the one before left:

  v1 everywhere -> v2 (good, then again: a no-op) -> v3 (breaks on host2: host1, host3 on
  v3; host2, host4 on v2) -> v4 with a gate nothing passes (host1 swaps and rolls back to v3)
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from releases_util import TERMS, LayoutService, lookup_paths

from bench.loadgen import LoadGenerator, summarize
from hotswap.system import procs
from scripts.fleet_demo import (
    BIN,
    NEEDED_FILE,
    ansible_env,
    make_release,
    playbook_argv,
    run_playbook,
    write_inventory,
)

pytestmark = pytest.mark.skipif(
    not (BIN / "ansible-playbook").exists(),
    reason="ansible-core is not installed (make test installs the fleet extra)",
)

HOSTS = ("host1", "host2", "host3", "host4")
BATCHES = [1, "50%", "100%"]  # 4 hosts: [host1], [host2, host3], [host4]
CONNECTIONS = 2  # per host: the machine has 2 cores and other suites run beside this one
ROLLOUT_TIMEOUT = 600
SSHD = Path("/usr/sbin/sshd")
WITH_SSH = SSHD.exists() and os.geteuid() == 0


class Fleet:
    """Hosts that are release layouts, v1 deployed and serving; releases built under ROOT."""

    def __init__(self, root: Path, host_vars: dict | None = None) -> None:
        self.root = root
        self.hosts: dict[str, LayoutService] = {}
        for name in HOSTS:
            (root / name).mkdir()
            self.hosts[name] = LayoutService(root / name)
        self.inventory = write_inventory(
            root / "inventory.yml", {name: svc.ini for name, svc in self.hosts.items()},
            host_vars)
        self.report = root / "report.json"

    def start(self) -> None:
        v1 = self.release("v1")
        for svc in self.hosts.values():
            done = svc.cli("deploy", str(v1))
            assert done.returncode == 0, done.stderr
            svc.start()

    def release(self, version: str, **options: bool) -> Path:
        return make_release(self.root / "releases" / version, version, TERMS, store=False,
                            **options)

    def masters(self) -> dict[str, int]:
        return {name: svc.health()["master_pid"] for name, svc in self.hosts.items()}

    def serving(self) -> dict[str, str]:
        """host -> the version that answers (the table's, so v1, v2...)."""
        return {name: svc.serving_name() for name, svc in self.hosts.items()}

    def roll(self, release: Path, batches: list = BATCHES,
             **extra: object) -> subprocess.CompletedProcess:
        loads = {name: LoadGenerator(str(svc.socket), CONNECTIONS, lookup_paths(svc),
                                     max_seconds=ROLLOUT_TIMEOUT).start()
                 for name, svc in self.hosts.items()}
        try:
            done, _ = run_playbook(self.inventory, release, self.root, timeout=ROLLOUT_TIMEOUT,
                                   rollout_batches=batches, rollout_report=str(self.report),
                                   **extra)
        finally:
            summaries = {name: summarize(load.stop()) for name, load in loads.items()}
        for name, summary in summaries.items():
            assert summary["failed"] == 0, (name, summary)
            assert summary["requests"] > 0, (name, summary)
        return done

    def report_hosts(self) -> dict[str, dict]:
        return {h["host"]: h for h in json.loads(self.report.read_text())["hosts"]}

    def teardown(self) -> None:
        errors = []
        for svc in self.hosts.values():
            try:
                svc.teardown()
            except AssertionError as error:
                errors.append(str(error))
        assert not errors, errors


def recap(done: subprocess.CompletedProcess) -> dict[str, str]:
    return {line.split()[0]: line for line in done.stdout.splitlines()
            if line.startswith("host") and "unreachable=" in line}


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not WITH_SSH:
        yield None
        return
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, sshd):
    root = tmp_path_factory.mktemp("fleet")
    host_vars = {"host4": sshd.host_vars(root / "remote-tmp")} if sshd else None
    group = Fleet(root, host_vars)
    try:
        group.start()
        yield group
    finally:
        group.teardown()


@pytest.mark.slow
@pytest.mark.timeout(3 * ROLLOUT_TIMEOUT)
def test_good_release_rolls_over_every_batch_then_a_second_run_is_a_no_op(fleet: Fleet, sshd):
    before = fleet.masters()
    release = fleet.release("v2")
    first = fleet.roll(release)
    assert first.returncode == 0, first.stdout[-4000:]
    swapped = fleet.masters()
    # the batches, in order: serial [1, "50%", "100%"] over 4 hosts
    report = fleet.report_hosts()
    batches = {tuple(h["batch"]) for h in report.values()}
    assert batches == {("host1",), ("host2", "host3"), ("host4",)}, report
    # ... in that order: release ids start with the UTC time the host staged them
    ids = {name: svc.current() for name, svc in fleet.hosts.items()}
    assert ids["host1"] < min(ids["host2"], ids["host3"]) <= max(ids["host2"], ids["host3"]) \
        < ids["host4"], ids
    assert set(fleet.serving().values()) == {"v2"}
    assert all(swapped[name] != before[name] for name in HOSTS)
    for name, svc in fleet.hosts.items():
        assert report[name]["release"] == svc.current() and svc.current().endswith("-v2")
        assert report[name]["changed"] and report[name]["reload_seconds"] > 0, report[name]
    if sshd:  # host4's tasks really went through sshd
        assert "Accepted publickey for " + sshd.user in sshd.log.read_text()

    # one batch: a no-op does not depend on the batches, and each batch costs Ansible's time
    second = fleet.roll(release, batches=["100%"])
    assert second.returncode == 0, second.stdout[-4000:]
    # nothing swapped, nothing sent, no new release: same masters, changed=0 on every host
    assert fleet.masters() == swapped
    assert second.stdout.count("\"msg\": \"already serves release ") == len(HOSTS), \
        second.stdout[-4000:]
    assert all("changed=0" in recap(second)[name] for name in HOSTS), recap(second)
    report = fleet.report_hosts()
    assert not any(h["changed"] for h in report.values()), report
    for svc in fleet.hosts.values():
        assert [r["id"][-2:] for r in svc.releases()] == ["v1", "v2"]
        assert not list((svc.root / "releases" / svc.current()).glob("run"))


@pytest.mark.slow
@pytest.mark.timeout(2 * ROLLOUT_TIMEOUT)
def test_release_broken_on_the_second_host_stops_the_rollout(fleet: Fleet):
    before = fleet.masters()
    previous = {name: svc.current() for name, svc in fleet.hosts.items()}
    for name, svc in fleet.hosts.items():
        if name != "host2":  # the release needs this file; host2 lacks it
            (svc.root / NEEDED_FILE).write_text("ok\n")
    done = fleet.roll(fleet.release("v3", needs_host_file=True))
    # the play failed, naming the host and the kit's cause
    assert done.returncode == 2, done.stdout[-4000:]
    assert "host2: release v3 failed (Swap | hotswap deploy" in done.stdout, done.stdout[-4000:]
    assert f"RuntimeError: this release needs {NEEDED_FILE} on this host" in done.stdout
    serving, masters = fleet.serving(), fleet.masters()
    # host1 (batch 1) and host3 (host2's batch, swapped in parallel) serve the new release
    assert serving["host1"] == serving["host3"] == "v3", serving
    # host2: the kit rolled back, its old master never stopped serving, `current` is v2 again
    host2 = fleet.hosts["host2"]
    assert serving["host2"] == "v2" and masters["host2"] == before["host2"]
    assert host2.current() == previous["host2"]
    assert not any(r["id"].endswith("-v3") for r in host2.releases())
    # host4 (batch 3) was never touched
    assert serving["host4"] == "v2" and masters["host4"] == before["host4"]
    assert fleet.hosts["host4"].current() == previous["host4"]
    report = fleet.report_hosts()
    assert report["host2"]["failed"] and report["host2"]["result"].startswith(
        "FAILED (Swap | hotswap deploy --if-changed --json): hotswap deploy exit 1"), report
    assert f"rolled back: the old release {previous['host2']} serves" in \
        report["host2"]["result"], report
    assert report["host4"]["result"] == "not reached", report
    # the failed host is the one the recap counts as failed
    assert "failed=1" in recap(done)["host2"] and "failed=0" in recap(done)["host1"]


@pytest.mark.slow
@pytest.mark.timeout(2 * ROLLOUT_TIMEOUT)
def test_a_failed_gate_swaps_the_old_release_back(fleet: Fleet):
    # the release itself is fine; the gate asks for a page nothing serves, so host1's gate
    # fails after its swap and the rescue must roll it back to v3 (what it served before)
    before = fleet.masters()
    host1 = fleet.hosts["host1"]
    previous = host1.current()
    done = fleet.roll(fleet.release("v4"), hotswap_probe_path="/lookup?q=no-such-term",
                      hotswap_probe_retries=1)
    assert done.returncode == 2, done.stdout[-4000:]
    assert "host1: release v4 failed (Gate | hotswap probe" in done.stdout, done.stdout[-4000:]
    serving, masters = fleet.serving(), fleet.masters()
    # host1 went to v4 and back: a new master, the old release, `current` names it again
    assert serving["host1"] == "v3" and masters["host1"] != before["host1"]
    assert host1.current() == previous
    assert f"rolled back: the old release {previous} serves" in \
        fleet.report_hosts()["host1"]["result"]
    # the later batches were never touched
    assert all(masters[name] == before[name] for name in ("host2", "host3", "host4"))


def test_rollback_to_a_release_the_host_lacks_is_refused(fleet: Fleet):
    host1 = fleet.hosts["host1"]
    current = host1.current()
    done = host1.cli("rollback", "--to", "no-such-release")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("hotswap: no release no-such-release in "), done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    assert host1.current() == current


def test_missing_release_is_refused_before_any_host(tmp_path: Path):
    # the hosts need not exist: nothing may reach them
    inventory = write_inventory(tmp_path / "inventory.yml",
                                {"host1": tmp_path / "nowhere" / "srv.ini"})
    (tmp_path / "empty-release").mkdir()
    for release, message in ((tmp_path / "no-such-release", "no-such-release: no such folder"),
                             (tmp_path / "empty-release", "lacks srv.ini, srv.py"),
                             (None, "no release given: pass -e release_dir=")):
        done, _ = run_playbook(inventory, release, tmp_path, timeout=300)
        assert done.returncode == 2, done.stdout
        assert message in done.stdout, done.stdout
        assert "Roll the release over the fleet" not in done.stdout, done.stdout


def test_playbook_passes_ansible_syntax_check(tmp_path: Path):
    inventory = write_inventory(tmp_path / "inventory.yml", {"host1": REPO / "srv.ini"})
    done = subprocess.run(playbook_argv(inventory, REPO) + ["--syntax-check"],
                          env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    example = REPO / "deploy" / "ansible" / "inventory.example.yml"
    listed = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(example), "--list"],
                            env=ansible_env(tmp_path), capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["hotswap"]["hosts"]) == 4


SSHD = Path("/usr/sbin/sshd")


class Sshd:
    """A private sshd on 127.0.0.1: a free port, a host key and a client key made here, and
    no ControlPersist on the client side, so no process outlives the test."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "sshd"
        self.dir.mkdir(mode=0o700)
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(self.dir / key)], check=True, timeout=60)
        (self.dir / "authorized_keys").write_text((self.dir / "client_key.pub").read_text())
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.user = getpass.getuser()
        self.log = self.dir / "sshd.log"
        (self.dir / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir}/host_key\n"
            f"PidFile {self.dir}/sshd.pid\nAuthorizedKeysFile {self.dir}/authorized_keys\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            f"UsePAM no\nStrictModes no\nAllowUsers {self.user}\n")
        # the privilege-separation folder the Debian unit would create
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.process = subprocess.Popen(
            [str(SSHD), "-D", "-f", str(self.dir / "sshd_config"), "-E", str(self.log)],
            start_new_session=True)

        def accepting() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return self.process.poll() is not None  # stop waiting if it died

        procs.wait_until(accepting, 30, interval=0.05)
        assert self.process.poll() is None, self.log.read_text()

    def host_vars(self, remote_tmp: Path) -> dict:
        return {
            "ansible_connection": "ssh",
            "ansible_host": "127.0.0.1",
            "ansible_port": self.port,
            "ansible_user": self.user,
            "ansible_ssh_private_key_file": str(self.dir / "client_key"),
            # no ControlMaster/ControlPersist: no ssh master process left after the play
            "ansible_ssh_args": "-o ControlMaster=no -o StrictHostKeyChecking=no "
                                "-o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes",
            "ansible_remote_tmp": str(remote_tmp),
        }

    def stop(self) -> None:
        # sessions end with their connections; then the listener, by its pid
        procs.wait_until(lambda: not procs.descendants(self.process.pid), 30)
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        left = [p for p in procs.descendants(self.process.pid) if procs.alive(p)]
        assert not left, f"sshd sessions left behind: {left}"
