"""`hotswap watch`: the Planner's rules on a fake clock, then a real watcher over a real
service in the release layout (one of each for the module, tests in file order)."""

from __future__ import annotations

import os
import shutil
import signal
import tarfile
import threading
from pathlib import Path

import pytest
from conftest import Lines
from releases_util import LayoutService, lookup_paths

from bench.loadgen import LoadGenerator, summarize
from hotswap.releases import release
from hotswap.releases.watch import Action, Kind, Outcome, Planner, Verdict, Watcher, classify
from hotswap.swap import lock
from hotswap.system import procs

DROP = Path("/drop")
QUIET = 2.0


# -- the rules, in milliseconds -------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    """Scripted outcomes; `during` lands more entries while an action runs."""

    def __init__(self, clock: Clock, fail: set[str] = frozenset()) -> None:
        self.clock = clock
        self.fail = fail
        self.actions: list[Action] = []
        self.discarded: list[Path] = []
        self.during: list[Path] = []
        self.watcher: Watcher | None = None
        self.target: str | None = None  # where `current` points (None: not followed)
        self.verdicts: list[Verdict] = []  # what reconcile() answers, in turn
        self.writers: dict[str, list[int]] = {}  # entry name -> writer() answers, in turn
        self.taken: set[str] = set()  # entries a recorded deploy already took
        self.busy: set[str] = set()  # entries whose next run is refused as busy (exit 4)

    def current(self) -> str | None:
        return self.target

    def reconcile(self) -> tuple[Verdict, str]:
        return self.verdicts.pop(0), "scripted"

    def writer(self, path: Path) -> int | None:
        answers = self.writers.get(path.name)
        return answers.pop(0) if answers else None

    def deployed(self, path: Path) -> str | None:
        return "release r at t" if path.name in self.taken else None

    def run(self, action: Action) -> Outcome:
        self.actions.append(action)
        self.clock.now += 1.5  # the swap takes a while
        if action.path.name in self.busy:
            self.busy.discard(action.path.name)
            return Outcome(False, 4, "hotswap: a reload is in progress (pid 9)", 0.1)
        if self.during and self.watcher:
            self.watcher.feed(self.during)
            self.during = []
        ok = action.path.name not in self.fail
        return Outcome(ok, 0 if ok else 1, "ok" if ok else "hotswap: deploy FAILED", 1.5)

    def discard(self, path: Path) -> None:
        self.discarded.append(path)


def kind_by_name(path: Path) -> Kind | None:
    if path.name.startswith(".") or path.name.startswith("gone"):
        return None
    return Kind.DATA if path.name.endswith(".lmdb") else Kind.CODE


def make(fail: set[str] = frozenset(), found: tuple[Path, ...] = ()
         ) -> tuple[Watcher, FakeRunner, Clock, list[str]]:
    clock, logged = Clock(), []
    runner = FakeRunner(clock, fail)
    watcher = Watcher(Planner(DROP, QUIET, kind_by_name), runner, logged.append, clock,
                      scan=lambda: found)
    runner.watcher = watcher
    return watcher, runner, clock, logged


def advance(watcher: Watcher, clock: Clock, seconds: float, step: float = 0.25) -> None:
    """Ticks of the loop with no new change, as the empty batches of the real one."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += step
        watcher.tick()


def test_a_slow_copy_waits_for_quiet_then_acts_once():
    watcher, runner, clock, _ = make()
    for part in ("rel", "rel/srv.ini", "rel/data/terms.tsv", "rel/data/terms.tsv", "rel/srv.py"):
        watcher.feed([DROP / part])
        advance(watcher, clock, QUIET - 0.5)  # each piece lands before the quiet period ends
        assert runner.actions == []
    advance(watcher, clock, QUIET + 0.5)
    assert runner.actions == [Action(Kind.CODE, DROP / "rel")]
    advance(watcher, clock, 10 * QUIET)
    assert len(runner.actions) == 1
    assert runner.discarded == [DROP / "rel"]


def test_a_burst_deploys_only_the_newest():
    watcher, runner, clock, logged = make()
    watcher.feed([DROP / f"r{n}" for n in range(1, 6)])
    advance(watcher, clock, QUIET + 0.5)
    assert runner.actions == [Action(Kind.CODE, DROP / "r5",
                                     tuple(DROP / f"r{n}" for n in range(1, 5)))]
    assert "superseding r1, r2, r3, r4" in logged[0]
    assert runner.discarded == [DROP / f"r{n}" for n in (5, 1, 2, 3, 4)]


def test_what_lands_during_a_swap_is_one_follow_up():
    watcher, runner, clock, _ = make()
    watcher.feed([DROP / "a"])
    runner.during = [DROP / "b", DROP / "c", DROP / "d"]
    advance(watcher, clock, QUIET + 0.5)
    assert [a.path.name for a in runner.actions] == ["a"]
    advance(watcher, clock, QUIET + 0.5)
    assert [a.path.name for a in runner.actions] == ["a", "d"]
    advance(watcher, clock, 10 * QUIET)
    assert len(runner.actions) == 2


def test_a_failed_release_is_reported_once_and_retried_only_when_it_changes():
    watcher, runner, clock, logged = make(fail={"bad"})
    watcher.feed([DROP / "bad"])
    advance(watcher, clock, 20 * QUIET)
    assert [a.path.name for a in runner.actions] == ["bad"]
    assert runner.discarded == []
    assert "FAILED (exit 1)" in logged[-1] and "not retried until it changes" in logged[-1]
    watcher.feed([DROP / "bad" / "srv.py"])  # the operator fixes it in place
    advance(watcher, clock, QUIET + 0.5)
    assert [a.path.name for a in runner.actions] == ["bad", "bad"]


def test_ignored_and_removed_entries_never_act_and_code_goes_before_data():
    watcher, runner, clock, _ = make()
    watcher.feed([DROP / ".rel.tmp", DROP / "gone", DROP, Path("/elsewhere/x")])
    advance(watcher, clock, 3 * QUIET)
    assert runner.actions == []
    watcher.feed([DROP / "terms-v2.lmdb", DROP / "rel"])
    advance(watcher, clock, QUIET + 0.5)
    advance(watcher, clock, QUIET + 0.5)
    assert [(a.kind, a.path.name) for a in runner.actions] == [
        (Kind.CODE, "rel"), (Kind.DATA, "terms-v2.lmdb")]


def test_a_flip_of_current_is_checked_once_after_quiet_and_reloads_only_if_needed():
    watcher, runner, clock, logged = make()
    runner.target = "r1"
    watcher.check_current()
    runner.target = "r2"  # flipped by hand...
    watcher.check_current()
    runner.target = "r3"  # ...twice
    watcher.check_current()
    runner.verdicts = [Verdict.LATER, Verdict.RUN]  # a swap under way, then a reload needed
    advance(watcher, clock, QUIET + 0.5)
    assert runner.actions == []
    advance(watcher, clock, QUIET + 0.5)
    assert runner.actions == [Action(Kind.CURRENT, Path("current"))]
    assert logged[0] == "reload current (scripted): running"
    runner.target = "r4"  # flipped by a deploy, which also reloaded: found serving
    watcher.check_current()
    runner.verdicts = [Verdict.SKIP]
    advance(watcher, clock, 10 * QUIET)
    assert len(runner.actions) == 1 and runner.verdicts == []


def test_what_landed_while_no_watcher_ran_is_acted_on_at_start():
    watcher, runner, clock, logged = make(found=(DROP / "b-new", DROP / "a-old"))
    stop = threading.Event()

    def batches():  # the real loop's empty batches, one per tick
        for _ in range(int(3 * QUIET / 0.25)):
            clock.now += 0.25
            yield []

    watcher.run(batches(), stop)
    assert logged[1] == "found 2 entries at start: a-old, b-new"
    assert runner.actions == [Action(Kind.CODE, DROP / "b-new", (DROP / "a-old",))]


def test_an_entry_being_written_waits_and_a_deployed_one_is_only_removed():
    watcher, runner, clock, logged = make()
    runner.writers = {"rel.tar": [4242, 4242]}  # still open for writing twice, then closed
    watcher.feed([DROP / "rel.tar"])
    advance(watcher, clock, 2 * QUIET + 1)
    assert runner.actions == []
    assert [line for line in logged if "4242" in line] == [
        f"{DROP / 'rel.tar'}: pid 4242 still writes it: waiting until it is done"]
    advance(watcher, clock, QUIET + 0.5)
    assert [a.path.name for a in runner.actions] == ["rel.tar"]
    runner.taken = {"again"}
    watcher.feed([DROP / "again"])
    advance(watcher, clock, QUIET + 0.5)
    assert [a.path.name for a in runner.actions] == ["rel.tar"]
    assert runner.discarded == [DROP / "rel.tar", DROP / "again"]


def test_a_deploy_refused_as_busy_is_tried_again():
    watcher, runner, clock, logged = make()
    runner.busy = {"rel"}
    watcher.feed([DROP / "rel"])
    advance(watcher, clock, QUIET + 0.5)
    assert "busy (exit 4)" in logged[-1]
    advance(watcher, clock, QUIET + 2)
    assert [a.path.name for a in runner.actions] == ["rel", "rel"]
    assert runner.discarded == [DROP / "rel"]


def test_classify_real_entries(tmp_path: Path):
    (tmp_path / "rel").mkdir()
    (tmp_path / ".rel.tmp").mkdir()
    for name in ("r.tar.gz", "terms-v2.lmdb", "notes.txt", "r.tgz.part"):
        (tmp_path / name).write_text("x")
    kinds = {p.name: classify(p) for p in tmp_path.iterdir()}
    assert kinds == {"rel": Kind.CODE, ".rel.tmp": None, "r.tar.gz": Kind.CODE,
                     "terms-v2.lmdb": Kind.DATA, "notes.txt": None, "r.tgz.part": None}
    assert classify(tmp_path / "missing") is None


# -- a real watcher over a real service ------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    service = LayoutService(tmp_path_factory.mktemp("watch"))
    try:
        assert service.cli("deploy", str(service.source("v1"))).returncode == 0
        service.start()
        watcher = service.cli_background("watch", "--quiet", str(QUIET), "--verbose")
        lines = Lines(watcher)
        lines.wait_for("watching")
        yield service, lines
    finally:
        service.teardown()


def count(lines: Lines, text: str) -> int:
    return sum(1 for line in lines.lines if text in line)


def wait_count(lines: Lines, text: str, n: int, timeout: float = 120.0) -> None:
    assert procs.wait_until(lambda: count(lines, text) >= n, timeout, interval=0.01), \
        f"{text!r} not printed {n} times; got {lines.lines}"


@pytest.mark.slow
def test_release_copied_slowly_swaps_once_when_complete(live):
    service, lines = live
    source, target = service.source("slow"), service.root / "drop" / "slow"
    seen = f"changed: {target} "
    # piece by piece, each only after the watcher has seen the previous one; srv.py last,
    # so a deploy started early would be refused for lacking it
    (target / "data").mkdir(parents=True)
    pieces = [source / "srv.ini", source / "data" / "terms.tsv", source / "srv.py"]
    for n, piece in enumerate(pieces, start=1):
        wait_count(lines, seen, n)
        shutil.copy(piece, target / piece.relative_to(source))
    wait_count(lines, f"deploy {target}: ok", 1)
    assert count(lines, f"deploy {target}: running") == 1
    assert count(lines, f"deploy {target}") == 2, lines.lines  # running, then ok
    assert service.serving_name() == "slow"
    assert not target.exists(), "a deployed release is left in the drop folder"


@pytest.mark.slow
def test_five_releases_in_quick_succession_end_with_the_newest(live):
    service, lines = live
    sources = [service.source(f"burst{n}") for n in range(1, 6)]
    drop = service.root / "drop"
    before = count(lines, ": running")
    with LoadGenerator(str(service.socket), 32, lookup_paths(service), max_seconds=240) as load:
        for source in sources:
            os.rename(source, drop / source.name)  # each lands complete
        wait_count(lines, f"deploy {drop / 'burst5'}: ok", 1)
    swaps = count(lines, ": running") - before
    assert 1 <= swaps <= 2, lines.lines
    assert service.serving_name() == "burst5"
    summary = summarize(load.records)
    assert summary["failed"] == 0, summary
    assert not [p for p in drop.iterdir() if p.name.startswith("burst")]


@pytest.mark.slow  # flips to the release test_release_copied_slowly_swaps_once_when_complete made
def test_current_flipped_by_hand_is_reloaded(live):
    service, lines = live
    slow = next(r["id"] for r in service.releases() if r["id"].endswith("-slow"))
    os.symlink(f"releases/{slow}", service.root / ".current.flip")
    os.replace(service.root / ".current.flip", service.root / "current")
    wait_count(lines, f"reload {service.root / 'current'}", 2)  # running, then its outcome
    line = next(x for x in lines.lines if f"reload {service.root / 'current'}:" in x
                and "running" not in x)
    assert ": ok in" in line, lines.lines
    assert service.serving_name() == "slow"


@pytest.mark.slow
def test_broken_release_reported_and_old_keeps_serving(live):
    service, lines = live
    before = service.serving_name()
    source = service.broken_source("broken")
    target = service.root / "drop" / "broken"
    os.rename(source, target)
    wait_count(lines, f"deploy {target}: FAILED (exit 1)", 1)
    failed = next(line for line in lines.lines if f"deploy {target}: FAILED" in line)
    assert "No module named 'hotswap_no_such_module'" in failed
    assert "current back on" in failed
    assert service.serving_name() == before
    assert target.exists(), "a failed release is kept for the operator"


def test_watcher_stops_cleanly_on_sigterm(live):
    service, lines = live
    # the failed release was not tried again in the meantime
    assert count(lines, "broken: running") <= 1
    os.kill(lines.process.pid, signal.SIGTERM)
    code, out, err = lines.finish(timeout=60)
    assert code == 0, out + err
    assert out.strip().splitlines()[-1] == "hotswap watch: stopped (SIGTERM)"
    assert "Traceback" not in err
    assert service.health()


def _own_watcher(service: LayoutService, previous: Lines) -> Lines:
    """A watcher of this test's own (the module's is stopped by now, or stopped here), over
    an empty drop folder (earlier tests leave a failed release there for the operator)."""
    if previous.process.poll() is None:
        os.kill(previous.process.pid, signal.SIGTERM)
        previous.finish(timeout=60)
    for entry in (service.root / "drop").iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    lines = Lines(service.cli_background("watch", "--quiet", str(QUIET), "--verbose"))
    lines.wait_for("watching")
    return lines


@pytest.mark.slow
def test_a_killed_watcher_leaves_its_deploy_to_finish_and_the_next_one_catches_up(live):
    """SIGKILL to the watcher mid-deploy: the deploy (its own session, output to a file)
    finishes and records itself; a new watcher deploys what landed meanwhile."""
    service, previous = live
    drop = service.root / "drop"
    lines = _own_watcher(service, previous)
    deployer = None
    try:
        with LoadGenerator(str(service.socket), 32, lookup_paths(service),
                           max_seconds=240) as load:
            os.rename(service.gated_source("gated"), drop / "gated")
            lines.wait_for(f"deploy {drop / 'gated'}: running")
            service.loading_pid()
            deployer = lock.Holder.parse((service.run_dir / "reload.lock").read_text()).pid
            os.kill(lines.process.pid, signal.SIGKILL)
            lines.process.wait(timeout=30)
            os.rename(service.source("meanwhile"), drop / "meanwhile")
            service.let_import_finish()
            assert procs.wait_until(lambda: not procs.alive(deployer), 120), \
                "the deploy died with its watcher"
            last = history(service)[-1]
            assert (last["action"], last["outcome"]) == ("deploy", "ok"), last
            assert last["source"] == str(drop / "gated")
            assert service.serving_name() == "gated"
            lines = Lines(service.cli_background("watch", "--quiet", str(QUIET)))
            lines.wait_for("found 2 entries at start: gated, meanwhile")
            lines.wait_for(f"deploy {drop / 'meanwhile'}: ok", timeout=120)
        assert service.serving_name() == "meanwhile"
        assert not (drop / "gated").exists() and not (drop / "meanwhile").exists()
        summary = summarize(load.records)
        assert summary["requests"] > 100 and summary["failed"] == 0, summary
    finally:
        if deployer and procs.alive(deployer):
            procs.signal_quietly(deployer, signal.SIGKILL)
        os.kill(lines.process.pid, signal.SIGTERM)
        lines.finish(timeout=60)


@pytest.mark.slow
def test_a_plain_tar_still_being_written_is_not_taken(live):
    """A tar cut at a member boundary reads as a valid archive: while its writer holds it
    open the watcher waits (and never removes it); once closed whole, it is deployed."""
    service, previous = live
    target = service.root / "drop" / "halftar.tar"
    lines = _own_watcher(service, previous)
    try:
        with open(target, "wb") as handle:
            archive = tarfile.open(fileobj=handle, mode="w")  # noqa: SIM115 - closed below
            archive.add(service.source("halftar"), arcname="halftar")
            handle.flush()  # every member written, not the end-of-archive blocks
            lines.wait_for(f"{target}: pid {os.getpid()} still writes it: waiting")
            assert not procs.wait_until(
                lambda: count(lines, f"deploy {target}: running"), 2 * QUIET + 1), lines.lines
            assert target.exists()
            archive.close()
        wait_count(lines, f"deploy {target}: ok", 1)
        assert service.serving_name() == "halftar" and not target.exists()
    finally:
        os.kill(lines.process.pid, signal.SIGTERM)
        lines.finish(timeout=60)


def history(service: LayoutService) -> list[dict]:
    return release.history(release.Layout(service.root))
