"""`hotswap start` as a container's PID 1 (tests/pid_ns.py: a PID and mount namespace of its
own, the CLI run in it with nsenter as `kubectl exec` runs it): swaps under load, no
zombies, SIGTERM within the grace, SIGKILL of PID 1, and why the image must not run a bare
uWSGI master as PID 1."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TEST_TERMS, Lines, Service, SlowRequest, sample_paths
from pid_ns import PidNamespace, unavailable

from bench.loadgen import LoadGenerator, summarize
from hotswap.config import find_uwsgi
from hotswap.protocol import fifo, record
from hotswap.releases.watch import DataLink
from hotswap.swap import probe
from hotswap.system import procs
from scripts.gen_resource import write_resource

pytestmark = pytest.mark.skipif(bool(why := unavailable()), reason=why or "")

CONNECTIONS = 32
RELOADS = 5


@pytest.fixture
def ns(tmp_path: Path):
    """A service whose `hotswap start` will be PID 1 of its own namespaces. Service.teardown
    is NOT run: the pids the service writes are the namespace's, not the host's."""
    namespace = PidNamespace(Service(tmp_path))
    try:
        yield namespace
    finally:
        namespace.teardown()


def health(ns: PidNamespace) -> dict:
    answer = probe.healthz(ns.service.socket, timeout=5.0)
    assert answer, f"nothing answers /healthz; log:\n{ns.service.log_tail()}"
    return answer


def reload_ok(ns: PidNamespace, version: str) -> dict:
    ns.service.release(version=version)
    done = ns.cli("reload")
    assert done.returncode == 0, done.stdout + done.stderr
    after = health(ns)
    assert after["generation"].startswith(f"{version}+"), after
    return after


def no_zombie(ns: PidNamespace) -> None:
    # PID 1 reaps at its next turn (SIGCHLD wakes it at once): poll, do not sleep
    assert procs.wait_until(lambda: not ns.zombies(), 10), f"zombies: {ns.zombies()}"


@pytest.mark.slow
def test_reloads_as_pid1_under_load_lose_nothing_and_leave_no_zombie(ns: PidNamespace):
    first = ns.start()
    assert procs.stat(ns.host_pid(first["master_pid"])).ppid == ns.pid1
    with LoadGenerator(str(ns.service.socket), CONNECTIONS, sample_paths(ns.service),
                       max_seconds=240) as load:
        for n in range(2, RELOADS + 2):
            after = reload_ok(ns, f"v{n}")
            no_zombie(ns)
            # every re-forked master is re-parented to PID 1, the supervisor
            assert procs.stat(ns.host_pid(after["master_pid"])).ppid == ns.pid1
    summary = summarize(load.records)
    assert summary["requests"] > 100 and summary["failed"] == 0, summary
    assert len(summary["generations"]) >= 2, summary
    assert ns.launcher.poll() is None, "PID 1 exited during the swaps"


def test_sigterm_to_pid1_finishes_the_request_in_flight_and_exits_0(ns: PidNamespace):
    ns.start()
    slow = SlowRequest(ns.service, seconds=5)
    began = time.monotonic()
    ns.terminate()
    code = ns.exit_code(timeout=60)
    took = time.monotonic() - began
    err = ns.stderr()
    assert code == 0, err
    assert "stopping gracefully" in err and "hotswap: stopped" in err, err
    answer = slow.result()
    assert answer.status == 200, answer
    assert procs.wait_until(lambda: not ns.pids(), 10), ns.pids()
    assert took < 25.0, f"took {took:.1f}s, past the default grace"
    assert not ns.service.socket.exists(), "the stop left the socket behind"


class LostRequest(SlowRequest):
    """A slow request expected to be cut off: its error is kept, not raised in its thread."""

    def _run(self, service: Service, seconds: float) -> None:
        try:
            super()._run(service, seconds)
        except OSError as exc:
            self.error = exc


def test_grace_over_kills_what_still_runs_and_exits_5(ns: PidNamespace):
    ns.env["HOTSWAP_GRACE"] = "1"  # set by the environment, as a Deployment's env: does
    ns.start()
    slow = LostRequest(ns.service, seconds=20)
    began = time.monotonic()
    ns.terminate()
    assert ns.exit_code(timeout=30) == 5
    assert time.monotonic() - began < 15.0  # 1 s of grace, then the kill: not the 20 s
    err = ns.stderr()
    assert "still running 1s after the stop began" in err and "killed pid" in err, err
    assert "Traceback" not in err, err
    slow.thread.join(timeout=30)
    assert slow.answer is None and "closed connection" in str(slow.error)  # lost, as said
    assert procs.wait_until(lambda: not ns.pids(), 10), ns.pids()


def test_sigkill_to_pid1_ends_every_process_and_the_next_start_serves(ns: PidNamespace):
    ns.start()
    inside = ns.pids()
    assert len(inside) >= 3, inside  # PID 1, the master, its workers
    ns.kill()  # the kubelet, once terminationGracePeriodSeconds is over
    # unshare (util-linux 2.38) says 1 for a killed PID 1; a container runtime says 137
    assert ns.exit_code(timeout=30) != 0
    assert procs.wait_until(lambda: not any(procs.alive(p) for p in inside), 10)
    assert ns.service.socket.exists()  # left on the volume, stale
    again = PidNamespace(ns.service)  # the container restarted on the same volume
    try:
        assert again.start()["generation"].startswith("v1+")
        again.terminate()
        assert again.exit_code(timeout=60) == 0
        err = again.stderr()
        assert "removed stale run/http.sock" in err and "stopped" in err, err
    finally:
        again.teardown()


@pytest.mark.slow
def test_broken_release_and_a_sigkilled_reload_inside_the_namespace(ns: PidNamespace):
    first = ns.start()
    service = ns.service
    with LoadGenerator(str(service.socket), 8, sample_paths(service), max_seconds=180) as load:
        service.release_code((REPO / "srv.py").read_text() + "\nraise RuntimeError('broken')\n")
        done = ns.cli("reload")
        assert done.returncode == 1 and "RuntimeError: broken" in done.stderr, done.stderr
        assert health(ns)["master_pid"] == first["master_pid"]
        # a reload SIGKILLed while its release loads: the next one repairs, then swaps
        service.release_hanging_import()
        runner = ns.cli_background("reload")
        service.loading_pid()
        cli = procs.wait_until(lambda: procs.children(runner.pid), 10)
        assert cli, "nsenter started no reload"
        os.kill(cli[0], signal.SIGKILL)
        runner.wait(timeout=30)
        service.let_import_finish()
        service.restore_code()
        after = reload_ok(ns, "v2")
        assert after["master_pid"] != first["master_pid"]
        no_zombie(ns)
    summary = summarize(load.records)
    assert summary["failed"] == 0, summary


def test_start_exec_as_pid1_is_refused_in_one_line(ns: PidNamespace):
    ns.launch([*ns.nsenter_argv()[5:], "start", "--exec"])
    assert ns.exit_code(timeout=30) == 2
    err = ns.stderr().strip()
    assert len(err.splitlines()) == 1 and "PID 1" in err, err
    assert not ns.service.socket.exists()


def test_bare_uwsgi_master_as_pid1_dies_at_the_first_swap(ns: PidNamespace):
    """Why the image runs `hotswap start`: the re-forked master is the old one's child; when
    the old one (PID 1) exits, the kernel kills the namespace, the new generation with it."""
    ns.env["HOTSWAP_PYTHON"] = sys.executable  # what `hotswap start` would export,
    for folder in ("run", "log"):  # and the folders it would make
        (ns.service.root / folder).mkdir()
    ns.launch([str(find_uwsgi()), "--ini", str(ns.service.ini)])
    first = ns.service.wait_ready()["master_pid"]
    assert first == 1
    ns.service.release(version="v2")
    fifo.send(ns.service.run_dir / "0.fifo", "1f")
    ns.exit_code(timeout=60)  # PID 1 said goodbye after the hand-over...
    handover = record.read(ns.service.run_dir)
    assert handover.committed and handover.master_pid != first, handover  # ...which worked
    assert procs.wait_until(lambda: not ns.pids(), 10), ns.pids()
    assert probe.healthz(ns.service.socket, timeout=2.0) is None  # refused: nothing serves


def configmap_update(mount: Path, files: dict[str, Path]) -> None:
    """What the kubelet does to a ConfigMap volume on an update (its AtomicWriter): the new
    files in a new hidden folder, `..data` flipped to it by rename, a `KEY -> ..data/KEY`
    link for each key, the old folder removed."""
    mount.mkdir(exist_ok=True)
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    stamp = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns() % 10**9}"
    (mount / stamp).mkdir()
    for name, source in files.items():
        shutil.copy(source, mount / stamp / name)
    os.symlink(stamp, mount / "..data_tmp")
    os.rename(mount / "..data_tmp", mount / "..data")
    for name in files:
        if not (mount / name).is_symlink():
            os.symlink(f"..data/{name}", mount / name)
    if old:
        shutil.rmtree(mount / old)


def test_watch_refreshes_when_a_configmap_mount_flips_its_data_link(tmp_path: Path):
    (tmp_path / "svc").mkdir()
    ns = PidNamespace(Service(tmp_path / "svc", mode="store"))
    service, mount = ns.service, tmp_path / "config"
    try:
        ns.start()
        v1 = service.store_dir / "terms-v1.lmdb"
        configmap_update(mount, {"terms.lmdb": v1})  # the pod starts with what serves
        lines = Lines(ns.cli_background("watch", str(mount), "--quiet", "0.2", "--verbose"))
        lines.wait_for("watching")
        write_resource(str(service.root / "data" / "terms.tsv"), TEST_TERMS, seed=7,
                       version="v2")
        v2 = service.build_store("v2")
        with LoadGenerator(str(service.socket), 8, sample_paths(service),
                           max_seconds=120) as load:
            configmap_update(mount, {"terms.lmdb": v2})  # same key, new contents
            lines.wait_for(f"refresh {mount / 'terms.lmdb'}: ok", timeout=120)
        assert health(ns)["resource_version"] == "v2"
        assert summarize(load.records)["failed"] == 0, summarize(load.records)
        assert sum("refresh" in line and ": running" in line for line in lines.lines) == 1
    finally:
        ns.teardown()


def test_data_link_reports_the_keys_of_a_flip_once(tmp_path: Path):
    mount = tmp_path / "config"
    configmap_update(mount, {"a.lmdb": REPO / "srv.ini", "b.txt": REPO / "srv.ini"})
    link = DataLink(mount)
    assert link.flipped() == []  # what the mount held when the watcher started
    configmap_update(mount, {"a.lmdb": REPO / "srv.py", "b.txt": REPO / "srv.py"})
    assert link.flipped() == [mount / "a.lmdb", mount / "b.txt"]
    assert link.flipped() == []
    assert DataLink(tmp_path).flipped() == []  # no ..data: not a mount of that shape
