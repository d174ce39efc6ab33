"""The chaos soak (bench/chaos.py, issue 20): its attribution logic on made-up records, a
short seeded soak against a real instance, and the losses it found, each landed at its
moment deterministically."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
from conftest import Service

from bench import chaos
from hotswap.errors import ExitCode, HotswapError
from hotswap.swap import lock
from hotswap.system import procs


# -- the attribution, on records made up for it ------------------------------------------------
def swap(index: int, started: float, ended: float, fault: str | None = None,
         at: float | None = None) -> chaos.Swap:
    item = chaos.Swap(index, fault, f"s{index}", started, ended=ended, reload_ended=ended - 1,
                      phases=[(started + 0.1, "preflight"), (started + 0.5, "loading"),
                              (started + 2.0, "retiring")])
    item.landed = {"fault": fault, "at": at} if fault else None
    return item


def record(started: float, latency: float = 0.01, outcome: str = "reset") -> dict:
    return {"started": started, "latency": latency, "outcome": outcome, "master_pid": 0,
            "generation": ""}


def test_failed_requests_are_attributed_to_their_swap_fault_and_moment():
    swaps = [swap(1, 100.0, 105.0), swap(2, 110.0, 116.0, "cli SIGKILL", at=111.0),
             swap(3, 120.0, 126.0, "old worker SIGKILL", at=121.0)]
    records = [record(100.2, outcome="ok"), record(102.5), record(111.3, 0.02, "timeout"),
               record(120.9, 0.2), record(123.0), record(108.0), record(115.5)]
    failed = chaos.attribute(records, swaps)
    assert [(f.swap, f.fault, f.phase, f.killed_by_fault) for f in failed] == [
        (1, None, "retiring", False),
        (2, "cli SIGKILL", "loading", False),
        (3, "old worker SIGKILL", "loading", True),  # in flight in the worker it killed
        (3, "old worker SIGKILL", "retiring", False),  # after the kill: the kit's loss
        (None, None, "", False),  # between two swaps
        (2, "cli SIGKILL", "follow-up", False),
    ]
    assert failed[1].offset == pytest.approx(0.32)
    result = chaos.summary(swaps, failed, len(records))
    assert (result["lost"], result["killed_by_fault"]) == (5, 1)
    assert result["outside_swaps"]["lost"] == 1
    assert result["classes"]["old worker SIGKILL"]["killed_by_fault"] == 1
    assert "6 failed" not in chaos.table(result) and "5 lost" in chaos.table(result)


def test_the_plan_is_seeded_and_faults_about_the_fraction_asked():
    plan = chaos.draw(7, 200, 0.5)
    assert plan == chaos.draw(7, 200, 0.5)
    assert plan != chaos.draw(8, 200, 0.5)
    faulted = [p for p in plan if p.fault]
    assert 70 < len(faulted) < 130
    assert {p.fault for p in faulted} == set(chaos.FAULTS)
    assert all(0 <= p.delay(3.0) <= 3.0 for p in plan)


_SIGINT = "cli SIGINT"


@pytest.mark.parametrize(("code", "serving", "problem", "fault"), [
    (0, "s2+ab", None, _SIGINT), (1, "s1+ab", None, _SIGINT), (5, "s1+ab", None, _SIGINT),
    (0, "s1+ab", "exit 0 but s1+ab serves", _SIGINT),
    (1, "s2+ab", "exit 1 but the new release", _SIGINT),
    (-2, "s1+ab", "died of its signal", _SIGINT),
    (0, "", "no generation answered", _SIGINT),
    (-15, "s1+ab", None, _SIGINT),  # landed in the interpreter's start-up: nothing changed
    (7, "s1+ab", "exit 7", _SIGINT),  # no room, but the fault was not a full disk
    (7, "s1+ab", None, "disk full"),  # refused: the run dir had no room for its records
])
def test_an_exit_code_must_be_true_to_what_serves(code, serving, problem, fault):
    item = chaos.Swap(2, fault, "s2", 0.0, code=code, serving=serving,
                      old_generation="s1+ab")
    if code == -15:
        item.landed = {"phase": chaos.STARTUP}
    chaos.check(item, "s2+")
    assert (problem is None) == (not item.problems), item.problems
    if problem:
        assert problem in item.problems[0]


# -- against a real instance -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def running(tmp_path_factory):
    service = Service(tmp_path_factory.mktemp("chaos"))
    try:
        service.start()
        yield service
    finally:
        service.teardown()


# The CLI, stopped by itself at a given moment: the first import of click (well inside its
# own imports, before any handler of the reload's), or its exit (its outcome printed). The
# test lands its signal there, then continues it.
STOP_AT = """
import atexit, os, runpy, signal, sys
def stop():
    os.kill(os.getpid(), signal.SIGSTOP)
class StopAtClick:
    def find_spec(self, name, path=None, target=None):
        if name == "click":
            sys.meta_path.remove(self)
            stop()
        return None
if sys.argv[1] == "click":
    sys.meta_path.insert(0, StopAtClick())
else:
    atexit.register(stop)
sys.argv[0:2] = ["hotswap"]
runpy.run_module("hotswap", run_name="__main__", alter_sys=True)
"""


def stopped_cli(service: Service, moment: str, *args: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", STOP_AT, moment, "--ini",
                                str(service.ini), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=service.root)
    service.background.append(process)
    stopped = procs.wait_until(lambda: (info := procs.stat(process.pid)) is None
                               or info.state == "T", 120, interval=0.005)
    assert stopped and process.poll() is None, f"the CLI never stopped at {moment}"
    return process


def signal_mask(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return int(next(line for line in handle if line.startswith(field)).split()[1], 16)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_cli_imports_ends_it_like_a_later_one(running: Service, signum):
    """Found by the soak: a reload signalled while it still imported died of the signal
    (exit -2 or -15) with no message; now it ends as one landing a moment later does."""
    master = running.health()["master_pid"]
    process = stopped_cli(running, "click", "reload")
    os.kill(process.pid, signum)
    os.kill(process.pid, signal.SIGCONT)
    _, err = process.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert process.returncode == 1, err
    first = err.splitlines()[0]
    assert first.startswith("hotswap: reload FAILED after "), err
    assert first.endswith(f": interrupted by {name} before anything changed"), err
    assert running.health()["master_pid"] == master


def test_a_signal_as_the_cli_exits_leaves_its_exit_code_alone(running: Service):
    """Found by the soak: a SIGINT landing as a reload that had served the new release was
    exiting ended it with -2 (Python restores default handlers as it shuts down). Stopped
    at its exit, the CLI ignores SIGINT and SIGTERM, and exits 0 once continued."""
    master = running.health()["master_pid"]
    process = stopped_cli(running, "exit", "reload")
    ignored = signal_mask(process.pid, "SigIgn:")
    for signum in (signal.SIGINT, signal.SIGTERM):
        assert ignored & (1 << (signum - 1)), f"{signum} not ignored: {ignored:x}"
    os.kill(process.pid, signal.SIGINT)
    os.kill(process.pid, signal.SIGCONT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, out + err
    assert "reload ok" in out
    new = running.health()["master_pid"]
    running.seen_masters.add(new)
    assert new != master


SHORT_SOAK = ["--swaps", "5", "--connections", "16", "--fault-fraction", "1", "--seed", "5",
              "--faults", "cli SIGKILL", "cli SIGTERM", "hook SIGKILL", "new master SIGKILL",
              "old worker SIGKILL"]  # seed 5: each of these once


@pytest.mark.slow
def test_a_short_seeded_soak_loses_nothing(tmp_path):
    """A few swaps of `make chaos` (docs/chaos.md), each with a fault; the long soak is the
    same command with more swaps."""
    done = subprocess.run([sys.executable, "-m", "bench.chaos", *SHORT_SOAK, "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900,
                          cwd=chaos.REPO)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    result = json.loads((tmp_path / "chaos.json").read_text())
    summary = result["summary"]
    assert summary["swaps"] == summary["faulted"] == 5, report
    assert summary["requests"] > 100, report
    assert summary["lost"] == summary["follow_up_refused"] == 0, report
    assert summary["swaps_with_problems"] == 0, report
    assert "0 lost" in done.stdout.splitlines()[-2], report


def _hold_lock(path, pid: int):
    """The reload lock held by this process, with `pid` recorded as its holder."""
    handle = open(path, "a+")  # noqa: SIM115 - released by the caller
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.truncate(0)
    handle.write(str(pid))
    handle.flush()
    return handle


def test_a_lock_whose_holder_is_gone_is_taken_over_once_the_kernel_frees_it(tmp_path):
    """Found by the soak: right after a SIGKILLed reload, a retry was refused "busy" (exit 4)
    while the kernel still tore the killed holder down. A holder pid that is gone or exiting
    is waited for (the lock frees when its exit completes); a live one is refused at once."""
    cfg = SimpleNamespace(run_dir=tmp_path, lock_file=tmp_path / "reload.lock")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    handle = _hold_lock(cfg.lock_file, int(gone.stdout))
    timer = threading.Timer(1.0, handle.close)  # its exit completes: the kernel frees it
    timer.start()
    with lock.reload_lock(cfg, "start another"):
        assert lock.Holder.parse(cfg.lock_file.read_text()).pid == os.getpid()
    timer.join()
    handle = _hold_lock(cfg.lock_file, os.getpid())  # a live holder: refused as before
    try:
        with pytest.raises(HotswapError) as refused, lock.reload_lock(cfg, "start another"):
            pass
        assert refused.value.code == ExitCode.BUSY
    finally:
        handle.close()


# -- the fault classes that are no signal, each landed at one moment -----------------------------
@pytest.mark.slow
def test_a_new_master_oom_killed_while_it_loads_is_rolled_back(running: Service):
    """`new master OOM`, landed while the import hangs at its gate: the new master is moved
    into a memory cgroup limited to 2 MiB (bench/chaos_squeeze.py), then let go. The kernel
    kills it as it allocates; the reload rolls back and says why; the old master serves."""
    from bench.chaos_squeeze import OomTrap

    master = running.health()["master_pid"]
    running.release_hanging_import()
    trap = OomTrap(f"hotswap-test-{os.getpid()}")
    try:
        reload = running.cli_background("reload", "--timeout", "60")
        loading = running.loading_pid()
        assert trap.trap(loading) == ""
        running.let_import_finish()
        out, err = reload.communicate(timeout=120)
    finally:
        trap.release()
        running.restore_code()
    assert reload.returncode == 1, out + err
    # In a cgroup of its own (a systemd unit's) the kit names the OOM killer; at the
    # hierarchy's root, where this test's instance runs, it cannot tell a kill of its own
    # from another tenant's (memory.Cgroup.oom_kills), and says only that the master died.
    assert "OOM killer" in err or "exited while loading" in err, out + err
    assert f"new master {loading}" in err, out + err
    assert running.health()["master_pid"] == master
    follow = running.cli("reload", "--timeout", "60")
    assert follow.returncode == 0, follow.stdout + follow.stderr
    running.seen_masters.add(running.health()["master_pid"])


def test_a_v1_oom_kill_in_a_child_cgroup_counts_for_its_parent(tmp_path):
    """Found by `new master OOM`: on a 6.x kernel, cgroup v1's memory.oom_control counts
    only its own cgroup's kills, so a new master OOM-killed in a child cgroup was reported
    as a plain exit. The count is now the subtree's (on a made-up cgroup tree)."""
    from hotswap.system import memory

    child = tmp_path / "service" / "loading"
    child.mkdir(parents=True)
    (tmp_path / "service" / "memory.oom_control").write_text("oom_kill_disable 0\noom_kill 1\n")
    (child / "memory.oom_control").write_text("oom_kill_disable 0\noom_kill 2\n")
    assert memory.Cgroup(tmp_path / "service", 1, tmp_path).oom_kills() == 3
    # the root's subtree is the whole machine: only its own count
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\noom_kill 5\n")
    assert memory.Cgroup(tmp_path, 1, tmp_path).oom_kills() == 5


@pytest.fixture
def on_small_disk(tmp_path):
    """A service whose run dir is a small tmpfs of its own (bench/chaos_squeeze.py)."""
    from bench.chaos_squeeze import RunDirDisk

    service = Service(tmp_path)
    disk = RunDirDisk(service.run_dir)
    try:
        service.start()
        yield service, disk
    finally:
        service.teardown()
        disk.unmount()


def _freed_then_reloads(service: Service, disk) -> None:
    disk.free()
    follow = service.cli("reload", "--timeout", "60")
    assert follow.returncode == 0, follow.stdout + follow.stderr
    service.seen_masters.add(service.health()["master_pid"])


@pytest.mark.slow
def test_a_run_dir_that_fills_up_mid_swap_fails_cleanly_or_swaps(on_small_disk):
    """`disk full`, landed while the import hangs: the run dir (a small tmpfs of its own) is
    filled to the last byte, then the import goes on. The reload either swaps (exit 0, the
    new release serves) or fails cleanly (non-zero, a message, the old master serves); once
    the space is freed, the next reload exits 0."""
    service, disk = on_small_disk
    master = service.health()["master_pid"]
    service.seen_masters.add(master)
    service.release_hanging_import()
    reload = service.cli_background("reload", "--timeout", "60")
    service.loading_pid()
    assert disk.fill() > 0
    service.let_import_finish()
    out, err = reload.communicate(timeout=120)
    service.restore_code()
    serving = service.health()["master_pid"]
    service.seen_masters.add(serving)
    if reload.returncode == 0:
        assert serving != master, out + err
    else:
        assert serving == master, out + err
        assert err.startswith("hotswap: reload FAILED"), out + err
        assert "Traceback" not in err, err
    _freed_then_reloads(service, disk)


@pytest.mark.slow
def test_a_full_run_dir_before_the_fork_is_refused_at_once(on_small_disk):
    """`disk full` landing before the fork: the reload refuses (exit 7, the run dir named)
    instead of forking a generation that cannot record its hand-over and waiting out its
    --timeout; once the space is freed, the next reload exits 0."""
    service, disk = on_small_disk
    master = service.health()["master_pid"]
    assert disk.fill() > 0
    refused = service.cli("reload", "--timeout", "60")
    assert refused.returncode == 7, refused.stdout + refused.stderr
    assert refused.stderr.startswith(f"hotswap: the run dir {service.run_dir} is full"), \
        refused.stderr
    assert "Traceback" not in refused.stderr
    assert service.health()["master_pid"] == master
    _freed_then_reloads(service, disk)
