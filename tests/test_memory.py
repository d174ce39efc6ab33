"""A swap never trades the serving generation for the loading one under memory pressure
(issue 9, docs/memory.md): real uWSGI in a real memory cgroup that this module creates.

The service (heap mode, TERMS terms: a generation of ~110-130 MiB) runs in a child memory
cgroup of the test's own. A test "squeezes" it: the limit becomes what the serving generation
uses plus half of its estimate, so one generation fits and two do not. The OOM killer can
only pick processes inside that cgroup, so nothing else on the machine is at risk.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Service, sample_paths

from bench.loadgen import LoadGenerator, summarize
from hotswap.errors import ExitCode
from hotswap.swap import probe
from hotswap.system import memory, priority, procs

TERMS = 400_000
CONNECTIONS = 32
LOADING_SCORE = 1000  # srv.ini's loading_oom_score_adj


class MemoryCgroup:
    """A child memory cgroup of this process's own (v1 or v2), removed at the end."""

    def __init__(self, name: str = "") -> None:
        own = memory.cgroup_of(os.getpid())
        if own is None:
            pytest.skip("no memory cgroup (v1 memory controller or v2 with memory) here")
        self.version = own.version
        self.path = own.path / f"hotswap-test-{os.getpid()}{name}"
        try:
            self.path.mkdir()
        except OSError as exc:
            pytest.skip(f"cannot create a memory cgroup under {own.path}: {exc.strerror}")
        self.limit_file = self.path / ("memory.limit_in_bytes" if self.version == 1
                                       else "memory.max")
        if not self.limit_file.exists():
            self.path.rmdir()
            pytest.skip(f"{own.path} does not delegate the memory controller to its children")

    def limit(self, size: int | None) -> None:
        self.limit_file.write_text("max" if size is None and self.version == 2
                                   else "-1" if size is None else str(size))

    def oom_kills(self) -> int:
        return memory.Cgroup(self.path, self.version, self.path.parent).oom_kills() or 0

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def remove(self) -> None:
        assert procs.wait_until(lambda: not self.pids(), 30), f"left in cgroup: {self.pids()}"
        self.path.rmdir()


class CgroupService(Service):
    """A Service whose supervisor (and so every uWSGI process) starts inside `cgroup`: a
    shell writes its own pid into cgroup.procs, then execs `hotswap start`."""

    def __init__(self, root: Path, cgroup: MemoryCgroup, mode: str = "heap") -> None:
        super().__init__(root, mode=mode)
        self.cgroup = cgroup
        self.release("v1", terms=TERMS)

    def start(self, test_routes: bool = True) -> dict:
        env = dict(os.environ, SRV_MODE=self.mode, SRV_TEST_ROUTES="1")
        self.supervisor = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.cgroup.path / "cgroup.procs"),
             sys.executable, "-m", "hotswap", "--ini", str(self.ini), "start", "--supervise"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=self.root,
            env=env, start_new_session=True,
        )
        return self.wait_ready()

    def generation(self) -> list[int]:
        master = self.health()["master_pid"]
        return [master, *procs.children(master)]

    def squeeze(self) -> memory.Room:
        """Limit the cgroup to what the serving generation uses + half its estimate."""
        master, *workers = self.generation()
        room = memory.measure(master, workers, memory.DEFAULT_MARGIN_PERCENT)
        assert room.needs and room.in_use, room
        self.cgroup.limit(room.in_use + room.needs // 2)
        return memory.measure(master, workers, memory.DEFAULT_MARGIN_PERCENT)


@pytest.fixture(scope="module")
def cgroup():
    group = MemoryCgroup()
    try:
        yield group
    finally:
        group.remove()


@pytest.fixture(scope="module")
def svc(tmp_path_factory, cgroup: MemoryCgroup):
    service = CgroupService(tmp_path_factory.mktemp("memory"), cgroup)
    try:
        service.start()
        assert set(service.generation()) <= set(cgroup.pids()), "uWSGI outside the cgroup"
        yield service
    finally:
        cgroup.limit(None)
        service.teardown()


def score(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def nice(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


@pytest.mark.slow
def test_the_loading_generation_has_the_high_score_the_serving_one_its_own(
        svc: CgroupService):
    """The OOM score and the priority: high score, low priority while it loads (srv.ini's
    loading_oom_score_adj and hotswap-loading-nice); the service's own once it serves."""
    normal = int((svc.run_dir / memory.NORMAL_SCORE_NAME).read_text())
    service = priority.normal(svc.run_dir)
    assert service is not None and service.nice == nice(svc.supervisor.pid)
    assert normal == score(svc.supervisor.pid) != LOADING_SCORE
    serving = svc.generation()
    assert [score(pid) for pid in serving] == [normal] * len(serving)
    svc.release_hanging_import()
    try:
        reload = svc.cli_background("reload")
        loading = svc.loading_pid()  # the new master, blocked in its import
        assert score(loading) == LOADING_SCORE
        assert nice(loading) == service.nice + priority.DEFAULT_LOADING_NICE
        assert priority.current(loading).ioprio == priority.IOPRIO_BEST_EFFORT_LOWEST
        assert [nice(pid) for pid in serving] == [service.nice] * len(serving)
        assert [score(pid) for pid in serving] == [normal] * len(serving)
        svc.let_import_finish()
        out, err = reload.communicate(timeout=120)
        assert reload.returncode == 0, out + err
    finally:
        svc.restore_code()
    new = svc.generation()
    assert new[0] == loading and len(new) > 1
    assert [score(pid) for pid in new] == [normal] * len(new), "the new generation kept 1000"
    assert [priority.current(pid) for pid in new] == [service] * len(new), "still low"


@pytest.mark.slow
def test_a_reload_that_does_not_fit_is_refused_and_changes_nothing(svc: CgroupService):
    before = svc.health()
    with LoadGenerator(str(svc.socket), CONNECTIONS, sample_paths(svc)) as load:
        try:
            room = svc.squeeze()
            assert not room.fits, room
            status = svc.status()
            assert status["memory"]["fits"] is False, status["memory"]
            done = svc.cli("reload")
        finally:
            svc.cgroup.limit(None)
    assert done.returncode == ExitCode.NO_ROOM == 7, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("hotswap: not enough memory for a second generation: needs ~"), line
    assert "available" in line and f"limit {memory.human(room.limit)}" in line, line
    assert "forking" not in done.stdout
    after = svc.health()
    assert (after["master_pid"], after["generation"]) == (before["master_pid"],
                                                          before["generation"])
    assert svc.status()["loading_master_pids"] == []
    summary = summarize(load.records)
    assert summary["requests"] > 100 and summary["failed"] == 0, summary


@pytest.mark.slow
def test_a_forced_reload_is_oom_killed_while_loading_and_rolled_back(svc: CgroupService):
    before = svc.health()
    kills = svc.cgroup.oom_kills()
    with LoadGenerator(str(svc.socket), CONNECTIONS, sample_paths(svc)) as load:
        try:
            room = svc.squeeze()
            done = svc.cli("reload", "--force")
            during = svc.health()
        finally:
            svc.cgroup.limit(None)
        # with room again, the same release goes through
        svc.release("v2", terms=TERMS)
        again = svc.cli("reload")
    assert done.returncode == ExitCode.RELOAD_FAILED, done.stdout + done.stderr
    first = done.stderr.splitlines()[0]
    assert "was killed by the kernel's OOM killer while loading" in first, first
    assert f"(limit {memory.human(room.limit)})" in first, first
    assert "rolling-back" in done.stdout
    assert svc.cgroup.oom_kills() > kills
    assert during["master_pid"] == before["master_pid"], "the serving generation was hit"
    assert again.returncode == 0, again.stdout + again.stderr
    after = svc.health()
    svc.seen_masters.add(after["master_pid"])
    assert after["master_pid"] != before["master_pid"]
    assert after["generation"].startswith("v2+")
    summary = summarize(load.records)
    assert summary["requests"] > 100 and summary["failed"] == 0, summary


def shmem_counted(pids: list[int]) -> int:
    """What the estimate added before it knew tmpfs files: Pss_Anon + Pss_Shmem, summed."""
    return sum(memory.rollup(pid).get("Pss_Anon", 0) + memory.rollup(pid).get("Pss_Shmem", 0)
               for pid in pids)


@pytest.mark.slow
def test_a_store_on_tmpfs_in_a_cgroup_is_no_false_refusal():
    """The store on tmpfs counts as Shmem: counted once, the reload fits under a limit the
    old estimate (store counted again) refused, and goes through with nothing lost."""
    if not memory.shmem_devices(os.getpid()) or not Path("/dev/shm").is_dir():
        pytest.skip("no tmpfs at /dev/shm")
    group = MemoryCgroup("-tmpfs")
    root = Path(tempfile.mkdtemp(prefix="hotswap-test-", dir="/dev/shm"))
    service = CgroupService(root, group, mode="store")
    try:
        service.release("v1big", terms=TERMS)  # a store of TERMS terms, not the sample's
        service.start()
        master, *workers = service.generation()
        # every worker reads the whole store once (srv.py's /scan): its pages mapped in each,
        # as after a long day of lookups
        scanned: set[int] = set()

        def scan(_: int) -> int:
            return json.loads(probe.get(str(service.socket), "/scan", 60.0).body)["worker_pid"]

        def every_worker_scanned() -> bool:  # one scan per worker at a time, in parallel
            with ThreadPoolExecutor(len(workers)) as pool:
                scanned.update(pool.map(scan, range(len(workers))))
            return scanned >= set(workers)

        assert procs.wait_until(every_worker_scanned, 120, interval=0.01), scanned
        # Under the load the reload runs under: what in_use is then (the workers' pages, the
        # client's) is what the preflight sees, so measure it there (a fresh-clone run found
        # in_use 18 MiB higher under load than idle, enough to refuse).
        with LoadGenerator(str(service.socket), CONNECTIONS, sample_paths(service)) as load:
            assert procs.wait_until(lambda: len(load.records) > 200, 60), "no load"
            # A margin of 100 %: room for the new generation's real peak, so that the only
            # thing this test can trip on is the store counted twice.
            room = memory.measure(master, workers, 100.0)
            store = sum(memory.shared_files(pid) for pid in (master, *workers))
            assert store > 8 * MIB and room.needs and room.in_use, (store, room)
            counted_twice = 2 * shmem_counted([master, *workers])  # the old estimate, + 100 %
            # room for what the estimate needs, not for the store counted again: halfway
            group.limit(room.in_use + (room.required + counted_twice) // 2)
            squeezed = memory.measure(master, workers, 100.0)
            assert squeezed.fits and counted_twice > squeezed.available, (counted_twice,
                                                                          squeezed)
            kills = group.oom_kills()
            # the same release again: a reload re-imports it beside the serving one
            done = service.cli("reload", "--memory-margin", "100")
        assert done.returncode == 0, done.stdout + done.stderr
        after = service.health()["master_pid"]
        service.seen_masters.add(after)
        assert after != master and group.oom_kills() == kills
        summary = summarize(load.records)
        assert summary["requests"] > 100 and summary["failed"] == 0, summary
    finally:
        group.limit(None)
        service.teardown()
        group.remove()
        shutil.rmtree(root, ignore_errors=True)


# -- the arithmetic, on files made here ---------------------------------------------------------
MIB = memory.MIB


def test_the_tightest_limit_up_the_tree_counts(tmp_path: Path):
    """A v1 hierarchy: the service's own cgroup has no limit, its parent has one."""
    def level(path: Path, limit: int, usage: int, inactive_file: int) -> Path:
        path.mkdir(parents=True)
        (path / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (path / "memory.usage_in_bytes").write_text(f"{usage}\n")
        (path / "memory.stat").write_text(f"cache 1\ntotal_inactive_file {inactive_file}\n")
        (path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
        return path

    level(tmp_path / "slice", 512 * MIB, 400 * MIB, 100 * MIB)
    own = level(tmp_path / "slice" / "svc", 9223372036854771712, 300 * MIB, 50 * MIB)
    group = memory.Cgroup(own, 1, tmp_path)
    assert group.tightest() == (512 * MIB, 300 * MIB)  # the parent's, less its inactive files
    assert group.oom_kills() == 3


def test_cgroup_v2_reads_memory_max_current_and_events(tmp_path: Path):
    parent, own = tmp_path / "system.slice", tmp_path / "system.slice" / "hotswap.service"
    own.mkdir(parents=True)
    for level, limit, current in ((parent, "max", 900 * MIB), (own, f"{256 * MIB}", 200 * MIB)):
        (level / "memory.max").write_text(f"{limit}\n")
        (level / "memory.current").write_text(f"{current}\n")
        (level / "memory.stat").write_text(f"anon 1\ninactive_file {20 * MIB}\n")
    (own / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    group = memory.Cgroup(own, 2, tmp_path)
    assert group.tightest() == (256 * MIB, 180 * MIB)
    assert group.oom_kills() == 1


def test_room_fits_only_when_the_estimate_and_its_margin_fit():
    room = memory.Room(needs=100 * MIB, margin_percent=25, mem_available=10_000 * MIB,
                       cgroup="/x", limit=400 * MIB, in_use=280 * MIB)
    assert room.required == 125 * MIB and room.available == 120 * MIB
    assert not room.fits and room.headroom == -5 * MIB
    assert room.describe() == ("needs ~125 MiB (the serving generation's 100 MiB + 25%), "
                               "120 MiB available (MemAvailable 9.8 GiB; limit 400 MiB, "
                               "280 MiB in use)")
    unknown = memory.Room(needs=None, margin_percent=25, mem_available=None, cgroup=None,
                          limit=None, in_use=None)
    assert unknown.fits and unknown.headroom is None


def test_the_estimate_of_this_process_is_its_anonymous_memory():
    before = memory.estimate([os.getpid()])
    ballast = b"x" * (64 * MIB)  # written: anonymous, private
    after = memory.estimate([os.getpid()])
    assert before is not None and after is not None and after - before >= 60 * MIB
    del ballast


def test_a_file_on_tmpfs_counts_once_shared_anonymous_memory_still_counts(tmp_path: Path):
    """Pages of a mapped file on tmpfs are Shmem to the kernel, like shared anonymous memory;
    a new generation maps the same file (nothing new to hold), but makes its own anonymous
    shared memory. The estimate leaves out the first and keeps the second."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not memory.shmem_devices(os.getpid()):
        pytest.skip("no tmpfs mounted here")
    path = shm / f"hotswap-test-store-{os.getpid()}"
    size = 64 * MIB
    with open(path, "w+b") as handle:
        handle.truncate(size)
        try:
            before = memory.estimate([os.getpid()])
            with mmap.mmap(handle.fileno(), size) as mapped:
                mapped.write(b"x" * size)  # every page resident, as a served store's
                assert memory.rollup(os.getpid())["Pss_Shmem"] >= size
                after = memory.estimate([os.getpid()])
                assert after - before < 8 * MIB, (before, after)
                with mmap.mmap(-1, size // 2) as anonymous:
                    anonymous.write(b"y" * (size // 2))
                    assert memory.estimate([os.getpid()]) - after >= size // 2 - 2 * MIB
        finally:
            path.unlink()
