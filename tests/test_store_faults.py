"""The store's faults under load: a served store changed in place (the workers fall back to
the last good store by themselves, `status` names it, `recover` re-points `current`)."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import pytest
from conftest import Service, sample_paths
from test_store import CONNECTIONS, version_store

from bench.loadgen import LoadGenerator, summarize
from hotswap.protocol import store, store_state
from hotswap.system import procs

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
        paths = (*sample_paths(service, 15), "/scan")
        with LoadGenerator(str(service.socket), CONNECTIONS, paths, max_seconds=120) as load:
            assert procs.wait_until(lambda: len(load.records) > 200, 30)
            os.truncate(v2, v2.stat().st_size // 2)  # what `truncate -s` does
            cut_at = time.time()
            fallback = procs.wait_until(lambda: store_state.Fallback.read(service.run_dir), 30)
            assert fallback, service.log_tail()
            # and every worker serves v1: a respawned one too
            assert procs.wait_until(
                lambda: sum(r.generation.startswith("v1+") for r in load.records) > 300,
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
