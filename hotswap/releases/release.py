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
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import Config, find_uwsgi, load, uwsgi_get
from ..errors import ExitCode, HotswapError
from ..service.instance import find_masters
from ..swap import probe
from ..swap.lock import exclusive, reload_lock
from ..swap.reload import Phase, ReloadResult, reload, write_last_reload
from ..system import files, procs
from . import content

ENTRY_INI = "hotswap.ini"
RELEASE_INI = "srv.ini"
TARBALL = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz)$")
IMPORT_CHECK_TIMEOUT = 120.0
DEFAULT_KEEP = 5

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


def stage(layout: Layout, source: Path) -> str:
    """Copy a directory or unpack a tarball into releases/<id>, complete before it appears."""
    if not source.exists():
        raise HotswapError(f"no such release: {source}", ExitCode.CONFIG)
    release_id = new_id(source)
    final = layout.releases / release_id
    with files.beside(final) as tmp:
        if source.is_dir():
            shutil.copytree(source, tmp, symlinks=True, ignore=_not_release_files(source))
        elif TARBALL.search(source.name):
            _unpack(source, Path(tmp))
        else:
            raise HotswapError(f"not a directory or a tarball: {source}", ExitCode.CONFIG)
        if not (Path(tmp) / RELEASE_INI).is_file():
            raise HotswapError(f"{source} has no {RELEASE_INI} at its top: not a release",
                               ExitCode.CONFIG)
        os.rename(tmp, final)
    return release_id


def _unpack(tarball: Path, into: Path) -> None:
    try:
        with tarfile.open(tarball) as archive:
            archive.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as exc:
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
    health = probe.healthz(cfg.http_socket, timeout=2.0, path=cfg.health_path)
    if not health:
        return None
    if health.get("release"):
        return str(health["release"])
    try:
        cwd = Path(os.readlink(f"/proc/{int(health['master_pid'])}/cwd"))
    except (KeyError, ValueError, OSError):
        return None
    return cwd.name if cwd.parent == layout.releases.resolve() else None


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

    def to_json(self) -> dict:
        # changed: what serves is not what served before (a fleet tool's changed_when)
        return {**asdict(self), "changed": self.ok and self.release != self.previous}


def swap_to(cfg: Config, layout: Layout, result: DeployResult, timeout: float,
            drain: float, show: Show) -> None:
    """Flip `current` to result.release and reload; flip it back if the old one still serves.
    The caller holds the reload lock."""
    target, previous = result.release, result.previous
    assert target is not None
    if find_masters(cfg).live is None:
        flip(layout, target)
        result.ok, result.exit_code = True, int(ExitCode.OK)
        result.message = (f"current -> {target}; nothing serves: start it with "
                          f"`hotswap --ini {cfg.ini} start`")
        return
    flip(layout, target)
    try:
        outcome: ReloadResult = reload(cfg, timeout, drain, show, lock_held=True)
    except BaseException:
        # a bug or an interrupt outside the reload's own handling: `current` must not be
        # left naming a release that does not serve
        if previous and serving(cfg, layout) != target:
            flip(layout, previous)
        raise
    try:
        write_last_reload(cfg, outcome)
    except OSError:
        pass  # the deploy record below still says what happened
    result.reload = outcome.to_json()
    result.serving = serving(cfg, layout)
    result.ok, result.exit_code = outcome.ok, outcome.exit_code
    if outcome.ok:
        result.message = f"release {target} serves: {outcome.message}"
        return
    if result.serving != target and previous:
        flip(layout, previous)
        result.message = (f"release {target} refused, current back on {previous} (serving "
                          f"{result.serving or '?'}): {outcome.message}")
    else:
        result.message = (f"release {target} failed and current still names it (serving "
                          f"{result.serving or '?'}): {outcome.message}")


def deploy(ini: Path, source: Path, timeout: float, drain: float, keep: int,
           import_check: bool, show: Show, if_changed: bool = False) -> DeployResult:
    """Stage, check, flip, reload; `ini` is the layout's entry ini (ROOT/hotswap.ini).
    if_changed: a release with the same content as the one serving is dropped, not swapped."""
    started = time.monotonic()
    first = Layout(ini.absolute().parent)
    if first.releases.is_dir() and first.current_id() is None:
        # The first release: the entry ini cannot be read before `current` exists, and
        # nothing can be serving from this layout yet. No run dir yet either: the lock is
        # the layout's own.
        first.history_file.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(first.history_file.parent / "first-deploy.lock",
                       "another deploy of the first release is in progress; refusing to "
                       "deploy"):
            if first.current_id() is None:
                return _first(first, source, import_check, started)
    cfg = load(ini)
    layout = layout_of(cfg)
    with reload_lock(cfg, "deploy"):
        result = DeployResult("deploy", False, int(ExitCode.RELOAD_FAILED), "",
                              previous=layout.current_id())
        result.release = stage(layout, source)
        if if_changed and (same := same_as_serving(cfg, layout, result.release)):
            remove(layout, result.release)
            result.release = result.serving = same
            result.ok, result.exit_code = True, int(ExitCode.OK)
            result.message = f"release {same} already serves this content: nothing to do"
            return _finish(layout, result, started, keep=0)
        try:
            check(cfg.uwsgi, layout.releases / result.release, import_check)
        except HotswapError as error:
            result.exit_code, result.message = int(error.code), (
                f"{error.message}; current still {result.previous or 'unset'}")
        else:
            swap_to(cfg, layout, result, timeout, drain, show)
        return _finish(layout, result, started, keep)


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
                          release=stage(layout, source))
    try:
        check(find_uwsgi(), layout.releases / result.release, import_check)
    except HotswapError as error:
        result.exit_code, result.message = int(error.code), error.message
    else:
        flip(layout, result.release)
        result.ok, result.exit_code = True, int(ExitCode.OK)
        result.message = (f"current -> {result.release} (the first release); start it with "
                          f"`hotswap --ini {layout.root / ENTRY_INI} start`")
    return _finish(layout, result, started, keep=0)


def rollback(cfg: Config, timeout: float, drain: float, show: Show,
             to: str | None = None) -> DeployResult:
    """Swap in the release before `current`, or release `to` (a fleet's undo of a batch
    names the release each host served before)."""
    layout = layout_of(cfg)
    started = time.monotonic()
    with reload_lock(cfg, "roll back"):
        current = layout.current_id()
        ids = layout.ids()
        older = [i for i in ids if current is None or i < current]
        if to is not None and to not in ids:
            raise HotswapError(f"no release {to} in {layout.releases} to roll back to (there: "
                               f"{', '.join(ids) or 'none'})", ExitCode.CONFIG)
        if to is None and not older:
            raise HotswapError(f"no release older than {current} in {layout.releases} to "
                               "roll back to", ExitCode.CONFIG)
        result = DeployResult("rollback", False, int(ExitCode.RELOAD_FAILED), "",
                              release=to or older[-1], previous=current)
        swap_to(cfg, layout, result, timeout, drain, show)
        return _finish(layout, result, started, keep=0)


def _finish(layout: Layout, result: DeployResult, started: float, keep: int) -> DeployResult:
    """Drop a release that never served, prune after a success, and record the outcome."""
    live = {layout.current_id(), result.serving, *in_use(layout)}
    if not result.ok and result.action == "deploy" and result.release not in live:
        remove(layout, result.release)
    if result.ok and keep > 0:
        result.pruned = prune(layout, keep, live)
    result.seconds = round(time.monotonic() - started, 3)
    record = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **{k: v for k, v in result.to_json().items() if k != "reload"}}
    layout.history_file.parent.mkdir(parents=True, exist_ok=True)
    with open(layout.history_file, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return result


def remove(layout: Layout, release_id: str | None) -> None:
    """Rename out of sight first: a half-deleted release never shows under its id."""
    if not release_id:
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
    """Keep the newest `keep` releases, and always the current and the serving one."""
    ids = layout.ids()
    doomed = [i for i in ids[:-keep] if i not in protect]
    for release_id in doomed:
        remove(layout, release_id)
    return doomed


def history(layout: Layout) -> list[dict]:
    try:
        lines = layout.history_file.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


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
