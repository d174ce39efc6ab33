"""What the workers and the CLI agree on about the store files: which are known good, and
whether the workers fell back from a store that changed under them.

A published store is immutable in fact (store.build() leaves it read-only), but root, a
`truncate`, a careless rsync can still change it in place. LMDB trusts its file: a reader
that touches a page past a truncated end dies of SIGBUS, and uWSGI respawns the worker onto
the same file. Two records in the run dir break that loop:

- `store-good.json` (GoodStores): the stores validated by a master's import or committed by a
  refresh, newest first, each with the identity (inode, size, mtime) it had then. A file whose
  identity differs from its mark is not the file that was validated.
- `store-fallback.json` (Fallback): written by the first worker that finds its store changed
  (or a respawned worker that finds the pointer's target does not match its mark): which
  store broke, how, and which good store the workers serve instead. Every worker, including
  one respawned after a SIGBUS, opens the fallback instead of the broken file while this
  record names it; `status` shows it as a problem and `hotswap recover` re-points `current`
  at the fallback and clears it.

Both are written by workers (inside uWSGI) and by the CLI: atomic renames, and readers that
treat an unreadable record as none.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..system import files

GOOD_NAME = "store-good.json"
FALLBACK_NAME = "store-fallback.json"
GOOD_KEPT = 5  # older marks are of stores a fallback would hardly want anyway


@dataclass(frozen=True)
class Mark:
    """One store file as it was when it was validated: the facts an fstat() re-checks."""

    path: str  # real path
    version: str
    sha256: str
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str, version: str, sha256: str, st: os.stat_result | None = None) -> Mark:
        st = st or os.stat(path)
        return cls(os.path.realpath(path), version, sha256, st.st_ino, st.st_size,
                   st.st_mtime_ns)

    def change(self, st: os.stat_result) -> str | None:
        """How the file `st` describes differs from this mark (None: it does not)."""
        if st.st_ino != self.inode:
            return f"replaced (inode {self.inode} -> {st.st_ino})"
        if st.st_size != self.size:
            return f"size {self.size} -> {st.st_size} bytes"
        if st.st_mtime_ns != self.mtime_ns:
            return "modified in place (mtime changed)"
        return None

    def change_on_disk(self) -> str | None:
        try:
            return self.change(os.stat(self.path))
        except OSError as exc:
            return f"unreadable ({exc.strerror})"


@dataclass(frozen=True)
class GoodStores:
    marks: tuple[Mark, ...] = ()

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> GoodStores:
        try:
            data = json.loads((Path(run_dir) / GOOD_NAME).read_text())
            return cls(tuple(Mark(**m) for m in data["marks"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def write(self, run_dir: str | os.PathLike) -> None:
        files.atomic_write(Path(run_dir) / GOOD_NAME, json.dumps(
            {"marks": [dataclasses.asdict(m) for m in self.marks]}), owner_of=Path(run_dir))

    def mark_of(self, path: str) -> Mark | None:
        real = os.path.realpath(path)
        return next((m for m in self.marks if m.path == real), None)

    def with_first(self, mark: Mark) -> GoodStores:
        rest = [m for m in self.marks if m.path != mark.path]
        return GoodStores((mark, *rest)[:GOOD_KEPT])

    def without(self, path: str) -> GoodStores:
        return GoodStores(tuple(m for m in self.marks if m.path != os.path.realpath(path)))

    def fallback_for(self, broken: str) -> Mark | None:
        """The newest good store other than `broken` that is still the file it was."""
        real = os.path.realpath(broken)
        return next((m for m in self.marks if m.path != real and m.change_on_disk() is None),
                    None)


def remember_good(run_dir: str | os.PathLike, mark: Mark) -> None:
    """Put `mark` first among the good stores (a master validated it, a refresh committed it)."""
    GoodStores.read(run_dir).with_first(mark).write(run_dir)


@dataclass(frozen=True)
class Fallback:
    broken_path: str  # the store that changed under the workers
    broken_version: str
    cause: str  # how it changed, as Mark.change() says it
    path: str  # the good store served instead
    version: str
    pointer: str  # the symlink that still names the broken store (what recover re-points)
    worker_pid: int  # the worker that found it
    at: str  # ISO time

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> Fallback | None:
        try:
            return cls(**json.loads((Path(run_dir) / FALLBACK_NAME).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, run_dir: str | os.PathLike) -> None:
        files.atomic_write(Path(run_dir) / FALLBACK_NAME, json.dumps(dataclasses.asdict(self)),
                           owner_of=Path(run_dir))

    def claim(self, run_dir: str | os.PathLike) -> bool:
        """Write this record unless one already names the same broken store; True if this
        process wrote it (the one that says so, loudly). link() fails if the name exists: of
        workers finding the same change at once, exactly one creates the record."""
        path = Path(run_dir) / FALLBACK_NAME
        with files.beside(path) as tmp:
            with open(tmp, "w") as handle:
                handle.write(json.dumps(dataclasses.asdict(self)))
            try:
                os.link(tmp, path)
            except FileExistsError:
                known = Fallback.read(run_dir)
                if known is not None and known.broken_path == self.broken_path:
                    os.unlink(tmp)
                    return False
                os.replace(tmp, path)  # a stale record, of another store
                return True
            os.unlink(tmp)
        return True

    def describe(self) -> str:
        return (f"the workers serve store {self.version} ({self.path}) instead of "
                f"{self.broken_version} ({self.broken_path}), which changed under them: "
                f"{self.cause} (found by worker {self.worker_pid} at {self.at})")


def clear_fallback(run_dir: str | os.PathLike) -> None:
    (Path(run_dir) / FALLBACK_NAME).unlink(missing_ok=True)
