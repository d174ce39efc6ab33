"""What an operator or a cleanup job may do to run/, srv.ini and the logs of a live instance
(issue 14), under 32 clients: the CLI keeps hold of the instance, names what is wrong,
repairs what it can, and refuses what a reload cannot apply, with 0 failed requests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, Service, SlowRequest, sample_paths

from bench.loadgen import LoadGenerator, summarize
from hotswap.system import procs

pytestmark = pytest.mark.slow
CONNECTIONS = 32


def status(service: Service) -> tuple[int, dict]:
    done = service.cli("status", "--json", timeout=60)
    return done.returncode, json.loads(done.stdout)


def reload_ok(service: Service, version: str) -> dict:
    service.release(version=version)
    done = service.cli("reload", "--json")
    result = json.loads(done.stdout)
    assert done.returncode == 0, result
    service.seen_masters.add(result["new_master"])
    assert service.health()["generation"].startswith(f"{version}+")
    return result


def no_failures(load: LoadGenerator) -> dict:
    summary = summarize(load.records)
    assert summary["failed"] == 0, summary
    return summary


def replace_with_file(path: Path) -> None:
    beside = path.with_name(path.name + ".new")
    beside.write_text("not a fifo\n")
    os.replace(beside, path)


@pytest.mark.parametrize("damage", [Path.unlink, replace_with_file],
                         ids=["deleted", "replaced-by-a-file"])
def test_a_live_fifo_removed_under_the_master_is_named_and_recreated(service: Service, damage):
    before = service.start()
    master = before["master_pid"]
    with LoadGenerator(str(service.socket), CONNECTIONS, sample_paths(service)) as load:
        damage(service.run_dir / "0.fifo")
        code, report = status(service)
        assert code == 6, report
        assert report["running"] and report["master_pid"] == master
        assert report["fifos"]["live"]["state"] == "detached"
        assert any(f"master {master} serves, but its live FIFO" in p and "hotswap recover" in p
                   for p in report["problems"]), report["problems"]
        # start refuses a second instance, and names the way out
        started = service.cli("start", timeout=60)
        assert started.returncode == 4 and "hotswap recover" in started.stderr, started.stderr
        recovered = service.cli("recover")
        assert recovered.returncode == 0 and "re-created" in recovered.stdout, recovered
        code, report = status(service)
        assert code == 0 and report["fifos"]["live"]["state"] == "listening", report
        reload_ok(service, "v2")
    no_failures(load)


def test_run_dir_removed_the_instance_is_still_found_and_stops(service: Service):
    before = service.start()
    shutil.rmtree(service.run_dir)
    started = service.cli("start", timeout=60)
    assert started.returncode == 4, started.stderr
    assert f"master {before['master_pid']}" in started.stderr
    assert "removed" in started.stderr and len(started.stderr.strip().splitlines()) == 1
    code, report = status(service)
    assert code == 6 and report["master_pid"] == before["master_pid"]
    assert any("nothing accepts" in p and "hotswap stop && hotswap start" in p
               for p in report["problems"]), report["problems"]
    stopped = service.cli("stop", "--timeout", "20")
    assert stopped.returncode == 0, stopped.stderr
    assert procs.wait_gone([before["master_pid"]], 20)
    assert service.cli("status").returncode == 3


def test_make_clean_refuses_while_an_instance_runs(service: Service):
    service.start()
    make = ["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "-C",
            str(service.root), f"BIN={REPO / '.venv' / 'bin'}", "clean"]
    refused = subprocess.run(make, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "make stop" in refused.stderr, refused.stderr
    assert (service.run_dir / "0.fifo").exists()
    assert service.cli("stop", "--timeout", "20").returncode == 0
    cleaned = subprocess.run(make, capture_output=True, text=True, timeout=60)
    assert cleaned.returncode == 0, cleaned.stderr
    assert not service.run_dir.exists()


def test_a_socket_change_is_refused_before_forking(service: Service):
    before = service.start()
    original = service.ini.read_text()
    with LoadGenerator(str(service.socket), CONNECTIONS, sample_paths(service)) as load:
        service.ini.write_text(original.replace("http-socket = %(run_dir)/http.sock",
                                                "http-socket = %(run_dir)/other.sock"))
        done = service.cli("reload")
        assert done.returncode == 2, done.stdout + done.stderr
        assert "http-socket changed" in done.stderr and "restart" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert service.health()["master_pid"] == before["master_pid"]
        assert not procs.session_leaders_below(before["master_pid"]), "it forked anyway"
        # status asks the socket that serves and names the edit: a notice, not a page
        status = service.cli("status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        document = json.loads(status.stdout)
        assert not document["problems"], document["problems"]
        assert any("http-socket changed" in n for n in document["notices"]), document
        service.ini.write_text(original)
        reload_ok(service, "v2")
    no_failures(load)


def test_logs_rotated_during_load_keep_reloads_working(service: Service, tmp_path: Path):
    service.start()
    log = service.root / "log" / "uwsgi.log"
    config = tmp_path / "logrotate.conf"
    shipped = (REPO / "deploy" / "logrotate.conf").read_text()
    config.write_text(shipped.replace("/var/log/hotswap/uwsgi.log", str(log))
                      .replace("    su hotswap hotswap\n", ""))
    with LoadGenerator(str(service.socket), CONNECTIONS, sample_paths(service)) as load:
        rotate = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"), str(config)],
                                capture_output=True, text=True, timeout=60)
        assert rotate.returncode == 0, rotate.stderr
        assert log.with_name("uwsgi.log.1").exists()
        result = reload_ok(service, "v2")
        assert "paused 4/4" in " ".join(p["detail"] for p in result["phases"]), result
        # a rotation by rename (no copytruncate): the next swaps still work, and a failed
        # one still shows its cause
        os.replace(log, log.with_name("uwsgi.log.renamed"))
        reload_ok(service, "v3")
        service.release_code("raise RuntimeError('release 4 is broken')\n")
        failed = service.cli("reload")
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "release 4 is broken" in failed.stderr, failed.stderr
        code, report = status(service)
        assert code == 0 and report["generation"].startswith("v3+"), report
    no_failures(load)


def test_busy_and_silent_are_told_apart(service: Service):
    service.start()
    # a swap whose old master outlives --drain: the next reload waits for it within its own
    # --drain, and past that is "busy" (4), with the time
    slow = SlowRequest(service, seconds=12)
    done = service.cli("reload", "--drain", "0.2")
    assert done.returncode == 0, done.stderr
    service.seen_masters.add(service.health()["master_pid"])
    again = service.cli("reload", "--drain", "0.5")
    assert again.returncode == 4, done.stdout + done.stderr + again.stdout + again.stderr
    assert "still draining" in again.stderr and "(for " in again.stderr
    assert slow.result().status == 200
    # every worker busy: /healthz is silent, and status says so with a non-zero code
    slows = [SlowRequest(service, seconds=12) for _ in range(4)]
    code, report = status(service)
    assert code == 6 and report["running"] and not report["healthy"], report
    assert any("does not answer" in p for p in report["problems"]), report["problems"]
    refused = service.cli("reload")
    assert refused.returncode == 6 and "--force" in refused.stderr, refused.stderr
    for slow in slows:
        assert slow.result().status == 200
    assert status(service)[0] == 0
    reload_ok(service, "v2")
    code, report = status(service)
    assert report["fifos"]["standby"]["state"] == "missing", report["fifos"]


def test_status_lists_workers_after_a_rollback_that_took_the_stats_socket(service: Service):
    before = service.start()
    service.release_hanging_import()
    reload = service.cli_background("reload", "--timeout", "3")
    service.loading_pid()
    out, err = reload.communicate(timeout=60)
    assert reload.returncode == 5, out + err
    code, report = status(service)
    assert code == 0, report
    assert report["master_pid"] == before["master_pid"]
    assert len(report["workers"]) == 4, report["workers"]
