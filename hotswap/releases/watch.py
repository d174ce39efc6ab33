"""`hotswap watch DROP`: swap when a release lands in a drop folder.

What lands in DROP, one entry per release (a folder, a tarball, or a store file):
    a folder or a tarball  -> `hotswap deploy ENTRY` (a code release); removed once it serves
    a *.lmdb store file    -> `hotswap refresh ENTRY` (a data-only release); left where it is,
                              since the workers map it from there
    names starting with "." or holding ".tmp"/".part" are ignored: write under such a name
    and rename it into place, and the watcher never sees half a release.

When an entry counts as complete (docs/operations.md, "The watcher's completeness rule"):
after --quiet seconds without a change in DROP, and once no process holds it (or a file
under it) open for writing; a tarball must also be a whole archive, which deploy checks
(release.incomplete(): tar's end-of-archive blocks, the compressed stream's end), so a tar
cut at a member boundary is refused, never unpacked as a shorter release. A drop entry is
removed only after the deploy that took it succeeded, so never while its writer writes.

The watcher scans DROP when it starts: what landed while it was down is acted on. Each
action runs in its own session with its output in a file, not a pipe: a watcher killed
mid-deploy leaves the deploy to finish and record itself (state/deploys.jsonl); the next
watcher finds that record for the entry, unchanged, and only removes it.

Rules (the Planner; tests/test_watch.py drives it on a fake clock in milliseconds):
- nothing runs until the drop folder has been quiet for --quiet seconds (a slow copy ends
  before its release is acted on);
- one action at a time; what lands during an action waits, then counts as one follow-up;
- of several code releases waiting, only the newest is deployed (the others are reported
  as superseded), and likewise for stores;
- a failed action is reported once; its entry is not tried again unless it changes; one
  refused because another swap holds the lock (exit 4) waits for the next quiet period;
- `current` flipped by someone else (by hand, rsync, a CI job) is checked after the quiet
  period: if the release it names is not the one serving, and no swap is under way, the
  watcher runs `hotswap reload` (a deploy's own flip is found serving, and left alone).

A Kubernetes ConfigMap or Secret volume (or any mount of that shape) as DROP: each key is a
link `KEY -> ..data/KEY`, and an update flips `..data` to a new hidden folder by rename, so
the keys' own names may not change at all. DataLink polls `..data` each turn, as `current`
is; on a flip, every key reached through it counts as changed (docs/containers.md).

The loop only reads filesystem batches from watchfiles (inotify underneath) and asks the
Planner; actions run as `hotswap` subprocesses, so each one gets the CLI's own signal
handling, lock and exit code, and the watcher's log line quotes its outcome.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from ..config import Config
from ..errors import ExitCode
from ..swap import lock
from ..system import procs
from . import release

TARBALL = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz)$")
HIDDEN = re.compile(r"^\.|\.tmp|\.part$|~$")


class Kind(str, Enum):
    CODE = "deploy"
    DATA = "refresh"
    CURRENT = "reload"  # `current` was flipped by someone: reload if it is not what serves


def classify(path: Path) -> Kind | None:
    """What an entry of the drop folder is, or None (ignored, or gone)."""
    name = path.name
    if HIDDEN.search(name) or not path.exists():
        return None
    if name.endswith(".lmdb"):
        return Kind.DATA
    if path.is_dir() or TARBALL.search(name):
        return Kind.CODE
    return None


@dataclass(frozen=True)
class Action:
    kind: Kind
    path: Path
    superseded: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Outcome:
    ok: bool
    exit_code: int
    summary: str  # the action's own last line: its outcome or its cause
    seconds: float


class Planner:
    """Which action to run, and when: debounce, coalesce, supersede. Pure: time is passed in."""

    def __init__(self, drop: Path, quiet: float,
                 kind_of: Callable[[Path], Kind | None] = classify) -> None:
        self.drop = drop
        self.quiet = quiet
        self.kind_of = kind_of
        self.pending: dict[Path, tuple[Kind, int]] = {}  # entry -> (kind, arrival order)
        self.last_event: float | None = None
        self._order = 0

    def saw(self, changed: Path, now: float) -> Path | None:
        """A change anywhere under DROP: it concerns the top-level entry that holds it.
        Returns that entry if it is now waiting for an action."""
        try:
            parts = changed.relative_to(self.drop).parts
        except ValueError:
            return None
        if not parts:
            return None
        entry = self.drop / parts[0]
        kind = self.kind_of(entry)
        if kind is None:
            self.pending.pop(entry, None)
            return None
        self.last_event = now
        self._order += 1
        self.pending[entry] = (kind, self._order)
        return entry

    def saw_current(self, link: Path, now: float) -> None:
        """`current` points elsewhere (or is to be checked again): one check after the quiet
        period, however many flips happen meanwhile."""
        self.last_event = now
        self._order += 1
        self.pending[link] = (Kind.CURRENT, self._order)

    def announce(self, path: Path, kind: Kind, now: float) -> None:
        """A release named by a message (releases/sources.py): queued like a drop entry, so
        the same rules apply (one at a time, the newest supersedes what waits)."""
        self.last_event = now
        self._order += 1
        self.pending[path] = (kind, self._order)

    def due(self, now: float) -> Action | None:
        """The action to run now, if DROP has been quiet long enough; code before data, and
        a flip of `current` checked last (a deploy flips it too)."""
        if not self.pending or self.last_event is None or now - self.last_event < self.quiet:
            return None
        for kind in (Kind.CODE, Kind.DATA, Kind.CURRENT):
            waiting = sorted((order, path) for path, (k, order) in self.pending.items()
                             if k is kind)
            if waiting:
                for _, path in waiting:
                    del self.pending[path]
                newest = waiting[-1][1]
                return Action(kind, newest, tuple(p for _, p in waiting[:-1]))
        return None


class Verdict(str, Enum):
    RUN = "run"
    SKIP = "skip"  # nothing to do: `current` serves, or nothing serves at all
    LATER = "later"  # a swap is under way: check again after it


class Runner(Protocol):
    """Everything the Watcher does outside itself (tests/test_watch.py passes a fake)."""

    def run(self, action: Action) -> Outcome: ...
    def discard(self, path: Path) -> None: ...
    def current(self) -> str | None: ...  # where `current` points (None: not followed)
    def reconcile(self) -> tuple[Verdict, str]: ...  # whether a flip of `current` needs a reload
    def writer(self, path: Path) -> int | None: ...  # a process still writing the entry
    def deployed(self, path: Path) -> str | None: ...  # a recorded deploy already took it


class CliRunner:
    """Runs `hotswap --ini INI deploy|refresh PATH` or `reload` and quotes its last line."""

    def __init__(self, cfg: Config, deploy_args: list[str], follow_current: bool,
                 swap_args: list[str] | tuple[str, ...] = ()) -> None:
        self.cfg = cfg
        self.layout = release.Layout(cfg.ini.parent)
        self.deploy_args = deploy_args  # deploy's own (--keep)
        self.swap_args = list(swap_args)  # the reload's (--force, --memory-margin), to both
        self.follow_current = follow_current

    def writer(self, path: Path) -> int | None:
        found = procs.writers(path)
        return found[0] if found else None

    def deployed(self, path: Path) -> str | None:
        record = release.deployed(self.layout, path)
        return f"release {record['release']} at {record['at']}" if record else None

    def current(self) -> str | None:
        return self.layout.current_id() if self.follow_current else None

    def reconcile(self) -> tuple[Verdict, str]:
        holder = lock.holder(self.cfg)
        if holder:
            return Verdict.LATER, f"a swap is under way (pid {holder})"
        current, live = self.layout.current_id(), release.serving(self.cfg, self.layout)
        if live is None:
            return Verdict.SKIP, f"current -> {current}, and nothing answers /healthz"
        if live == current:
            return Verdict.SKIP, f"current -> {current}, which serves"
        return Verdict.RUN, f"current -> {current}, but {live} serves"

    def run(self, action: Action) -> Outcome:
        args = {Kind.CODE: [str(action.path), *self.deploy_args, *self.swap_args],
                Kind.DATA: [str(action.path)], Kind.CURRENT: self.swap_args}[action.kind]
        argv = [sys.executable, "-m", "hotswap", "--ini", str(self.cfg.ini), action.kind.value,
                *args]
        started = time.monotonic()
        # Its own session and files, not pipes: neither a signal to the watcher's group nor
        # the watcher's death (a broken pipe) stops a swap halfway.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            code = subprocess.run(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                  start_new_session=True, check=False).returncode
            stdout, stderr = (_read(handle) for handle in (out, err))
        # the CLI's own verdict: its one "hotswap: ..." line on failure, its last line on success
        verdicts = [line for line in stderr.splitlines() if line.startswith("hotswap:")]
        lines = stdout.splitlines() + stderr.splitlines()
        summary = (verdicts[0] if code and verdicts
                   else next((line for line in reversed(lines) if line.strip()), "(no output)"))
        return Outcome(code == 0, code, summary.strip(), time.monotonic() - started)

    def discard(self, path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _read(handle) -> str:
    handle.seek(0)
    return handle.read()


class DataLink:
    """DROP/..data, the link a ConfigMap-shaped mount flips: which keys a flip changed."""

    NAME = "..data"

    def __init__(self, drop: Path) -> None:
        self.drop = drop
        self.seen = self.read()  # what serves already: not a change

    def read(self) -> str | None:
        try:
            return os.readlink(self.drop / self.NAME)
        except OSError:
            return None

    @classmethod
    def unmounted(cls, drop: Path) -> list[Path]:
        """What the scan at start acts on: DROP's entries, less a mount's keys (reached
        through ..data: what the pod started with, so what serves) and its own folders."""
        prefix = f"{cls.NAME}/"
        return [entry for entry in drop.iterdir() if not entry.name.startswith("..")
                and not (entry.is_symlink() and os.readlink(entry).startswith(prefix))]

    def flipped(self) -> list[Path]:
        """The entries reached through ..data, if it names another folder since last time."""
        target = self.read()
        if target is None or target == self.seen:
            return []
        self.seen = target
        prefix = f"{self.NAME}/"
        return sorted(entry for entry in self.drop.iterdir() if entry.is_symlink()
                      and os.readlink(entry).startswith(prefix))


class Watcher:
    def __init__(self, planner: Planner, runner: Runner, log: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic, verbose: bool = False,
                 link: Path = Path("current"),
                 scan: Callable[[], Iterable[Path]] = tuple) -> None:
        self.planner = planner
        self.runner = runner
        self.log = log
        self.clock = clock
        self.verbose = verbose
        self.results: list[tuple[Action, Outcome]] = []
        self.link = link  # ROOT/current: only named in actions and log lines
        self.scan = scan  # what DROP holds at start (landed while no watcher ran)
        self._current = runner.current()
        self._waiting: dict[Path, int] = {}  # entry -> the writer last reported
        self.mount = DataLink(planner.drop)

    def ready(self, action: Action) -> bool:
        """Whether a drop entry may be acted on now: it is still there, a deploy the last
        watcher started has not already taken it, and nobody writes it any more (else it
        waits for the next quiet period, reported once per writer)."""
        if action.kind is Kind.CURRENT:
            return True
        if self.planner.kind_of(action.path) is None:
            self.log(f"{action.path}: gone before it was acted on")
            return False
        if action.kind is Kind.CODE:
            taken = self.runner.deployed(action.path)
            if taken:
                self.log(f"{action.path}: already deployed ({taken}, by a deploy an earlier "
                         "watcher started): removed")
                for path in (action.path, *action.superseded):
                    self.runner.discard(path)
                return False
        writer = self.runner.writer(action.path)
        if writer is None:
            self._waiting.pop(action.path, None)
            return True
        if self._waiting.get(action.path) != writer:
            self._waiting[action.path] = writer
            self.log(f"{action.path}: pid {writer} still writes it: waiting until it is done")
        self.requeue(action)
        return False

    def requeue(self, action: Action) -> None:
        for path in (*action.superseded, action.path):
            if path.is_relative_to(self.planner.drop):
                self.planner.saw(path, self.clock())
            else:  # announced by a message, not found in DROP
                self.planner.announce(path, action.kind, self.clock())

    def feed(self, paths: Iterable[Path]) -> None:
        now = self.clock()
        waiting = {self.planner.saw(path, now) for path in paths} - {None}
        if self.verbose:
            for entry in sorted(waiting):
                self.log(f"changed: {entry} (waiting for {self.planner.quiet:g}s of quiet)")

    def check_current(self) -> None:
        """Polled every turn: a flip of `current` by anyone becomes a pending check. (Polled,
        not watched: inotify follows the link to the release, which does not change.)"""
        target = self.runner.current()
        if target != self._current and self._current is not None and target is not None:
            self.planner.saw_current(self.link, self.clock())
            if self.verbose:
                self.log(f"changed: {self.link} -> {target}")
        self._current = target

    def tick(self) -> Outcome | None:
        """Run the due action, if any, and log it with its result."""
        action = self.planner.due(self.clock())
        if action is None:
            return None
        also = (f" (superseding {', '.join(p.name for p in action.superseded)})"
                if action.superseded else "")
        if action.kind is Kind.CURRENT:
            verdict, why = self.runner.reconcile()
            if verdict is Verdict.LATER:
                self.planner.saw_current(action.path, self.clock())
            if verdict is not Verdict.RUN:
                if self.verbose:
                    self.log(f"{action.path}: {why}: no reload")
                return None
            also = f" ({why})"
        elif not self.ready(action):
            return None
        self.log(f"{action.kind.value} {action.path}{also}: running")
        outcome = self.runner.run(action)
        self.results.append((action, outcome))
        if outcome.exit_code == ExitCode.BUSY:
            self.requeue(action)
            self.log(f"{action.kind.value} {action.path}: busy (exit 4): {outcome.summary}; "
                     "tried again after the next quiet period")
        elif outcome.ok:
            if action.kind is Kind.CODE:
                # copied into releases/, or superseded by what now serves: no longer needed
                for path in (action.path, *action.superseded):
                    self.runner.discard(path)
            self.log(f"{action.kind.value} {action.path}: ok in {outcome.seconds:.2f}s: "
                     f"{outcome.summary}")
        else:
            self.log(f"{action.kind.value} {action.path}: FAILED (exit {outcome.exit_code}) in "
                     f"{outcome.seconds:.2f}s: {outcome.summary}; left in place, not retried "
                     "until it changes")
        return outcome

    def run(self, batches: Iterable[Iterable[Path]], stop: threading.Event) -> None:
        """One batch of changed paths at a time (an empty batch is a timeout tick)."""
        ready = False
        for batch in batches:
            if not ready:
                ready = True
                self.log(f"watching {self.planner.drop} (quiet period "
                         f"{self.planner.quiet:g}s)")
                found = sorted(self.scan())
                if found:
                    self.log(f"found {len(found)} entries at start: "
                             f"{', '.join(p.name for p in found)}")
                    self.feed(found)
            self.feed([*sorted(batch), *self.mount.flipped()])
            self.check_current()
            if stop.is_set():
                break
            self.tick()


def inotify_batches(drop: Path, stop: threading.Event, tick_ms: int) -> Iterable[list[Path]]:
    """watchfiles' batches of changed paths; an empty one every tick_ms without changes."""
    from watchfiles import watch  # imported here: only `hotswap watch` needs it

    for changes in watch(drop, watch_filter=None, debounce=max(tick_ms, 50), step=50,
                         stop_event=stop, rust_timeout=tick_ms, yield_on_timeout=True,
                         raise_interrupt=False):
        yield [Path(path) for _, path in changes]
