"""The app side of the store: each worker maps the current store and switches on a signal.

srv.py (store mode) creates one LiveStore at import, in the uWSGI master:

- `validate_at_import()` checks the store the pointer names with a full pass (a corrupt,
  truncated or missing store raises, so the release never takes traffic) and closes it:
  an LMDB environment must not cross fork();
- `install_uwsgi_hooks()` opens the store in each worker right after the fork, and registers
  a uWSGI signal for *all* workers, raised by the master when `hotswap refresh` writes
  `<run_dir>/store.switch` (a uWSGI file monitor: inotify in the master);
- uWSGI runs signal handlers in a worker only between requests, in its accept loop, so a
  switch never lands inside a request; each request also takes one `Snapshot` and reads
  only from it, so an answer is wholly from one version.

After a switch the worker closes the old environment (munmap), writes its report
(hotswap/protocol/store.py, WorkerReport) and serves the new version from the next request on.

A store changed under the workers (truncated, rewritten, replaced: LMDB would SIGBUS on a page
past a truncated end) is noticed per request by one fstat() of the served file against what
was opened, and at every open against the store's mark in `store-good.json`; the worker then
falls back to the newest good store by itself (hotswap/protocol/store_state.py), and so does a
worker respawned after a SIGBUS: it never opens the broken file again.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from ..protocol import store, store_state
from ..protocol.store_record import StoreSwitch
from ..system import files

# The uWSGI signal number the kit uses for a store switch (any free 0..255 would do).
SWITCH_SIGNAL = 42
SWITCH_FILE = "store.switch"
CHECK_STORE_ENV = "HOTSWAP_CHECK_STORE"
RUN_DIR_ENV = files.RUN_DIR_ENV


@dataclass
class Snapshot:
    """One opened store version: what a request reads from, start to end."""

    env: lmdb.Environment
    txn: lmdb.Transaction  # one long read transaction: the store never changes underneath
    version: str
    sha256: str
    entries: int
    path: str
    pid: int
    opened_at: float
    fd: int  # our own descriptor on the file: fstat() per request is the cheap check
    mark: store_state.Mark  # the file as it was when this snapshot opened it

    def change(self) -> str | None:
        """How the served file changed since it was opened (None: not at all)."""
        try:
            return self.mark.change(os.fstat(self.fd))
        except OSError as exc:
            return f"unreadable ({exc.strerror})"

    def get(self, term: str) -> str | None:
        value = self.txn.get(term.encode())
        return None if value is None else value.decode()

    def close(self) -> None:
        self.txn.abort()
        self.env.close()  # unmaps: the old version's pages are this worker's no longer
        os.close(self.fd)


def open_snapshot(path: str) -> Snapshot:
    """Open a store already validated (by the master's import or by `hotswap refresh`):
    metadata and size only, no full pass."""
    real = os.path.realpath(path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise store.StoreError(f"no store at {path} ({exc.strerror})") from exc
    try:
        env = store.open_env(real)
    except store.StoreError:
        os.close(fd)
        raise
    try:
        meta = store.read_meta(env, path)
        txn = env.begin(db=env.open_db(store.TERMS_DB, create=False), buffers=False)
    except (store.StoreError, lmdb.Error):
        env.close()
        os.close(fd)
        raise
    mark = store_state.Mark.of(real, meta["version"], meta["sha256"], os.fstat(fd))
    return Snapshot(env, txn, meta["version"], meta["sha256"], int(meta["entries"]),
                    real, os.getpid(), time.time(), fd, mark)


class LiveStore:
    """The store one process serves; follows `pointer` (a symlink) on each switch."""

    def __init__(self, pointer: str) -> None:
        # `hotswap refresh` imports the app in a child against the store it is about to
        # serve (releases/app_check.py): the same checks as a reload's, before any worker
        self.pointer = os.environ.get(CHECK_STORE_ENV) or pointer
        self.info: store.StoreInfo | None = None  # what the master validated at import
        self.run_dir: str | None = None
        self._snapshot: Snapshot | None = None
        self._stuck_on: str | None = None  # a changed store with no good one to fall back to

    def validate_at_import(self) -> store.StoreInfo:
        self.info = store.validate(self.pointer)
        return self.info

    def current(self) -> Snapshot:
        """The snapshot of this process; opened here if this process has none yet (a
        process forked without the uWSGI hook: the parent's must never be used). A served
        file that changed since it was opened is left for the newest good store."""
        snap = self._snapshot
        if snap is None or snap.pid != os.getpid():
            # Only in a child without the post-fork hook: drop (never close: it is the
            # parent's mapping) the inherited one and open our own.
            self._snapshot = None
            self.follow_pointer()
            snap = self._snapshot
        elif snap.path != self._stuck_on and (cause := snap.change()) is not None:
            try:
                self._fall_back(snap.path, snap.version, cause)
            except (OSError, store.StoreError, lmdb.Error) as exc:
                self._stuck_on = snap.path  # serve on with what we have; say why once
                _log(f"hotswap store: worker {os.getpid()} cannot leave {snap.path} "
                     f"({cause}): {exc}")
            snap = self._snapshot
        assert snap is not None
        return snap

    def close(self) -> None:
        """Close this process's snapshot (the master's, after a smoke request mapped it):
        the workers forked next must not inherit an open LMDB environment."""
        snap, self._snapshot = self._snapshot, None
        if snap is not None and snap.pid == os.getpid():
            snap.close()

    def follow_pointer(self) -> None:
        """Map the store the pointer names now (or the fallback while the pointer names a
        broken one), if it is not the one mapped; report it."""
        target = os.path.realpath(self.pointer)
        switch = StoreSwitch.read(self.run_dir) if self.run_dir else None
        if switch and (instead := switch.store_for_workers()):
            target = instead  # a killed refresh's pointer may be half-switched: its record rules
        fallback = store_state.Fallback.read(self.run_dir) if self.run_dir else None
        if fallback and fallback.broken_path == target:
            target = fallback.path  # a respawned worker: never the file that broke
        elif self.run_dir and (mark := store_state.GoodStores.read(self.run_dir).mark_of(
                target)) and (cause := mark.change_on_disk()):
            self._fall_back(target, mark.version, cause)
            return
        old = self._snapshot
        if old is None or old.path != target or old.pid != os.getpid():
            try:
                self._open(target)
            except (store.StoreError, lmdb.Error) as exc:
                if self.run_dir is None or (old is not None and old.pid == os.getpid()):
                    raise  # a switch that fails keeps the store it has
                self._fall_back(target, "(unreadable)", f"cannot be opened: {exc}")
                return
        self._report()

    def _open(self, target: str) -> None:
        old = self._snapshot
        self._snapshot = open_snapshot(target)
        if old is not None and old.pid == os.getpid():
            old.close()

    def _fall_back(self, broken: str, version: str, cause: str) -> None:
        """Leave `broken` for the newest good store (the first worker to find it says so)."""
        mark = store_state.GoodStores.read(self.run_dir).fallback_for(broken) \
            if self.run_dir else None
        if mark is None:
            if self._stuck_on != broken:
                _log(f"hotswap store: STORE CHANGED: worker {os.getpid()}: {broken} "
                     f"({version}) {cause}, and no good store is left to fall back to; "
                     "point current at a good store and run `hotswap refresh` on it")
            self._stuck_on = broken
            if self._snapshot is None:
                raise store.StoreError(f"{broken} {cause}; no good store to fall back to")
            return
        self._open(mark.path)
        self._report()
        _announce_fallback(self.run_dir, store_state.Fallback(
            broken, version, cause, mark.path, mark.version, os.path.abspath(self.pointer),
            os.getpid(), files.iso_time()))

    def _report(self) -> None:
        snap = self._snapshot
        if self.run_dir is None or snap is None:
            return
        store.write_report(self.run_dir, store.WorkerReport(
            pid=snap.pid, version=snap.version, sha256=snap.sha256, path=snap.path,
            pointer=os.path.abspath(self.pointer), opened_at=snap.opened_at,
        ))

    # -- uWSGI ------------------------------------------------------------------------
    def install_uwsgi_hooks(self) -> bool:
        """Called at import in the master; False when not running under uWSGI."""
        try:
            import uwsgi  # type: ignore[import-not-found]
        except ImportError:
            return False
        self.run_dir = _run_dir(uwsgi.opt)
        if not self.run_dir:
            return False
        switch_file = Path(self.run_dir) / SWITCH_FILE
        switch_file.parent.mkdir(parents=True, exist_ok=True)
        switch_file.touch()  # inotify needs the file to exist when the master watches it
        uwsgi.register_signal(SWITCH_SIGNAL, "workers", self._on_switch_signal)
        uwsgi.add_file_monitor(SWITCH_SIGNAL, str(switch_file))
        uwsgi.post_fork_hook = self._after_fork
        if self.info is not None:
            remember_validated(self.run_dir, self.info)
        return True

    def _after_fork(self) -> None:
        self._snapshot = None  # the master holds none; be explicit anyway
        try:
            self.follow_pointer()
        except (store.StoreError, lmdb.Error) as exc:
            # current() retries at the first request; the log says why
            _log(f"hotswap store: worker {os.getpid()} cannot open {self.pointer}: {exc}")

    def _on_switch_signal(self, _signum: int) -> None:
        try:
            self.follow_pointer()
        except (store.StoreError, lmdb.Error) as exc:
            # keep serving the old version; refresh sees the stale report and says so
            kept = self._snapshot.version if self._snapshot else None
            _log(f"hotswap store: worker {os.getpid()} keeps {kept}: {exc}")


def _run_dir(options: dict) -> str | None:
    """The instance's run dir, where the CLI looks: `hotswap start` exports it.

    Without it, not `options["run_dir"]` as such: uWSGI expands a placeholder with its FIRST
    definition but reports the LAST one. In a release layout, hotswap.ini's run_dir comes
    first and srv.ini's `%drun` (inside the release) last, so the switch file and worker
    reports would land in the release, where `hotswap refresh` never looks. The pidfile is
    reported expanded, and the kit's inis put it in the run dir."""
    if run_dir := os.environ.get(RUN_DIR_ENV):
        return run_dir

    def text(key: str) -> str | None:
        value = options.get(key)
        if isinstance(value, list):
            value = value[0] if key == "run_dir" else value[-1]
        return value.decode() if isinstance(value, bytes) else value

    pidfile = text("pidfile")
    return os.path.dirname(pidfile) if pidfile else text("run_dir")


def remember_validated(run_dir: str, info: store.StoreInfo) -> None:
    """The master's import validated `info` with a full pass: a store to fall back to later,
    and no longer a broken one if a fallback had left it."""
    try:
        store_state.remember_good(run_dir, store_state.Mark.of(info.path, info.version,
                                                               info.sha256))
        fallback = store_state.Fallback.read(run_dir)
        if fallback and fallback.broken_path == info.path:
            store_state.clear_fallback(run_dir)
    except OSError as exc:  # a fallback is a comfort; serving is the point
        _log(f"hotswap store: cannot record {info.path} as good: {exc}")


def _announce_fallback(run_dir: str, record: store_state.Fallback) -> None:
    """One loud line, from the worker whose record is the one that stands."""
    try:
        claimed = record.claim(run_dir)
    except OSError as exc:
        claimed = True
        _log(f"hotswap store: cannot write {store_state.FALLBACK_NAME}: {exc}")
    if claimed:
        _log(f"hotswap store: FALLBACK: worker {os.getpid()}: {record.describe()}; "
             "`hotswap recover` points current at it")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
