"""The memory-mapped store: its format, its builder, its validation, and the worker reports.

One store is one LMDB file (`subdir=False`) per data version, e.g. `data/store/terms-v2.lmdb`,
never modified once renamed into place (and read-only from then on: store_state.py says
what happens when one is changed anyway). It holds two named databases:

- `terms`: term -> tags (UTF-8), in key order;
- `meta`:  format, version, entries, sha256.

`sha256` is the digest of `key \\n value \\n` for every entry in key order: validation
recomputes it with one pass over the store, which also pulls every page into the page cache
(the "warm" pass). Every process then reads the same page-cache pages through its own
read-only mapping, so the data costs one copy whatever the number of workers or generations.

LMDB rules this module follows (lmdb.tech caveats, py-lmdb docs):
- an environment must not be used across fork(): the master validates and *closes*; each
  worker opens its own after the fork;
- `lock=False`: the store is immutable, so no reader table or lock file is needed (and no
  flock() for a close() to break);
- LMDB does not checksum pages and trusts the file size: a truncated file would SIGBUS on
  access, so the size is checked against LMDB's last page before anything is read.

A worker reports which store it maps in `<run_dir>/store-workers/<pid>.json` (written by
srv.py after it opens one, read by `hotswap refresh` and `hotswap status`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import lmdb

from ..system import files, priority, procs

FORMAT = "hotswap-store v1"
META_DB = b"meta"
TERMS_DB = b"terms"
META_KEYS = ("format", "version", "entries", "sha256")
SUFFIX = ".lmdb"
REPORT_DIR = "store-workers"
PUBLISHED_MODE = 0o444
# Entries hashed per sha256.update(): fewer calls into C is what makes the pass fast.
HASH_BATCH = 50_000


class StoreError(RuntimeError):
    """The store cannot be trusted (missing, truncated, corrupt, wrong checksum)."""


@dataclass(frozen=True)
class StoreInfo:
    """What validation established about one store file."""

    path: str  # real path of the store file
    version: str
    entries: int
    sha256: str
    size_bytes: int
    validate_seconds: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WorkerReport:
    """What one worker says it serves: written by the worker, read by the CLI."""

    pid: int
    version: str
    sha256: str
    path: str
    pointer: str  # the symlink the worker follows (data/store/current)
    opened_at: float  # time.time() when it switched to this store

    @classmethod
    def read(cls, path: Path) -> WorkerReport | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def store_file_name(version: str) -> str:
    return f"terms-{version}{SUFFIX}"


def open_env(path: str | os.PathLike) -> lmdb.Environment:
    """Read-only, lock-free environment on one store file (no validation)."""
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        raise StoreError(f"no store at {path}")
    try:
        # map_size is a ceiling, not an allocation; readahead stays on: the warm pass wants it.
        env = lmdb.open(real, subdir=False, readonly=True, lock=False, max_dbs=2,
                        map_size=max(os.path.getsize(real), 1 << 20))
    except lmdb.Error as exc:
        raise StoreError(f"{path}: not an LMDB store ({exc})") from exc
    try:
        _check_size(env, real)
    except StoreError:
        env.close()
        raise
    return env


def _check_size(env: lmdb.Environment, path: str) -> None:
    info, stat = env.info(), env.stat()
    needed = (info["last_pgno"] + 1) * stat["psize"]
    size = os.path.getsize(path)
    if size < needed:
        raise StoreError(f"{path}: truncated ({size} bytes, LMDB needs {needed})")


def read_meta(env: lmdb.Environment, path: str | os.PathLike) -> dict[str, str]:
    try:
        meta_db = env.open_db(META_DB, create=False)
        with env.begin(db=meta_db) as txn:
            meta = {key: (txn.get(key.encode()) or b"").decode() for key in META_KEYS}
    except (lmdb.Error, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: unreadable metadata ({exc})") from exc
    if meta["format"] != FORMAT:
        raise StoreError(f"{path}: not a {FORMAT} store (format {meta['format']!r})")
    if not all(meta.values()) or not meta["entries"].isdigit():
        raise StoreError(f"{path}: incomplete metadata {meta}")
    return meta


def content_digest(pairs: Iterable[tuple[bytes, bytes]]) -> tuple[str, int]:
    """sha256 over `key \\n value \\n` of every pair, and the number of pairs."""
    digest, count = hashlib.sha256(), 0
    iterator = iter(pairs)
    while chunk := list(itertools.islice(iterator, HASH_BATCH)):
        digest.update(b"\n".join(itertools.chain.from_iterable(chunk)) + b"\n")
        count += len(chunk)
    return digest.hexdigest(), count


def validate(path: str | os.PathLike) -> StoreInfo:
    """Open the store, check metadata, size and checksum with one full pass; raise
    StoreError on any doubt. The pass leaves every page in the page cache (warm)."""
    started = time.monotonic()
    real = os.path.realpath(path)
    env = open_env(path)
    try:
        meta = read_meta(env, path)
        _advise_willneed(real)
        try:
            terms_db = env.open_db(TERMS_DB, create=False)
            with env.begin(db=terms_db) as txn:
                sha, count = content_digest(txn.cursor().iternext())
        except lmdb.Error as exc:
            raise StoreError(f"{path}: corrupt ({exc})") from exc
    finally:
        env.close()
    if sha != meta["sha256"]:
        raise StoreError(f"{path}: checksum mismatch (metadata {meta['sha256'][:12]}, "
                         f"content {sha[:12]})")
    if count != int(meta["entries"]):
        raise StoreError(f"{path}: metadata says {meta['entries']} entries, store has {count}")
    return StoreInfo(real, meta["version"], count, sha, os.path.getsize(real),
                     round(time.monotonic() - started, 3))


def _advise_willneed(path: str) -> None:
    """Ask the kernel to read the whole file ahead, asynchronously, before the pass."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def build(pairs: Iterable[tuple[bytes, bytes]], output: str | os.PathLike, version: str) -> str:
    """Write a store from (term, tags) pairs *sorted by term*, beside `output`, then rename
    it into place. Returns its sha256. Refuses to overwrite an existing store: a running
    generation may have it mapped."""
    if not version or any(c.isspace() or c == "/" for c in version):
        raise ValueError("version must be a non-empty word without spaces or '/'")
    output = os.fspath(output)
    if os.path.exists(output):
        raise FileExistsError(f"{output} exists; a store is never rewritten (new version?)")
    os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
    pairs = iter(pairs)
    with files.beside(output) as tmp:
        # sync=False while writing, one fsync at the end: the rename is the commit point.
        env = lmdb.open(tmp, subdir=False, map_size=1 << 40, lock=False, max_dbs=2,
                        sync=False, metasync=False)
        try:
            digest, count = _fill(env, pairs)
            with env.begin(write=True, db=env.open_db(META_DB)) as txn:
                for key, value in (("format", FORMAT), ("version", version),
                                   ("entries", str(count)), ("sha256", digest)):
                    txn.put(key.encode(), value.encode())
            env.sync(True)
        finally:
            env.close()
        # Published means immutable: read-only before the rename, so nothing the kit runs
        # (and no careless writer without root) changes a file some worker maps.
        os.chmod(tmp, PUBLISHED_MODE)
        os.replace(tmp, output)
    return digest


def _fill(env: lmdb.Environment, pairs: Iterator[tuple[bytes, bytes]]) -> tuple[str, int]:
    terms_db = env.open_db(TERMS_DB)
    hashed = hashlib.sha256()
    count = 0
    with env.begin(write=True, db=terms_db) as txn:
        cursor = txn.cursor()
        while chunk := list(itertools.islice(pairs, HASH_BATCH)):
            # append=True: LMDB refuses out-of-order keys instead of silently re-sorting.
            _, added = cursor.putmulti(chunk, append=True, dupdata=False)
            if added != len(chunk):
                raise ValueError("pairs must be sorted by term and unique")
            hashed.update(b"\n".join(itertools.chain.from_iterable(chunk)) + b"\n")
            count += len(chunk)
    return hashed.hexdigest(), count


def point(pointer: str | os.PathLike, store: str | os.PathLike) -> None:
    """Atomically make the symlink `pointer` name `store` (relative when they share a dir),
    so the next generation (reload, restart) opens the same store the workers serve."""
    pointer, store = os.path.abspath(pointer), os.path.realpath(store)
    folder = os.path.dirname(pointer)
    target = os.path.relpath(store, folder) if os.path.dirname(store) == folder else store
    tmp = f"{pointer}.tmp.{os.getpid()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, pointer)


# -- worker reports ----------------------------------------------------------------------


def report_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / REPORT_DIR


def write_report(run_dir: str | os.PathLike, report: WorkerReport) -> None:
    folder = report_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    files.atomic_write(folder / f"{report.pid}.json", json.dumps(asdict(report)))


def read_reports(run_dir: str | os.PathLike, pids: Iterable[int]) -> dict[int, WorkerReport]:
    """The report of each pid that has one (a pid's report is only written by that pid)."""
    folder = report_dir(run_dir)
    found = {}
    for pid in pids:
        report = WorkerReport.read(folder / f"{pid}.json")
        if report and report.pid == pid:
            found[pid] = report
    return found


def remove_dead_reports(run_dir: str | os.PathLike) -> None:
    """Drop the reports of workers that have exited (their pids may be reused)."""
    folder = report_dir(run_dir)
    for path in folder.glob("*.json") if folder.is_dir() else ():
        if path.stem.isdigit() and not procs.alive(int(path.stem)):
            path.unlink(missing_ok=True)


def annotate_workers(run_dir: str | os.PathLike, workers: list[dict]) -> list[dict]:
    """`status`: add each worker's store version (None in heap mode) to the stats rows."""
    reports = read_reports(run_dir, [w["pid"] for w in workers if w.get("pid")])
    return [dict(w, store=reports[w["pid"]].version if w["pid"] in reports else None)
            for w in workers]


def main(argv: list[str] | None = None) -> int:
    """`python -m hotswap.protocol.store validate PATH`: one JSON line (StoreInfo) on stdout, or one
    error line on stderr and exit 1. `hotswap refresh` runs it in a child process, so a
    store bad enough to crash LMDB kills the child, not the CLI."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "validate":
        print("usage: python -m hotswap.protocol.store validate PATH", file=sys.stderr)
        return 2
    # the full pass competes with the serving workers: it takes the CPU and disk they leave
    priority.background()
    try:
        info = validate(args[1])
    except StoreError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps(info.to_json()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
