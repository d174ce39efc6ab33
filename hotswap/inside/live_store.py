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
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from ..protocol import store

# The uWSGI signal number the kit uses for a store switch (any free 0..255 would do).
SWITCH_SIGNAL = 42
SWITCH_FILE = "store.switch"


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

    def get(self, term: str) -> str | None:
        value = self.txn.get(term.encode())
        return None if value is None else value.decode()

    def close(self) -> None:
        self.txn.abort()
        self.env.close()  # unmaps: the old version's pages are this worker's no longer


def open_snapshot(path: str) -> Snapshot:
    """Open a store already validated (by the master's import or by `hotswap refresh`):
    metadata and size only, no full pass."""
    env = store.open_env(path)
    try:
        meta = store.read_meta(env, path)
        txn = env.begin(db=env.open_db(store.TERMS_DB, create=False), buffers=False)
    except (store.StoreError, lmdb.Error):
        env.close()
        raise
    return Snapshot(env, txn, meta["version"], meta["sha256"], int(meta["entries"]),
                    os.path.realpath(path), os.getpid(), time.time())


class LiveStore:
    """The store one process serves; follows `pointer` (a symlink) on each switch."""

    def __init__(self, pointer: str) -> None:
        self.pointer = pointer
        self.info: store.StoreInfo | None = None  # what the master validated at import
        self.run_dir: str | None = None
        self._snapshot: Snapshot | None = None

    def validate_at_import(self) -> store.StoreInfo:
        self.info = store.validate(self.pointer)
        return self.info

    def current(self) -> Snapshot:
        """The snapshot of this process; opened here if this process has none yet (a
        process forked without the uWSGI hook: the parent's must never be used)."""
        snap = self._snapshot
        if snap is None or snap.pid != os.getpid():
            # Only in a child without the post-fork hook: drop (never close: it is the
            # parent's mapping) the inherited one and open our own.
            self._snapshot = None
            self.follow_pointer()
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
        """Map the store the pointer names now, if it is not the one mapped; report it."""
        target = os.path.realpath(self.pointer)
        old = self._snapshot
        if old is None or old.path != target or old.pid != os.getpid():
            self._snapshot = open_snapshot(target)
            if old is not None and old.pid == os.getpid():
                old.close()
        self._report()

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
        return True

    def _after_fork(self) -> None:
        self._snapshot = None  # the master holds none; be explicit anyway
        try:
            self.follow_pointer()
        except (store.StoreError, lmdb.Error) as exc:
            # current() retries at the first request; the log says why
            print(f"hotswap store: worker {os.getpid()} cannot open {self.pointer}: {exc}",
                  file=sys.stderr)

    def _on_switch_signal(self, _signum: int) -> None:
        try:
            self.follow_pointer()
        except (store.StoreError, lmdb.Error) as exc:
            # keep serving the old version; refresh sees the stale report and says so
            kept = self._snapshot.version if self._snapshot else None
            print(f"hotswap store: worker {os.getpid()} keeps {kept}: {exc}", file=sys.stderr)


def _run_dir(opt: dict) -> str | None:
    """The run dir every %(run_dir) of the ini expanded to.

    Not `opt["run_dir"]` as such: uWSGI expands a placeholder with its FIRST definition but
    reports the LAST one. In a release layout, hotswap.ini's run_dir comes first and
    srv.ini's `%drun` (inside the release) last, so the store's switch file and worker
    reports would land in the release, where `hotswap refresh` (which asks `uwsgi --get`,
    the first) never looks. The pidfile is reported expanded, and the kit's inis (srv.ini,
    `hotswap init`'s) put it in the run dir."""
    def text(key: str) -> str | None:
        value = opt.get(key)
        if isinstance(value, list):
            value = value[-1]
        return value.decode() if isinstance(value, bytes) else value

    pidfile = text("pidfile")
    return os.path.dirname(pidfile) if pidfile else text("run_dir")

