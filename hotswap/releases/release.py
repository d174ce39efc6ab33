"""Releases as immutable directories: deploy, rollback, list, prune.

    ROOT/hotswap.ini          the kit's entry point (`hotswap init-releases`): sets run_dir
                              and log_dir, then includes ROOT/current/srv.ini
    ROOT/current -> releases/<id>       the release a (re)started or re-forked master loads
    ROOT/releases/<id>/       srv.py, srv.ini, data (or a link to a shared store); never
                              changed once in place
    ROOT/run, ROOT/log        FIFOs, sockets, pidfile, state; the uWSGI log (outside the
                              releases: every generation of every release hands over there)
    ROOT/state/deploys.jsonl  one line per deploy or rollback, with its outcome

Why the entry point: uWSGI expands %d to the *resolved* folder of the ini (realpath), so
srv.ini reached through `current` gives %d = ROOT/releases/<id>/, and a re-forked master
re-reads its argv's ini, so after a flip it gets the new release's folder. srv.ini's
`run_dir = %drun` would then move the FIFOs with every release. A placeholder's first
definition wins, so hotswap.ini sets run_dir and log_dir before it includes srv.ini, and
srv.ini needs no change (docs/releases.md has the experiment).

A deploy or rollback holds the reload lock from the copy to the end: stage the release
beside its final name and rename it into place, check it, flip `current` (a new link renamed
over the old one), reload; if the old generation still serves afterwards, flip `current`
back. The old release serves throughout.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from ..config import Config, find_uwsgi, load, uwsgi_get
from ..errors import ExitCode, HotswapError
from ..service.instance import find_masters
from ..swap import probe
from ..swap.lock import exclusive, reload_lock
from ..swap.reload import Phase, ReloadResult, reload, write_last_reload
from ..system import files, memory, procs
from . import content

ENTRY_INI = "hotswap.ini"
RELEASE_INI = "srv.ini"
TARBALL = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz)$")
IMPORT_CHECK_TIMEOUT = 120.0

Show = Callable[[Phase, float, str], None]


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def history_file(self) -> Path:
        return self.root / "state" / "deploys.jsonl"

    def ids(self) -> list[str]:
        """Release ids, oldest first (ids start with their UTC creation time)."""
        if not self.releases.is_dir():
            return []
        return sorted(p.name for p in self.releases.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and ".tmp." not in p.name)

    def current_id(self) -> str | None:
        try:
            return Path(os.readlink(self.current)).name
        except (FileNotFoundError, OSError):
            return None

    def current_problem(self) -> str | None:
        """What is wrong with `current`, if it exists but is not a link to a release folder
        (None: a good link, or no `current` at all, before the first release)."""
        link = self.current
        if not os.path.lexists(link):
            return None
        if not link.is_symlink():
            kind = "a folder" if link.is_dir() else "a regular file"
            return f"{link} is {kind}, not a link to a release"
        target = os.readlink(link)
        if not link.is_dir():
            return f"{link} is a dangling link (to {target}, which does not exist)"
        if link.resolve().parent != self.releases.resolve():
            return f"{link} links to {target}, which is not a release under {self.releases}"
        return None

    def check_current(self) -> None:
        """Refuse (exit 2) a `current` that is not a link to a release, naming the fix,
        before uWSGI reads the entry ini through it (and fails with a bare realpath error)."""
        problem = self.current_problem()
        if problem is None:
            return
        candidates = [*sorted(in_use(self)), *reversed(good_ids(self))]
        fix = (f"`ln -sfn releases/{candidates[0]} {self.current}` (the release "
               f"{'that serves' if in_use(self) else 'deployed last'})" if candidates
               else f"`rm {self.current}`, then `hotswap --ini {self.root / ENTRY_INI} "
               "deploy PATH`")
        raise HotswapError(f"{problem}: point it at a release with {fix}", ExitCode.CONFIG)


def layout_of(cfg: Config) -> Layout:
    """The layout whose entry ini is cfg.ini; refuses a plain clone or a broken layout."""
    layout = Layout(cfg.ini.parent)
    if not layout.releases.is_dir():
        raise HotswapError(f"{cfg.ini} is not a release layout (no {layout.releases}): create "
                           "one with `hotswap init-releases ROOT`, then use --ini "
                           f"ROOT/{ENTRY_INI}", ExitCode.CONFIG)
    releases = layout.releases.resolve()
    if cfg.run_dir.resolve().is_relative_to(releases):
        # A release's own run dir would move the FIFOs with every flip: no hand-over.
        raise HotswapError(f"run_dir {cfg.run_dir} is inside {releases}: start the service "
                           f"with --ini {layout.root / ENTRY_INI}, which sets it outside",
                           ExitCode.CONFIG)
    return layout


def init(root: Path, run_dir: Path | None, log_dir: Path | None) -> Path:
    """Create ROOT/{releases,state} and the entry ini (kept if present); returns its path."""
    root = root.absolute()
    for folder in (root / "releases", root / "state"):
        folder.mkdir(parents=True, exist_ok=True)
    ini = root / ENTRY_INI
    if not ini.exists():
        files.atomic_write(ini, (
            "; written by `hotswap init-releases`: the release layout's entry point\n"
            "; (docs/releases.md).\n"
            "; A placeholder's first definition wins: these beat srv.ini's %d-relative ones,\n"
            "; so every release hands over through the same FIFOs and socket.\n"
            "[uwsgi]\n"
            f"run_dir = {run_dir or root / 'run'}\n"
            f"log_dir = {log_dir or root / 'log'}\n"
            "; re-read at every re-fork: a new master loads whatever `current` names then\n"
            f"ini = %dcurrent/{RELEASE_INI}\n"))
    return ini


# -- staging and checking --------------------------------------------------------------------
def new_id(source: Path) -> str:
    stem = TARBALL.sub("", source.name.rstrip("/")) or "release"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "release"
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{stamp}-{int(now * 1000) % 1000:03d}-{slug}"


# A clone that has run (`make run`) holds its own run/ (FIFOs, sockets) and log/; none of
# these belong in a release, and copying a FIFO would block on it.
SKIPPED_AT_TOP = {".git", ".venv", "run", "log", ".pytest_cache", ".ruff_cache"}


def _not_release_files(top: Path) -> Callable[[str, list[str]], set[str]]:
    """copytree's `ignore`: SKIPPED_AT_TOP at the top, caches and special files anywhere."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {name for name in names if name == "__pycache__"}
        if Path(folder) == top:
            skip |= SKIPPED_AT_TOP & set(names)
        for name in names:
            path = os.path.join(folder, name)
            if not (os.path.islink(path) or os.path.isdir(path) or os.path.isfile(path)):
                skip.add(name)  # a FIFO, a socket, a device
        return skip
    return ignore


def stage(layout: Layout, source: Path, release_id: str | None = None) -> str:
    """Copy a directory or unpack a tarball into releases/<id>, complete before it appears."""
    refuse_source(source)
    release_id = release_id or new_id(source)
    final = layout.releases / release_id
    with files.beside(final) as tmp:
        if source.is_dir():
            shutil.copytree(source, tmp, symlinks=True, ignore=_not_release_files(source))
        else:
            _unpack(source, Path(tmp))
        if not (Path(tmp) / RELEASE_INI).is_file():
            raise HotswapError(f"{source} has no {RELEASE_INI} at its top: not a release",
                               ExitCode.CONFIG)
        os.rename(tmp, final)
    return release_id


def fingerprint(source: Path) -> str | None:
    """Inode, mtime and size: the same entry of a drop folder, unchanged (None: gone)."""
    try:
        st = source.stat()
    except OSError:
        return None
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def deployed(layout: Layout, source: Path) -> dict | None:
    """The history's successful deploy of `source` as it is now, if there is one."""
    stat = fingerprint(source)
    for record in reversed(history(layout)):
        if record.get("source") == str(source) and record.get("source_stat") == stat:
            return record if record.get("ok") and stat else None
    return None


def refuse_source(source: Path) -> None:
    """Bad usage, refused before anything is locked, copied or recorded."""
    if not source.exists():
        raise HotswapError(f"no such release: {source}", ExitCode.CONFIG)
    if not (source.is_dir() or TARBALL.search(source.name)):
        raise HotswapError(f"not a directory or a tarball: {source}", ExitCode.CONFIG)


# What an interrupted deploy leaves under releases/: a copy being staged (files.beside's
# name) or a release being deleted (remove()); each ends with the pid that made it.
DEBRIS = re.compile(r"(?:\.tmp\.|^\..*\.deleting\.)(\d+)$")


def sweep(layout: Layout) -> list[str]:
    """Remove what deploys killed mid-copy or mid-delete left, once their pid is gone (a
    live one may still be copying). The caller holds the reload lock."""
    swept = []
    for entry in sorted(layout.releases.iterdir()) if layout.releases.is_dir() else []:
        found = DEBRIS.search(entry.name)
        if not found or procs.alive(int(found.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        swept.append(entry.name)
    return swept


# What a cut archive raises, by compression: tar's own, gzip's, bzip2's, xz's.
UNREADABLE = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


def incomplete(tarball: Path) -> str | None:
    """Why `tarball` is not a whole archive (None: it is). A tar cut at a member boundary
    reads as a valid, shorter archive, so the proof is its end: the two zero blocks tar
    writes after the last member, and a compressed stream that reads to its end marker."""
    try:
        with tarfile.open(tarball, "r:*") as archive:
            archive.getmembers()
            archive.fileobj.seek(archive.offset)
            end = archive.fileobj.read(2 * tarfile.BLOCKSIZE)
            while archive.fileobj.read(1 << 20):
                pass  # up to the compressed stream's own end (gzip checks its trailer)
    except UNREADABLE as exc:
        return str(exc) or type(exc).__name__
    if len(end) < 2 * tarfile.BLOCKSIZE or end.count(0) != len(end):
        return "it ends without tar's end-of-archive blocks"
    return None


def _unpack(tarball: Path, into: Path) -> None:
    cut = incomplete(tarball)
    if cut:
        raise HotswapError(f"{tarball} is not a complete archive ({cut}): still being "
                           "written, or cut short; deploy it once it is whole", ExitCode.CONFIG)
    try:
        with tarfile.open(tarball) as archive:
            archive.extractall(into, filter="data")
    except UNREADABLE as exc:
        raise HotswapError(f"cannot unpack {tarball}: {exc}", ExitCode.CONFIG) from exc
    tops = list(into.iterdir())
    if len(tops) == 1 and tops[0].is_dir() and not (into / RELEASE_INI).exists():
        # a tarball of a folder: its content is the release
        for child in tops[0].iterdir():
            child.rename(into / child.name)
        tops[0].rmdir()


def check(uwsgi: Path, folder: Path, import_check: bool) -> None:
    """The files the release's ini names exist (and, optionally, its app imports)."""
    ini = folder / RELEASE_INI
    needed = [Path(v) for key in ("wsgi-file", "chdir") for v in uwsgi_get(uwsgi, ini, [key])]
    env = dict(line.split("=", 1) for line in uwsgi_get(uwsgi, ini, ["env"]) if "=" in line)
    real = folder.resolve()
    needed += [Path(v) for v in env.values()
               if Path(v).is_absolute() and Path(v).is_relative_to(real)]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise HotswapError(f"release {folder.name} lacks {', '.join(missing)}",
                           ExitCode.RELOAD_FAILED)
    wsgi = [p for p in needed if p.suffix == ".py"]
    if import_check and wsgi:
        _import_check(wsgi[0], real, env)


def _import_check(wsgi: Path, folder: Path, env: dict[str, str]) -> None:
    code = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='hotswap_import_check')"
    try:
        done = subprocess.run([sys.executable, "-c", code, str(wsgi)], cwd=folder,
                              env=dict(os.environ, **env), capture_output=True, text=True,
                              timeout=IMPORT_CHECK_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise HotswapError(f"release {folder.name}: import check still running after "
                           f"{IMPORT_CHECK_TIMEOUT:g}s", ExitCode.RELOAD_FAILED) from exc
    if done.returncode != 0:
        cause = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise HotswapError(f"release {folder.name} does not import: {cause}",
                           ExitCode.RELOAD_FAILED)


# -- flipping and serving -----------------------------------------------------------------
def flip(layout: Layout, release_id: str) -> None:
    """Point `current` at the release: a new link renamed over the old one (atomic)."""
    with files.beside(layout.current) as tmp:
        os.symlink(Path("releases") / release_id, tmp)
        os.replace(tmp, layout.current)


def serving(cfg: Config, layout: Layout) -> str | None:
    """The release the answering master loaded: /healthz's `release` if it names one, else
    the master's working directory (srv.ini's chdir = %d, the resolved release folder)."""
    health = probe.healthz(cfg.socket, timeout=2.0, path=cfg.health_path)
    if not health:
        return None
    if health.get("release"):
        return str(health["release"])
    try:
        cwd = Path(os.readlink(f"/proc/{int(health['master_pid'])}/cwd"))
    except (KeyError, ValueError, OSError):
        return None
    return cwd.name if cwd.parent == layout.releases.resolve() else None


class Outcome(str, Enum):
    """What the history records of every deploy and rollback."""

    OK = "ok"
    REFUSED = "refused"  # stopped before anything changed: a check, the reload's preflight
    FAILED = "failed"  # the reload ran and failed (rolled back), or the copy failed
    INTERRUPTED = "interrupted"  # a signal, or the output's reader gone, before it ended


class Interrupted(BaseException):
    """SIGTERM (or SIGINT) while a deploy copies or checks, before the reload notes them."""


@dataclass
class DeployResult:
    action: str  # deploy | rollback
    ok: bool
    exit_code: int
    message: str
    release: str | None = None  # the release this action tried to make live
    previous: str | None = None  # the release `current` named before
    serving: str | None = None  # the release that serves afterwards
    seconds: float = 0.0
    pruned: list[str] = field(default_factory=list)
    reload: dict | None = None
    outcome: str = Outcome.FAILED.value
    swept: list[str] = field(default_factory=list)  # debris of interrupted deploys removed
    source: str | None = None  # what a deploy shipped, and its fingerprint() then: a
    source_stat: str | None = None  # restarted watcher knows what its last run took

    def to_json(self) -> dict:
        # changed: what serves is not what served before (a fleet tool's changed_when)
        return {**asdict(self), "changed": self.ok and self.release != self.previous}

    def end(self, outcome: Outcome, code: ExitCode | int, message: str) -> None:
        self.outcome, self.exit_code, self.message = outcome.value, int(code), message
        self.ok = outcome is Outcome.OK


@dataclass(frozen=True)
class SwapOptions:
    """The reload's own knobs, passed through by deploy, rollback and watch."""

    timeout: float = 300.0
    drain: float = 90.0
    force: bool = False
    memory_margin: float = memory.DEFAULT_MARGIN_PERCENT


def swap_to(cfg: Config, layout: Layout, result: DeployResult, options: SwapOptions,
            show: Show) -> None:
    """Flip `current` to result.release and reload; flip it back if the old one still serves.
    The caller holds the reload lock."""
    target, previous = result.release, result.previous
    assert target is not None
    if find_masters(cfg).live is None:
        flip(layout, target)
        result.end(Outcome.OK, ExitCode.OK, f"current -> {target}; nothing serves: start it "
                   f"with `hotswap --ini {cfg.ini} start`")
        return
    flip(layout, target)
    try:
        outcome: ReloadResult = reload(cfg, options.timeout, options.drain, show,
                                       force=options.force,
                                       memory_margin=options.memory_margin, lock_held=True)
    except BaseException:
        # a refusal in the reload's preflight, a bug, or an interrupt outside the reload's
        # own handling: `current` must not be left naming a release that does not serve
        if previous and serving(cfg, layout) != target:
            flip(layout, previous)
        raise
    try:
        write_last_reload(cfg, outcome)
    except OSError:
        pass  # the deploy record below still says what happened
    result.reload = outcome.to_json()
    result.serving = serving(cfg, layout)
    if outcome.ok:
        result.end(Outcome.OK, ExitCode.OK, f"release {target} serves: {outcome.message}")
        return
    ended = Outcome.INTERRUPTED if outcome.interrupted else Outcome.FAILED
    if result.serving != target and previous:
        flip(layout, previous)
        result.end(ended, outcome.exit_code, f"release {target} refused, current back on "
                   f"{previous} (serving {result.serving or '?'}): {outcome.message}")
    else:
        result.end(ended, outcome.exit_code, f"release {target} failed and current still "
                   f"names it (serving {result.serving or '?'}): {outcome.message}")


@contextmanager
def _attempt(result: DeployResult, finish: Callable[[], object]) -> Iterator[None]:
    """Every way a deploy or rollback can stop becomes an outcome in `result`, and `finish`
    (_finish) records it and drops what never served. A bug still raises, once recorded."""
    still = f"current still {result.previous or 'unset'}"
    try:
        yield
    except HotswapError as error:
        result.end(Outcome.REFUSED, error.code, f"{error.message}; {still}")
    except (Interrupted, KeyboardInterrupt) as exc:
        name = str(exc) or "SIGINT"
        result.end(Outcome.INTERRUPTED, ExitCode.RELOAD_FAILED,
                   f"{result.action} interrupted by {name} before the swap; {still}")
    except BrokenPipeError:
        result.end(Outcome.INTERRUPTED, ExitCode.RELOAD_FAILED,
                   f"{result.action} stopped: its output's reader is gone (a killed watcher "
                   f"or pipe); {still}")
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        result.end(Outcome.FAILED, ExitCode.CONFIG,
                   f"{result.action} failed: {exc.strerror or exc}{where}; {still}")
    except BaseException as exc:
        result.end(Outcome.FAILED, ExitCode.RELOAD_FAILED, f"{result.action} failed: {exc!r}")
        raise
    finally:
        finish()


def _interrupt_staging(signum: int, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextmanager
def _interruptible(action: str) -> Iterator[None]:
    """SIGTERM and SIGINT stop a copy or a check cleanly (the staged copy is removed, the
    history says so); the reload then installs its own handlers, which only note them.
    Outermost, so that one landing while the lock is taken is one line too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, _interrupt_staging) for sig in (signal.SIGINT,
                                                                      signal.SIGTERM)}
    try:
        yield
    except Interrupted as exc:  # before _attempt began: nothing to record
        raise HotswapError(f"{action} interrupted by {exc} before it began; nothing changed",
                           ExitCode.RELOAD_FAILED) from None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def deploy(ini: Path, source: Path, timeout: float, drain: float, keep: int,
           import_check: bool, show: Show, options: SwapOptions | None = None,
           if_changed: bool = False) -> DeployResult:
    """Stage, check, flip, reload; `ini` is the layout's entry ini (ROOT/hotswap.ini).
    if_changed: a release with the same content as the one serving is dropped, not swapped."""
    started = time.monotonic()
    options = options or SwapOptions(timeout, drain)
    refuse_source(source)
    first = Layout(ini.absolute().parent)
    if first.releases.is_dir() and not os.path.lexists(first.current):
        # The first release: the entry ini cannot be read before `current` exists, and
        # nothing can be serving from this layout yet. No run dir yet either: the lock is
        # the layout's own.
        first.history_file.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(first.history_file.parent / "first-deploy.lock",
                       "another deploy of the first release is in progress; refusing to "
                       "deploy"):
            if not os.path.lexists(first.current):
                return _first(first, source, import_check, started)
    if first.releases.is_dir():
        first.check_current()
    cfg = load(ini)
    layout = layout_of(cfg)
    with _interruptible("deploy"), reload_lock(cfg, "deploy"):
        result = DeployResult("deploy", False, int(ExitCode.RELOAD_FAILED), "",
                              previous=layout.current_id(), release=new_id(source),
                              source=str(source), source_stat=fingerprint(source))
        with _attempt(result, lambda: _finish(layout, result, started, keep)):
            result.swept = sweep(layout)
            stage(layout, source, result.release)
            if if_changed and (same := same_as_serving(cfg, layout, result.release)):
                remove(layout, result.release)
                result.release = result.serving = same
                result.end(Outcome.OK, ExitCode.OK,
                           f"release {same} already serves this content: nothing to do")
                return result
            check(cfg.uwsgi, layout.releases / result.release, import_check)
            swap_to(cfg, layout, result, options, show)
        return result


def same_as_serving(cfg: Config, layout: Layout, staged: str) -> str | None:
    """The serving release's id if `current` names it and it holds what `staged` holds."""
    live = layout.current_id()
    if live is None or live == staged or serving(cfg, layout) != live:
        return None
    same = (content.digest(layout.releases / live, SKIPPED_AT_TOP)
            == content.digest(layout.releases / staged, SKIPPED_AT_TOP))
    return live if same else None


def _first(layout: Layout, source: Path, import_check: bool, started: float) -> DeployResult:
    result = DeployResult("deploy", False, int(ExitCode.RELOAD_FAILED), "",
                          release=new_id(source), source=str(source),
                          source_stat=fingerprint(source))
    with _interruptible("deploy"), _attempt(result, lambda: _finish(layout, result, started, 0)):
        result.swept = sweep(layout)
        stage(layout, source, result.release)
        check(find_uwsgi(), layout.releases / result.release, import_check)
        flip(layout, result.release)
        result.end(Outcome.OK, ExitCode.OK, f"current -> {result.release} (the first "
                   f"release); start it with `hotswap --ini {layout.root / ENTRY_INI} start`")
    return result


def rollback(cfg: Config, timeout: float, drain: float, show: Show,
             options: SwapOptions | None = None, to: str | None = None) -> DeployResult:
    """Swap in the release before `current`, or release `to` (a fleet's undo of a batch
    names the release each host served before)."""
    layout = layout_of(cfg)
    started = time.monotonic()
    with reload_lock(cfg, "roll back"):
        current = layout.current_id()
        ids = good_ids(layout)
        older = [i for i in ids if current is None or i < current]
        if to is not None and to not in ids:
            raise HotswapError(f"no release {to} in {layout.releases} to roll back to (there: "
                               f"{', '.join(ids) or 'none'}; releases a deploy refused never "
                               "count)", ExitCode.CONFIG)
        if to is None and not older:
            raise HotswapError(f"no release older than {current} in {layout.releases} to "
                               "roll back to (releases a deploy refused never count)",
                               ExitCode.CONFIG)
        result = DeployResult("rollback", False, int(ExitCode.RELOAD_FAILED), "",
                              release=to or older[-1], previous=current)
        with _attempt(result, lambda: _finish(layout, result, started, 0)):
            swap_to(cfg, layout, result, options or SwapOptions(timeout, drain), show)
        return result


def _finish(layout: Layout, result: DeployResult, started: float, keep: int) -> DeployResult:
    """Drop a release that never served, prune after a success, and record the outcome."""
    live = {layout.current_id(), result.serving, *in_use(layout)}
    if not result.ok and result.action == "deploy" and result.release not in live:
        try:
            remove(layout, result.release)
        except OSError:
            pass  # left in place: its history line marks it refused, never a target
    if result.ok and keep > 0:
        result.pruned = prune(layout, keep, live)
    result.seconds = round(time.monotonic() - started, 3)
    record = {"at": files.iso_time(),
              **{k: v for k, v in result.to_json().items() if k != "reload"}}
    try:
        layout.history_file.parent.mkdir(parents=True, exist_ok=True)
        with open(layout.history_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as exc:  # e.g. a full disk: the outcome is still printed
        result.message += f" (not recorded in {layout.history_file}: {exc.strerror or exc})"
    return result


def remove(layout: Layout, release_id: str | None) -> None:
    """Rename out of sight first: a half-deleted release never shows under its id."""
    if not release_id or not (layout.releases / release_id).exists():
        return
    doomed = layout.releases / f".{release_id}.deleting.{os.getpid()}"
    os.rename(layout.releases / release_id, doomed)
    shutil.rmtree(doomed)


def in_use(layout: Layout) -> set[str]:
    """Releases some process still runs from (its working directory): e.g. an old master
    still draining past --drain, whose release must outlive it."""
    releases = layout.releases.resolve()
    found = set()
    for pid in procs.all_pids():
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            continue
        if cwd.parent == releases:
            found.add(cwd.name)
    return found


def prune(layout: Layout, keep: int, protect: set[str | None]) -> list[str]:
    """Keep the newest `keep` releases that ever served, and always the current and the
    serving one; a release no deploy ever made serve takes no slot and goes too."""
    good = good_ids(layout)
    doomed = sorted({i for i in layout.ids() if i not in good} | set(good[:-keep]))
    doomed = [i for i in doomed if i not in protect]
    for release_id in doomed:
        remove(layout, release_id)
    return doomed


def history(layout: Layout) -> list[dict]:
    try:
        lines = layout.history_file.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def never_served(layout: Layout) -> set[str]:
    """Releases the history names only in failed or refused attempts: never current once
    a deploy ended, so never a rollback target nor a --keep slot. (A release the history
    does not name, e.g. copied in by hand, is not judged.)"""
    named, good = set(), set()
    for record in history(layout):
        named.add(record.get("release"))
        if record.get("ok"):
            good.add(record.get("release"))
        good.add(record.get("previous"))
    return named - good - {None}


def good_ids(layout: Layout) -> list[str]:
    """layout.ids() without never_served(), oldest first."""
    bad = never_served(layout)
    return [i for i in layout.ids() if i not in bad]


def listing(ini: Path) -> list[dict]:
    """Every release, oldest first, with whether `current` names it and whether it serves."""
    layout = Layout(ini.absolute().parent)
    if not layout.releases.is_dir():
        raise HotswapError(f"{ini} is not a release layout (no {layout.releases}): create one "
                           "with `hotswap init-releases ROOT`", ExitCode.CONFIG)
    current = layout.current_id()
    live = serving(load(ini), layout) if current else None
    last = {r["release"]: r for r in history(layout) if r.get("release")}
    return [{"id": i, "current": i == current, "serving": i == live,
             "last_action": last.get(i)} for i in layout.ids()]
