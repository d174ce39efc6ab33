"""The store's faults under load: a served store changed in place (the workers fall back to
the last good store by themselves, `status` names it, `recover` re-points `current`); stores
only the app's checks refuse; a refresh interrupted at each phase."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, Lines, Service, SlowRequest, sample_paths
from releases_util import LayoutService, lookup_paths
from test_store import CONNECTIONS, version_store

from bench.loadgen import LoadGenerator, summarize
from hotswap import config
from hotswap.protocol import store, store_state
from hotswap.protocol.store_record import Phase, StoreSwitch
from hotswap.swap.store_repair import repair_fallback
from hotswap.swap.store_switch import repair_switch
from hotswap.system import procs, stats
from scripts.build_store import main as build_store
from scripts.build_store import read_table

SIGBUS_DEATH = re.compile(r"worker \d+ \(pid: (\d+)\) died, killed by signal 7")


def uwsgi_log(service: Service) -> str:
    return (service.root / "log" / "uwsgi.log").read_text(errors="replace")


def test_published_stores_are_read_only(tmp_path: Path):
    path = tmp_path / "terms-v1.lmdb"
    store.build([(b"a", b"x")], path, "v1")
    assert stat.S_IMODE(path.stat().st_mode) == store.PUBLISHED_MODE


def test_marks_tell_a_changed_file(tmp_path: Path):
    path = tmp_path / "terms-v1.lmdb"
    store.build([(b"a", b"x"), (b"b", b"y")], path, "v1")
    mark = store_state.Mark.of(str(path), "v1", "sha")
    assert mark.change_on_disk() is None
    os.truncate(path, 4096)
    assert "size" in mark.change_on_disk()
    good = store_state.GoodStores((mark,))
    assert good.fallback_for(str(tmp_path / "other.lmdb")) is None  # the only one changed


READER_AFTER_A_CUT = """
import lmdb, os, sys
env = lmdb.open(sys.argv[1], subdir=False, readonly=True, lock=False, max_dbs=2,
                map_size=os.path.getsize(sys.argv[1]))
txn = env.begin(db=env.open_db(b"terms", create=False))
print("before:", txn.get(b"t000001").decode(), flush=True)
os.truncate(sys.argv[1], os.path.getsize(sys.argv[1]) // 2)
print("after:", txn.get(b"t000002").decode(), flush=True)
"""


def test_a_truncated_store_kills_its_reader_with_sigbus(tmp_path: Path):
    """What docs/store.md says: LMDB reads through its mapping with no size check, and a
    lookup walks from the root page, which a copy-on-write B-tree writes last: cut the file
    in half and even a key of the first half is out of reach (SIGBUS, not an exception)."""
    path = tmp_path / "terms-v1.lmdb"
    store.build(sorted((f"t{i:06d}".encode(), b"noun,v1") for i in range(50_000)), path, "v1")
    done = subprocess.run([sys.executable, "-c", READER_AFTER_A_CUT, str(path)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == -signal.SIGBUS, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == "before: noun,v1\n"


def test_the_refresh_record_tells_workers_which_store(tmp_path: Path):
    dead = subprocess.Popen(["true"])  # a pid that has exited
    dead.wait()
    record = StoreSwitch(Phase.SWITCHING, "p", "/old", "v1", "a", "/new", "v2", "b",
                         os.getpid())
    assert record.store_for_workers() is None  # its refresh runs: follow the pointer
    orphan = dataclasses.replace(record, pid=dead.pid)
    assert orphan.store_for_workers() == "/old"
    assert dataclasses.replace(orphan, phase=Phase.COMMITTED).store_for_workers() == "/new"
    assert dataclasses.replace(orphan, phase=Phase.DONE).store_for_workers() is None
    orphan.write(tmp_path)
    assert StoreSwitch.read(tmp_path) == orphan


def killed_refresh(tmp_path: Path, phase: Phase) -> tuple[config.Config, StoreSwitch]:
    """An instance folder (nothing running) whose refresh v1 -> v2 was killed in `phase`."""
    shutil.copy(REPO / "srv.ini", tmp_path / "srv.ini")
    cfg = config.load(tmp_path / "srv.ini")
    cfg.run_dir.mkdir()
    old, new = tmp_path / "terms-v1.lmdb", tmp_path / "terms-v2.lmdb"
    for path, version in ((old, "v1"), (new, "v2")):
        store.build([(b"a", version.encode())], path, version)
    store.point(tmp_path / "current", new)
    dead = subprocess.Popen(["true"])
    dead.wait()
    record = StoreSwitch(phase, str(tmp_path / "current"), str(old), "v1", "a", str(new),
                         "v2", "b", dead.pid)
    record.write(cfg.run_dir)
    return cfg, record


def test_a_refresh_killed_before_its_commit_point_is_undone(tmp_path: Path):
    cfg, record = killed_refresh(tmp_path, Phase.SWITCHING)
    started = time.monotonic()
    assert "rolled back the refresh to store v2" in repair_switch(cfg)[0]
    assert time.monotonic() - started < 5  # no worker to wait for
    assert os.readlink(tmp_path / "current") == "terms-v1.lmdb"
    assert StoreSwitch.read(cfg.run_dir).phase is Phase.ROLLED_BACK


def test_a_refresh_killed_after_its_commit_point_is_finished(tmp_path: Path):
    cfg, record = killed_refresh(tmp_path, Phase.COMMITTED)
    new = Path(record.new_path)
    store_state.Fallback("/x", "v0", "size", "/old", "v1", "p", 1, "t").write(cfg.run_dir)
    assert "finished the refresh to store v2" in repair_switch(cfg)[0]
    assert StoreSwitch.read(cfg.run_dir).phase is Phase.DONE
    assert store_state.GoodStores.read(cfg.run_dir).marks[0].path == str(new)
    assert store_state.Fallback.read(cfg.run_dir) is None
    assert repair_switch(cfg) == []  # nothing left: safe to repeat


@pytest.mark.slow
def test_a_truncated_store_falls_back_to_the_last_good_one(tmp_path: Path):
    service = Service(tmp_path, mode="store")
    try:
        service.start()
        v2 = version_store(service, "v2")
        done = service.cli("refresh", str(v2))
        assert done.returncode == 0, done.stdout + done.stderr
        # full scans among the lookups: some worker is reading far into the file when it is
        # cut, and dies of SIGBUS (the respawned worker must not open the cut file again)
        paths = (*sample_paths(service, 15), "/scan?limit=40000")
        with LoadGenerator(str(service.socket), CONNECTIONS, paths, max_seconds=120) as load:
            assert procs.wait_until(lambda: len(load.records) > 200, 30)
            os.truncate(v2, v2.stat().st_size // 2)  # what `truncate -s` does
            cut_at = time.time()
            fallback = procs.wait_until(lambda: store_state.Fallback.read(service.run_dir), 30)
            assert fallback, service.log_tail()
            # and every worker serves v1: a respawned one too
            assert procs.wait_until(
                lambda: sum(r.generation.startswith("v1+") for r in load.records) > 100,
                60), summarize(load.records)
        summary = summarize(load.records)
        status = service.cli("status")
        recovered = service.cli("recover")
        after = service.cli("status")
        reload = service.cli("reload")
    finally:
        service.teardown()
    # the requests killed by the fault itself: one in flight in each worker SIGBUS killed
    killed = SIGBUS_DEATH.findall(uwsgi_log(service))
    assert summary["failed"] <= len(killed), (summary, killed)
    # each request checks its store first: only those in flight when the file was cut fail
    late = [r for r in load.records if r.outcome != "ok" and r.started > cut_at]
    assert not late, late[:5]
    assert (fallback.broken_path, fallback.path) == (str(v2), str(service.store_dir /
                                                                   "terms-v1.lmdb"))
    assert "size" in fallback.cause
    assert uwsgi_log(service).count("FALLBACK:") == 1
    assert status.returncode == 6 and "store fallback" in status.stdout, status.stdout
    assert "recover" in status.stdout
    assert recovered.returncode == 0 and "pointed" in recovered.stdout, recovered.stdout
    assert os.readlink(service.store_dir / "current") == "terms-v1.lmdb"
    assert after.returncode == 0, after.stdout
    assert reload.returncode == 0, reload.stdout + reload.stderr
    print(json.dumps({"summary": summary, "sigbus_deaths": len(killed)}))


# -- refresh: the app's checks, and its commit point ---------------------------------------

def served(service: Service) -> tuple[set[str], str]:
    """The store version every live worker reports, and the file the pointer names."""
    pids = [w["pid"] for w in stats.workers(stats.read(service.run_dir / "stats.sock") or {})]
    reports = store.read_reports(service.run_dir, pids)
    assert len(reports) == len(pids) and pids, (pids, reports)
    return {r.version for r in reports.values()}, os.readlink(service.store_dir / "current")


def consistently(service: Service, version: str) -> bool:
    """Every worker serves `version` and the pointer names it (polled: a worker busy with a
    request switches after it)."""
    return bool(procs.wait_until(
        lambda: served(service) == ({version}, store.store_file_name(version)), 30))


@pytest.mark.slow
def test_refresh_refuses_stores_the_app_cannot_serve(tmp_path: Path):
    service = Service(tmp_path, mode="store")
    try:
        before = service.start()
        empty = service.store_dir / "terms-empty.lmdb"
        store.build([], empty, "empty")
        _, pairs = read_table(str(service.root / "data" / "terms.tsv"))
        latin = service.store_dir / "terms-latin.lmdb"
        store.build(((k, b"caf\xe9") for k, v in pairs), latin, "latin")
        with LoadGenerator(str(service.socket), CONNECTIONS, sample_paths(service)) as load:
            refusals = [service.cli("refresh", str(path)) for path in (empty, latin)]
        summary = summarize(load.records)
        health = service.health()
    finally:
        service.teardown()
    for done, cause in zip(refusals, ("StopIteration", "SmokeError"), strict=True):
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert "store refused by the app's checks" in done.stderr and cause in done.stderr
        assert "v1 still serves" in done.stderr
    assert "UnicodeDecodeError" in refusals[1].stderr
    assert summary["failed"] == 0 and summary["requests"] > 100, summary
    assert health["generation"] == before["generation"]


def refresh_in_background(service: Service, path: Path):
    process = service.cli_background("refresh", str(path), "--timeout", "60")
    return process, Lines(process)


@pytest.mark.slow
def test_refresh_interrupted_at_each_phase_leaves_one_store(tmp_path: Path):
    service = Service(tmp_path, mode="store")
    try:
        service.start()
        outcomes = {}
        with LoadGenerator(str(service.socket), CONNECTIONS, sample_paths(service),
                           max_seconds=240) as load:
            # the app check (importing srv.py in a child) holds: nothing switched yet
            for n, signum in ((2, signal.SIGINT), (3, signal.SIGKILL)):
                service.release_hanging_import()
                process, lines = refresh_in_background(service, version_store(service, f"v{n}"))
                lines.wait_for("checking")
                checker = service.loading_pid()
                os.kill(process.pid, signum)
                code, out, err = lines.finish()
                procs.signal_quietly(checker, signal.SIGKILL)  # orphaned by the SIGKILL
                service.restore_code()
                outcomes[f"checking/{signum.name}"] = (code, err)
                assert consistently(service, "v1"), served(service)
            # a worker busy with a slow request holds the switch: before the commit point
            for n, signum in ((4, signal.SIGTERM), (5, signal.SIGKILL)):
                slow = SlowRequest(service, 3)
                process, lines = refresh_in_background(service, version_store(service, f"v{n}"))
                lines.wait_for("switching")
                os.kill(process.pid, signum)
                code, out, err = lines.finish()
                outcomes[f"switching/{signum.name}"] = (code, err)
                if signum is signal.SIGKILL:
                    respawned = respawn_a_worker(service)
                    status = service.cli("status")
                    recover = service.cli("recover")
                assert slow.result().status == 200
                assert consistently(service, "v1"), served(service)
            # killed in switching again, repaired this time by the next reload, before it forks
            slow = SlowRequest(service, 3)
            process, lines = refresh_in_background(service, version_store(service, "v6"))
            lines.wait_for("switching")
            os.kill(process.pid, signal.SIGKILL)
            lines.finish()
            reload = service.cli("reload")
            assert slow.result().status == 200
            service.wait_ready()
            assert consistently(service, "v1"), served(service)
            after = service.cli("refresh", str(version_store(service, "v7")))
        summary = summarize(load.records)
    finally:
        service.teardown()
    for phase in ("checking", "switching"):
        code, err = outcomes[f"{phase}/SIGKILL"]
        assert code == -signal.SIGKILL
    assert outcomes["checking/SIGINT"][0] == 1, outcomes
    assert "interrupted" in outcomes["checking/SIGINT"][1]
    assert outcomes["switching/SIGTERM"][0] == 1, outcomes
    assert "interrupted by SIGTERM before the commit point" in outcomes["switching/SIGTERM"][1]
    assert "store v1 serves again" in outcomes["switching/SIGTERM"][1]
    assert status.returncode == 6 and "was killed in its switching phase" in status.stdout
    assert recover.returncode == 0 and "rolled back the refresh to store v5" in recover.stdout
    assert reload.returncode == 0, reload.stdout + reload.stderr
    assert "repaired: rolled back the refresh to store v6" in reload.stdout, reload.stdout
    assert after.returncode == 0, after.stdout + after.stderr
    # a worker respawned while the killed refresh's pointer was half-switched serves the old
    # store its record names, not the pointer's
    assert respawned == "v1"
    # the one request the test killed with that worker, if it was busy, is all that failed
    assert summary["failed"] <= 1, summary


def respawn_a_worker(service: Service) -> str:
    """SIGKILL a worker that is not busy with the slow request; the store its successor
    reports."""
    def one_idle() -> int | None:
        workers = stats.workers(stats.read(service.run_dir / "stats.sock") or {})
        return next((w["pid"] for w in workers if w["status"] == "idle"), None)

    victim = procs.wait_until(one_idle, 30)
    assert victim, served(service)
    before = set(procs.children(service.master()))
    os.kill(victim, signal.SIGKILL)

    def successor_report() -> str | None:
        fresh = set(procs.children(service.master())) - before
        reports = store.read_reports(service.run_dir, fresh)
        return next((r.version for r in reports.values()), None)

    found = procs.wait_until(successor_report, 30)
    assert found, service.log_tail()
    return found


# -- refresh in a release layout, and through `watch` ---------------------------------------

def store_source(service: LayoutService, name: str) -> Path:
    """A release folder whose srv.py serves a store of its table (data/store/current)."""
    folder = service.source(name)
    assert build_store([str(folder / "data" / "terms.tsv"), "-o", str(folder / "data" /
                        "store"), "--version", name, "--point"]) == 0
    return folder


def layout_store(service: LayoutService, version: str) -> Path:
    """A store outside the releases (where a data pipeline would write it)."""
    path = service.root / "stores" / store.store_file_name(version)
    _, pairs = read_table(str(service.resource))
    store.build(((k, v + b"," + version.encode()) for k, v in pairs), path, version)
    return path


@pytest.mark.slow
def test_refresh_in_a_release_layout_and_through_watch(tmp_path: Path):
    service = LayoutService(tmp_path)
    service.mode = "store"
    try:
        assert service.cli("deploy", str(store_source(service, "v1"))).returncode == 0
        service.start()
        with LoadGenerator(str(service.socket), CONNECTIONS, lookup_paths(service),
                           max_seconds=240) as load:
            done = service.cli("refresh", str(layout_store(service, "v2")))
            reports = list((service.run_dir / store.REPORT_DIR).glob("*.json"))
            served_v2 = service.serving_name()
            watcher = service.cli_background("watch", "--quiet", "0.5", "--verbose")
            lines = Lines(watcher)
            lines.wait_for("watching")
            dropped = service.root / "drop" / store.store_file_name("v3")
            os.replace(layout_store(service, "v3"), dropped)
            lines.wait_for(f"refresh {dropped}: ok", timeout=120)
            served_v3 = service.serving_name()
            watcher.send_signal(signal.SIGTERM)
            code, _, _ = lines.finish()
        summary = summarize(load.records)
    finally:
        service.teardown()
    assert done.returncode == 0, done.stdout + done.stderr
    assert reports and served_v2 == "v2"
    assert served_v3 == "v3" and code == 0, lines.lines
    assert summary["failed"] == 0, summary


def test_recover_after_a_fallback_repoints_current_unless_someone_did(tmp_path: Path):
    for version in ("v1", "v2", "v3"):
        store.build([(b"a", version.encode())], tmp_path / f"terms-{version}.lmdb", version)
    pointer = tmp_path / "current"

    def fallen_back() -> None:
        store.point(pointer, tmp_path / "terms-v2.lmdb")
        store_state.Fallback(str(tmp_path / "terms-v2.lmdb"), "v2", "size 2 -> 1 bytes",
                             str(tmp_path / "terms-v1.lmdb"), "v1", str(pointer), 1,
                             "t").write(tmp_path)

    fallen_back()
    assert "pointed" in repair_fallback(tmp_path)[0]
    assert os.readlink(pointer) == "terms-v1.lmdb"
    assert store_state.Fallback.read(tmp_path) is None and repair_fallback(tmp_path) == []
    fallen_back()
    store.point(pointer, tmp_path / "terms-v3.lmdb")  # the operator chose another store
    assert "no longer names it" in repair_fallback(tmp_path)[0]
    assert os.readlink(pointer) == "terms-v3.lmdb"
