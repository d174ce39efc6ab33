"""Releases as directories (hotswap/releases/release.py): deploy, refuse, roll back, prune, list.

One service in a release layout for the module; the tests run in file order and each
leaves the layout serving a good release.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import Lines
from releases_util import LayoutService, lookup_paths

from bench.loadgen import LoadGenerator, summarize
from hotswap.releases import release
from hotswap.swap import lock
from hotswap.system import procs

CONNECTIONS = 32


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    service = LayoutService(tmp_path_factory.mktemp("releases"))
    try:
        done = service.cli("deploy", str(service.source("v1")))
        assert done.returncode == 0, done.stderr
        assert "the first release" in done.stdout
        service.start()
        yield service
    finally:
        service.teardown()


def test_layout_keeps_the_run_dir_outside_the_releases(svc: LayoutService):
    """uWSGI resolves %d to the release folder, yet the FIFOs and socket stay in ROOT/run."""
    master = svc.master()
    assert Path(os.readlink(f"/proc/{master}/cwd")) == (svc.root / "releases" / svc.current())
    assert (svc.run_dir / "0.fifo").exists() and svc.socket.exists()
    assert not (svc.root / "releases" / svc.current() / "run").exists()
    status = svc.status()
    assert status["release"] == {"current": svc.current(), "serving": svc.current()}


@pytest.mark.slow
def test_deploy_good_then_broken_then_rollback_under_load(svc: LayoutService):
    good, broken = svc.source("v2"), svc.broken_source("v3-broken")
    v1 = svc.current()
    counted = reload_counts(svc)
    with LoadGenerator(str(svc.socket), CONNECTIONS, lookup_paths(svc), max_seconds=240) as load:
        done = svc.cli("deploy", str(good))
        assert done.returncode == 0, done.stdout + done.stderr
        assert svc.serving_name() == "v2"
        v2 = svc.current()
        assert v2 != v1 and v2.endswith("-v2")

        done = svc.cli("deploy", str(broken))
        assert done.returncode == 1, done.stdout + done.stderr
        first = done.stderr.splitlines()[0]
        assert first.startswith("hotswap: deploy FAILED") and f"current back on {v2}" in first
        assert "No module named 'hotswap_no_such_module'" in first
        assert svc.current() == v2 and svc.serving_name() == "v2"
        assert not any(r["id"].endswith("v3-broken") for r in svc.releases()), \
            "a release that never served is left behind"

        done = svc.cli("rollback")
        assert done.returncode == 0, done.stdout + done.stderr
        assert svc.current() == v1 and svc.serving_name() == "v1"
    summary = summarize(load.records)
    assert summary["requests"] > 100, summary
    assert summary["failed"] == 0, summary
    rows = {r["id"]: r for r in svc.releases()}
    assert rows[v1]["current"] and rows[v1]["serving"] and not rows[v2]["serving"]
    assert rows[v1]["last_action"]["action"] == "rollback"
    # deploys and rollbacks are reloads in the swap metrics; the release is a label
    after = reload_counts(svc)
    assert (after["ok"] - counted["ok"], after["failed"] - counted["failed"]) == (2, 1)
    info = [line for line in (svc.run_dir / "hotswap.prom").read_text().splitlines()
            if line.startswith("hotswap_generation_info{")]
    assert len(info) == 1 and f'release="{v1}"' in info[0], info


def reload_counts(svc: LayoutService) -> dict[str, float]:
    """hotswap_reloads_total by result, from the textfile (zeros before the first swap)."""
    path = svc.run_dir / "hotswap.prom"
    text = path.read_text() if path.exists() else ""
    found = dict.fromkeys(("ok", "failed"), 0.0)
    for result, value in re.findall(r'^hotswap_reloads_total\{result="(\w+)"\} (\S+)$', text,
                                    re.M):
        found[result] = float(value)
    return found


def test_pruning_keeps_the_newest_and_the_serving_release(svc: LayoutService):
    # current is the oldest release (rolled back to); a deploy --keep 1 keeps only the new one
    source = svc.source("v4")
    # what a clone that has run holds beside the release: none of it is copied
    for folder in ("run", ".git", "data/__pycache__"):
        (source / folder).mkdir()
    os.mkfifo(source / "run" / "0.fifo")
    os.mkfifo(source / "data" / "a.fifo")
    done = svc.cli("deploy", "--keep", "1", str(source))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pruned" in done.stdout
    assert [r["id"] for r in svc.releases()] == [svc.current()]
    assert svc.serving_name() == "v4"
    copied = svc.root / "releases" / svc.current()
    assert sorted(p.name for p in copied.iterdir()) == ["data", "srv.ini", "srv.py"]
    assert [p.name for p in (copied / "data").iterdir()] == ["terms.tsv"]


def test_concurrent_deploy_is_refused(svc: LayoutService):
    gated = svc.gated_source("v5")
    first = svc.cli_background("deploy", str(gated))
    lines = Lines(first)
    lines.wait_for("loading")
    svc.loading_pid()
    done = svc.cli("deploy", str(svc.source("v6")))
    assert done.returncode == 4, done.stdout + done.stderr
    # the refusal names what holds the lock: its command, pid and command line
    assert done.stderr == (f"hotswap: a deploy is in progress (pid {first.pid}, `hotswap "
                           f"deploy {gated}`); refusing to deploy\n"), done.stderr
    done = svc.cli("rollback")
    assert done.returncode == 4 and done.stderr.startswith(
        f"hotswap: a deploy is in progress (pid {first.pid}"), done.stderr
    # the loading phase: the old master serves from the standby FIFO, the new one loads
    old, loading = svc.master(), svc.loading_pid()
    done = svc.cli("status")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"swapping    master {old}, generation v4+"), done.stdout
    assert f"serves while new master {loading} loads" in done.stdout.splitlines()[0]
    svc.let_import_finish()
    code, out, err = lines.finish()
    assert code == 0, out + err
    assert svc.serving_name() == "v5" and svc.current().endswith("-v5")


def test_a_stopped_master_is_refused_before_its_fifo_is_written(svc: LayoutService):
    """kill -STOP: its FIFO would still take "1f" into the pipe, and the master fork on
    `kill -CONT` with nobody watching. Refused first (exit 6); nothing forks afterwards."""
    master, generation = svc.master(), svc.health()["generation"]
    os.kill(master, signal.SIGSTOP)
    try:
        done = svc.cli("reload", "--timeout", "8")
    finally:
        os.kill(master, signal.SIGCONT)
    assert done.returncode == 6, done.stdout + done.stderr
    assert done.stderr == (f"hotswap: master {master} is stopped (state T: kill -STOP, or a "
                           f"debugger holds it); nothing was sent to its FIFO. Resume it with "
                           f"`kill -CONT {master}`, then reload again\n")
    assert "forking" not in done.stdout
    assert not procs.wait_until(lambda: procs.session_leaders_below(master), 3.0), \
        "the resumed master forked: something reached its FIFO"
    assert (svc.master(), svc.health()["generation"]) == (master, generation)


def test_bad_input_one_line_and_nothing_changed(svc: LayoutService, tmp_path: Path):
    before = svc.current()
    done = svc.cli("deploy", str(tmp_path / "missing"))
    assert (done.returncode, done.stderr) == (2, f"hotswap: no such release: "
                                              f"{tmp_path / 'missing'}\n")
    (tmp_path / "nosrv").mkdir()
    (tmp_path / "nosrv" / "srv.ini").write_text((svc.src / "v1" / "srv.ini").read_text())
    done = svc.cli("deploy", str(tmp_path / "nosrv"))
    assert done.returncode == 1 and "lacks" in done.stderr and "srv.py" in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert svc.current() == before
    done = svc.cli("--ini", str(svc.src / "v1" / "srv.ini"), "rollback")
    assert done.returncode == 2 and "is not a release layout" in done.stderr


def test_prune_never_deletes_protected_releases(tmp_path: Path):
    layout = release.Layout(tmp_path)
    for name in ("20260101-000000-000-a", "20260102-000000-000-b", "20260103-000000-000-c",
                 "20260104-000000-000-d"):
        (layout.releases / name).mkdir(parents=True)
    gone = release.prune(layout, keep=1, protect={"20260101-000000-000-a"})
    assert gone == ["20260102-000000-000-b", "20260103-000000-000-c"]
    assert layout.ids() == ["20260101-000000-000-a", "20260104-000000-000-d"]


# -- deploys clean up after themselves (issue 28) ----------------------------------------------
def history(svc: LayoutService) -> list[dict]:
    return release.history(release.Layout(svc.root))


def test_a_deploy_refused_in_the_preflight_leaves_no_rollback_target(svc: LayoutService):
    """No room (the reload's preflight, exit 7): the copy is removed, the history says
    "refused", and neither rollback nor --keep ever counts it."""
    before, ids = svc.current(), [r["id"] for r in svc.releases()]
    with LoadGenerator(str(svc.socket), CONNECTIONS, lookup_paths(svc), max_seconds=60) as load:
        done = svc.cli("deploy", str(svc.source("v7-no-room")),
                       env={"HOTSWAP_MEMORY_MARGIN": "100000000"})
    assert done.returncode == 7, done.stdout + done.stderr
    line = done.stderr.splitlines()[0]
    assert line.startswith("hotswap: deploy FAILED") and "not enough memory" in line, line
    assert line.endswith(f"current still {before}"), line
    assert svc.current() == before and [r["id"] for r in svc.releases()] == ids
    last = history(svc)[-1]
    assert (last["outcome"], last["ok"], last["exit_code"]) == ("refused", False, 7), last
    assert last["release"].endswith("-v7-no-room")
    summary = summarize(load.records)
    assert summary["failed"] == 0, summary


def test_bad_margins_are_refused_with_one_line(svc: LayoutService):
    for args, env in ((["reload", "--memory-margin", "inf"], {}),
                      (["deploy", "--memory-margin", "nan", str(svc.src / "v1")], {}),
                      (["rollback"], {"HOTSWAP_MEMORY_MARGIN": "-5"}),
                      (["watch", "--memory-margin", "1e999"], {})):
        done = svc.cli(*args, env=env)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.splitlines()) == 1 and "finite percentage" in done.stderr, \
            done.stderr


def test_the_next_deploy_removes_what_a_killed_one_left(svc: LayoutService):
    """A deploy SIGKILLed mid-copy leaves releases/<id>.tmp.<pid>: gone at the next deploy
    once that pid is gone, kept while it lives (it may still be copying)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = svc.root / "releases" / f"20260101-000000-000-killed.tmp.{gone.pid}"
    (dead / "data").mkdir(parents=True)
    (dead / "data" / "terms.tsv").write_bytes(b"x" * 100_000)
    alive = svc.root / "releases" / f"20260101-000000-000-copying.tmp.{os.getpid()}"
    alive.mkdir()
    try:
        done = svc.cli("deploy", "--json", str(svc.source("v8")))
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["swept"] == [dead.name]
        assert not dead.exists() and alive.exists()
    finally:
        shutil.rmtree(alive, ignore_errors=True)


def test_a_current_that_is_not_a_link_is_named_with_its_fix(tmp_path: Path):
    """A regular file or a dangling link at ROOT/current: every command says so and names
    the command that fixes it (exit 2), never "(the first release)" nor a realpath error."""
    root = tmp_path / "app"
    hotswap = [sys.executable, "-m", "hotswap", "--ini", str(root / "hotswap.ini")]
    release.init(root, None, None)
    good = "20260101-000000-000-v1"
    (root / "releases" / good).mkdir()
    (root / "current").write_text("releases/" + good)
    src = tmp_path / "src"
    src.mkdir()
    (src / "srv.ini").write_text("[uwsgi]\n")
    for what, commands in (("a regular file, not a link to a release",
                             (["status"], ["deploy", str(src)])),
                            ("a dangling link", (["rollback"], ["deploy", str(src)]))):
        for args in commands:
            done = subprocess.run([*hotswap, *args], capture_output=True, text=True,
                                  timeout=60, check=False)
            assert done.returncode == 2, (args, done.stdout, done.stderr)
            assert done.stderr.count("\n") == 1 and what in done.stderr, done.stderr
            assert f"ln -sfn releases/{good} {root / 'current'}" in done.stderr
            assert "first release" not in done.stdout + done.stderr
        (root / "current").unlink()
        (root / "current").symlink_to("releases/20260101-000000-000-deleted")
    # the command the message names fixes it
    fix = done.stderr.split("`")[1]
    subprocess.run(fix, shell=True, check=True, cwd=root)
    assert release.Layout(root).current_problem() is None
    assert release.Layout(root).current_id() == good


def test_releases_no_deploy_made_serve_are_no_target_and_take_no_slot(tmp_path: Path):
    layout = release.Layout(tmp_path)
    a, b, bad, c = ("20260101-000000-000-a", "20260102-000000-000-b",
                    "20260103-000000-000-bad", "20260104-000000-000-c")
    for name in (a, b, bad, c):
        (layout.releases / name).mkdir(parents=True)
    layout.history_file.parent.mkdir()
    lines = [{"action": "deploy", "ok": True, "release": a, "previous": None},
             {"action": "deploy", "ok": True, "release": b, "previous": a},
             {"action": "deploy", "ok": False, "outcome": "refused", "release": bad,
              "previous": b},
             {"action": "deploy", "ok": True, "release": c, "previous": b}]
    layout.history_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert release.never_served(layout) == {bad}
    assert release.good_ids(layout) == [a, b, c]
    # --keep 2: c and b stay (b served before c); the refused one takes no slot
    assert release.prune(layout, keep=2, protect={c}) == [a, bad]
    assert layout.ids() == [b, c]


def test_cut_archives_are_refused_in_one_line(svc: LayoutService, tmp_path: Path):
    """A .tgz cut short, and a plain tar cut at a member boundary (which tarfile would
    unpack as a valid, shorter release): exit 2, one line, nothing deployed."""
    before, ids = svc.current(), [r["id"] for r in svc.releases()]
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as archive:
        archive.add(svc.src / "v1", arcname="v1")
    data = whole.read_bytes()
    with tarfile.open(whole) as archive:
        offsets = [member.offset for member in archive.getmembers()]
    cut_tar, cut_tgz = tmp_path / "cut.tar", tmp_path / "cut.tgz"
    cut_tar.write_bytes(data[:offsets[-1]])  # every member but the last, no end blocks
    packed = gzip.compress(data)
    cut_tgz.write_bytes(packed[:len(packed) // 2])
    for cut in (cut_tar, cut_tgz):
        done = svc.cli("deploy", str(cut))
        assert done.returncode == 2, done.stdout + done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert f"{cut} is not a complete archive" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert release.history(release.Layout(svc.root))[-1]["outcome"] == "refused"
    assert svc.current() == before and [r["id"] for r in svc.releases()] == ids


def test_a_deploy_interrupted_while_copying_is_recorded_and_leaves_nothing(svc: LayoutService,
                                                                           tmp_path: Path):
    """SIGTERM while the copy waits on its source (here a FIFO named like a tarball, which
    blocks the copy until the test acts): exit 1, one line, the history says "interrupted",
    and no staged copy is left under releases/."""
    before, ids = svc.current(), [r["id"] for r in svc.releases()]
    source = tmp_path / "slow.tar"
    os.mkfifo(source)
    deploy = svc.cli_background("deploy", str(source))

    def copying() -> bool:  # it holds the lock: next, it blocks opening its source
        try:
            holder = lock.Holder.parse((svc.run_dir / "reload.lock").read_text())
        except FileNotFoundError:
            return False
        return bool(holder and holder.pid == deploy.pid)

    assert procs.wait_until(copying, 60), "the deploy never took the lock"
    os.kill(deploy.pid, signal.SIGTERM)
    out, err = deploy.communicate(timeout=60)
    assert deploy.returncode == 1, out + err
    assert err.startswith("hotswap: deploy FAILED") and err.count("\n") == 1, err
    assert err.rstrip().endswith(f"deploy interrupted by SIGTERM before the swap; current "
                                 f"still {before}"), err
    last = history(svc)[-1]
    assert (last["outcome"], last["exit_code"]) == ("interrupted", 1), last
    assert sorted(p.name for p in (svc.root / "releases").iterdir()) == ids
    assert svc.current() == before
