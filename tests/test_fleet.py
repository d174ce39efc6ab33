"""deploy/ansible/rolling-release.yml with real Ansible against local hotswap instances.

Each inventory host is `ansible_connection: local` with its own instance folder (a Service),
all under load over their unix sockets for the whole rollout.
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
from conftest import REPO, TEST_TERMS, Service, sample_paths

from bench.loadgen import LoadGenerator, summarize
from hotswap.system import procs
from scripts.fleet_demo import BIN, NEEDED_FILE, make_release, run_playbook, write_inventory

pytestmark = pytest.mark.skipif(
    not (BIN / "ansible-playbook").exists(),
    reason="ansible-core is not installed (make test installs the fleet extra)",
)

HOSTS = ("host1", "host2", "host3", "host4")
BATCHES = [1, "50%", "100%"]  # 4 hosts: [host1], [host2, host3], [host4]
CONNECTIONS = 2  # per host: the machine has 2 cores and other suites run beside this one
# A rollout is mostly Ansible's own work (a fresh Python process per module run): about a
# minute per batch on a 2-core machine busy with other suites, seconds on an idle one.
ROLLOUT_TIMEOUT = 900


class Fleet:
    def __init__(self, root: Path, names: tuple[str, ...] = HOSTS,
                 host_vars: dict | None = None) -> None:
        self.root = root
        self.hosts: dict[str, Service] = {}
        for name in names:
            (root / name).mkdir()
            self.hosts[name] = Service(root / name)
        self.inventory = write_inventory(
            root / "inventory.yml", {name: svc.ini for name, svc in self.hosts.items()},
            host_vars)
        self.report = root / "report.json"

    def start(self) -> None:
        for svc in self.hosts.values():
            svc.start()

    def masters(self) -> dict[str, int]:
        return {name: svc.health()["master_pid"] for name, svc in self.hosts.items()}

    def generations(self) -> dict[str, str]:
        return {name: svc.health()["generation"] for name, svc in self.hosts.items()}

    def load(self) -> dict[str, LoadGenerator]:
        return {name: LoadGenerator(str(svc.socket), CONNECTIONS, sample_paths(svc),
                                    max_seconds=600) for name, svc in self.hosts.items()}

    def roll(self, release: Path | str | None, **extra: object):
        done, _ = run_playbook(self.inventory, release, self.root, timeout=ROLLOUT_TIMEOUT,
                               rollout_batches=BATCHES, rollout_report=str(self.report),
                               **extra)
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


@pytest.fixture
def fleet(tmp_path: Path):
    group = Fleet(tmp_path)
    try:
        yield group
    finally:
        group.teardown()


def stop_all(loads: dict[str, LoadGenerator]) -> dict[str, dict]:
    return {name: summarize(load.stop()) for name, load in loads.items()}


@pytest.mark.slow
@pytest.mark.timeout(2 * ROLLOUT_TIMEOUT)
def test_good_release_rolls_over_every_batch_then_a_second_run_is_idempotent(fleet: Fleet):
    fleet.start()
    before = fleet.masters()
    release = make_release(fleet.root / "releases" / "v2", "v2", TEST_TERMS)
    loads = {name: load.start() for name, load in fleet.load().items()}
    try:
        first = fleet.roll(release)
        assert first.returncode == 0, first.stdout[-4000:]
        swapped = fleet.masters()
        second = fleet.roll(release)
        assert second.returncode == 0, second.stdout[-4000:]
    finally:
        summaries = stop_all(loads)

    for name, summary in summaries.items():
        assert summary["failed"] == 0, (name, summary)
        assert len(summary["generations"]) == 2, (name, summary)  # v1, then v2
    # the batches, in order: serial [1, "50%", "100%"] over 4 hosts
    batches = [line.split('"msg": "batch ')[1].split(":")[0]
               for line in first.stdout.splitlines() if '"msg": "batch ' in line]
    assert batches == ["host1", "host2, host3", "host4"], first.stdout[-4000:]
    assert all(g.startswith("v2+") for g in fleet.generations().values())
    assert all(swapped[name] != before[name] for name in HOSTS)
    # the second run swapped nothing: same masters, nothing changed, it says so per host
    assert fleet.masters() == swapped
    assert second.stdout.count("nothing to do") == len(HOSTS), second.stdout[-4000:]
    for name in HOSTS:
        assert f"{name}" in second.stdout and "changed=0" in next(
            line for line in second.stdout.splitlines() if line.startswith(f"{name} "))
    report = fleet.report_hosts()
    assert {h["release"] for h in report.values()} == {"v2"}, report
    assert all(h["result"].startswith("unchanged") for h in report.values()), report
    # no copy of the old release is left behind on a host that swapped
    for svc in fleet.hosts.values():
        assert not list(svc.root.rglob("*~")), list(svc.root.rglob("*~"))


@pytest.mark.slow
@pytest.mark.timeout(2 * ROLLOUT_TIMEOUT)
def test_release_broken_on_the_second_host_stops_the_rollout(fleet: Fleet):
    fleet.start()
    before = fleet.masters()
    for name, svc in fleet.hosts.items():
        if name != "host2":  # the release needs this file; host2 lacks it
            (svc.root / NEEDED_FILE).write_text("ok\n")
    release = make_release(fleet.root / "releases" / "v2", "v2", TEST_TERMS,
                           needs_host_file=True)
    old_files = {name: {path: (svc.root / path).read_bytes()
                        for path in ("srv.py", "data/terms.tsv")}
                 for name, svc in fleet.hosts.items()}
    loads = {name: load.start() for name, load in fleet.load().items()}
    try:
        done = fleet.roll(release)
    finally:
        summaries = stop_all(loads)

    for name, summary in summaries.items():
        assert summary["failed"] == 0, (name, summary)
    # the play failed, naming the host and the kit's cause
    assert done.returncode == 2, done.stdout[-4000:]
    assert "host2: release v2 failed" in done.stdout, done.stdout[-4000:]
    assert f"RuntimeError: this release needs {NEEDED_FILE} on this host" in done.stdout
    generations, masters = fleet.generations(), fleet.masters()
    # host1 (batch 1) and host3 (host2's batch, swapped in parallel) serve the new release
    assert generations["host1"].startswith("v2+") and generations["host3"].startswith("v2+")
    # host2: the kit rolled back, its old master never stopped serving, its files are v1 again
    assert generations["host2"].startswith("v1+")
    assert masters["host2"] == before["host2"]
    # host4 (batch 3) was never touched
    assert generations["host4"].startswith("v1+") and masters["host4"] == before["host4"]
    for name in ("host2", "host4"):
        root = fleet.hosts[name].root
        for path, content in old_files[name].items():
            assert (root / path).read_bytes() == content, (name, path)
        assert not list(root.rglob("*~")), list(root.rglob("*~"))
    assert not (fleet.hosts["host4"].root / ".hotswap-release.json").exists()
    report = fleet.report_hosts()
    assert report["host1"]["release"] == "v2" and report["host3"]["release"] == "v2"
    assert report["host2"]["result"].startswith("FAILED: hotswap reload exit 1"), report
    assert "rolled back: the old release v1+" in report["host2"]["result"], report
    assert report["host4"]["result"] == "not reached", report
    # the failed host is the one the recap counts as failed
    recap = {line.split()[0]: line for line in done.stdout.splitlines()
             if line.startswith("host") and "unreachable=" in line}
    assert "failed=1" in recap["host2"] and "failed=0" in recap["host1"], recap


@pytest.mark.slow
@pytest.mark.timeout(2 * ROLLOUT_TIMEOUT)
def test_a_failed_gate_swaps_the_old_release_back(tmp_path: Path):
    # the release itself is fine; the gate asks for a page nothing serves, so host1's gate
    # fails after its swap and the rescue must swap v1 back in
    fleet = Fleet(tmp_path, ("host1", "host2"))
    try:
        fleet.start()
        before = fleet.masters()
        old_files = (fleet.hosts["host1"].root / "data" / "terms.tsv").read_bytes()
        release = make_release(tmp_path / "releases" / "v2", "v2", TEST_TERMS)
        loads = {name: load.start() for name, load in fleet.load().items()}
        try:
            done = fleet.roll(release, hotswap_probe_path="/lookup?q=no-such-term",
                              hotswap_probe_retries=1)
        finally:
            summaries = stop_all(loads)
        for name, summary in summaries.items():
            assert summary["failed"] == 0, (name, summary)
        assert done.returncode == 2, done.stdout[-4000:]
        assert "host1: release v2 failed (Gate | hotswap probe" in done.stdout, done.stdout[-4000:]
        generations, masters = fleet.generations(), fleet.masters()
        # host1 went to v2 and back: a new master, the old release
        assert generations["host1"].startswith("v1+") and masters["host1"] != before["host1"]
        root = fleet.hosts["host1"].root
        assert (root / "data" / "terms.tsv").read_bytes() == old_files
        assert not list(root.rglob("*~")), list(root.rglob("*~"))
        assert "rolled back: the old release v1+" in fleet.report_hosts()["host1"]["result"]
        # host2 was never touched
        assert generations["host2"].startswith("v1+") and masters["host2"] == before["host2"]
    finally:
        fleet.teardown()


def test_missing_release_is_refused_before_any_host(tmp_path: Path):
    # the hosts need not exist: nothing may reach them
    inventory = write_inventory(tmp_path / "inventory.yml",
                                {"host1": tmp_path / "nowhere" / "srv.ini"})
    (tmp_path / "empty-release").mkdir()
    for release, message in ((tmp_path / "no-such-release", "no-such-release: no such folder"),
                             (tmp_path / "empty-release", "lacks srv.py, data/terms.tsv"),
                             (None, "no release given: pass -e release_dir=")):
        done, _ = run_playbook(inventory, release, tmp_path, timeout=300)
        assert done.returncode == 2, done.stdout
        assert message in done.stdout, done.stdout
        assert "Roll the release over the fleet" not in done.stdout, done.stdout


def test_playbook_passes_ansible_syntax_check(tmp_path: Path):
    from scripts.fleet_demo import ansible_env, playbook_argv

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


@pytest.mark.slow
@pytest.mark.timeout(2 * ROLLOUT_TIMEOUT)
@pytest.mark.skipif(not SSHD.exists() or os.geteuid() != 0,
                    reason="needs root and openssh-server (scripts/install-system-deps.sh)")
def test_a_host_over_real_ssh_swaps_like_a_local_one(tmp_path: Path):
    sshd = Sshd(tmp_path)
    try:
        fleet = Fleet(tmp_path, ("local1", "ssh1"),
                      {"ssh1": sshd.host_vars(tmp_path / "remote-tmp")})
        try:
            fleet.start()
            release = make_release(tmp_path / "releases" / "v2", "v2", TEST_TERMS)
            loads = {name: load.start() for name, load in fleet.load().items()}
            try:
                done = fleet.roll(release)
            finally:
                summaries = stop_all(loads)
            assert done.returncode == 0, done.stdout[-4000:]
            assert all(g.startswith("v2+") for g in fleet.generations().values())
            for name, summary in summaries.items():
                assert summary["failed"] == 0, (name, summary)
            # ssh1's tasks really went through sshd
            assert "Accepted publickey for " + sshd.user in sshd.log.read_text()
        finally:
            fleet.teardown()
    finally:
        sshd.stop()
