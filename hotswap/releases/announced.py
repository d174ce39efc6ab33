"""`hotswap watch --source URL`: swap when a signed message announces a release.

The messages feed the drop folder's own queue (watch.Planner and watch.Watcher): one action
at a time, the newest waiting release supersedes the others, a busy swap waits. What this
adds around it:
- admission (message.admit): a message that does not parse, is not signed by the key,
  names a place outside the allowed locations, names nothing there, or repeats an id this
  host took is logged once and acknowledged: never retried, never half-applied;
- the ledger: each id is written before its action runs (and those it superseded with
  it), so neither a repeat of the message nor the watcher's own restart swaps it twice;
- acknowledgement (a stream's XACK) after the action, or after the refusal.
A repeat read on (re)connect (the catch-up) that this host already took is expected, and
not logged unless --verbose.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import ExitCode
from .message import Announcement, Ledger, Refused, Verifier, admit
from .sources import Delivery
from .watch import Action, Outcome, Planner, Runner, Verdict, Watcher, classify

# The Planner's DROP when only messages feed it: no path lies under it, so every entry is an
# announcement (watch.Watcher.requeue tells the two apart by it).
NO_DROP = Path("/dev/null")


class AnnouncedRunner:
    """The Runner for announced releases: takes and acknowledges around the real run; leaves
    the release where it is (shared storage is not the drop folder's to empty)."""

    def __init__(self, inner: Runner, ledger: Ledger) -> None:
        self.inner = inner
        self.ledger = ledger
        self.waiting: dict[Path, tuple[Announcement, Delivery]] = {}

    def run(self, action: Action) -> Outcome:
        taken = [self.waiting[path] for path in (action.path, *action.superseded)
                 if path in self.waiting]
        for announcement, delivery in taken:
            self.ledger.take(announcement, delivery.where)
        outcome = self.inner.run(action)
        if outcome.exit_code != ExitCode.BUSY:  # requeued by the Watcher: acknowledged later
            for announcement, delivery in taken:
                self.waiting.pop(announcement.path, None)
                delivery.ack()
        return outcome

    def discard(self, path: Path) -> None:
        pass

    def current(self) -> str | None:
        return self.inner.current()

    def reconcile(self) -> tuple[Verdict, str]:
        return self.inner.reconcile()

    def writer(self, path: Path) -> int | None:
        return self.inner.writer(path)

    def deployed(self, path: Path) -> str | None:
        return self.inner.deployed(path)


class MessageLoop:
    """Deliveries in, the Watcher's tick on every idle turn."""

    def __init__(self, verifier: Verifier, runner: AnnouncedRunner, quiet: float,
                 log: Callable[[str], None], verbose: bool = False,
                 link: Path = Path("current")) -> None:
        self.verifier = verifier
        self.runner = runner
        self.log = log
        self.verbose = verbose
        self.watcher = Watcher(Planner(NO_DROP, quiet), runner, log, verbose=verbose,
                               link=link)

    def receive(self, delivery: Delivery) -> Announcement | None:
        try:
            announcement = admit(delivery.raw, delivery.where, self.verifier, self.runner.ledger)
            if classify(announcement.path) is None:
                raise Refused(f"{delivery.where}: refused: {announcement.path} (id "
                              f"{announcement.id!r}) names no release or store there")
        except Refused as refusal:
            quiet = delivery.catchup and "already taken" in str(refusal)
            if self.verbose or not quiet:
                self.log(str(refusal))
            delivery.ack()
            return None
        self.log(f"{delivery.where}: {announcement.kind.value} {announcement.path} (id "
                 f"{announcement.id!r}) queued")
        self.runner.waiting[announcement.path] = (announcement, delivery)
        planner = self.watcher.planner
        planner.announce(announcement.path, announcement.kind, self.watcher.clock())
        return announcement

    def run(self, items: Iterable[Delivery | None], stop: threading.Event,
            name: str = "") -> None:
        self.log(f"listening on {name} (quiet period {self.watcher.planner.quiet:g}s)")
        for item in items:
            if item is not None:
                self.receive(item)
            if stop.is_set():
                break
            if item is None:
                self.watcher.check_current()
                self.watcher.tick()
