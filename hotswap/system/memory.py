"""Memory during a swap: will a second generation fit, who dies first, was it the OOM killer.

A swap briefly runs two generations, so the machine (or the service's memory cgroup) needs
room for a second copy of what the serving generation holds. Three rules, docs/memory.md:

- preflight: `hotswap reload` estimates what the new generation needs from the serving one
  (estimate()), compares it with what is available (MemAvailable, and the room under the
  cgroup's limit), and refuses before touching anything when it does not fit;
- the newcomer dies first: a loading generation runs with a high oom_score_adj (srv.ini's
  hook-pre-app); the accepting hook brings it back to the service's own value (settle()),
  recorded by `hotswap start` (remember_normal_score()), before the old master is told "q";
- an OOM kill while loading is a failed reload: the cgroup's oom_kill counter says so.

Everything here reads /proc and /sys and never raises for a missing or unreadable file: an
unknown figure is None, and an unknown never refuses a reload.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from . import procs

MIB = 1024 * 1024
# Headroom on top of the estimate: an import peaks above what it keeps (the file read whole,
# then parsed), and the new workers dirty copy-on-write pages before the old ones are gone.
DEFAULT_MARGIN_PERCENT = 30.0
# The service's own oom_score_adj, as `hotswap start` found it: what a generation returns to.
NORMAL_SCORE_NAME = "oom_score_adj"
# cgroup v1 says "no limit" with a huge number (PAGE_COUNTER_MAX pages, in bytes).
NO_LIMIT = 1 << 60


def human(size: int | None) -> str:
    if size is None:
        return "?"
    if size >= 1024 * MIB:
        return f"{size / (1024 * MIB):.1f} GiB"
    return f"{size / MIB:.0f} MiB"


# -- what a generation holds ------------------------------------------------------------------
def rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes ({} if the process is gone or not ours to read)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    figures = {}
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            figures[key] = int(parts[0]) * 1024
    return figures


def estimate(pids: list[int]) -> int | None:
    """Bytes a fresh copy of the generation made of `pids` (master and workers) will need.

    Why the anonymous part of PSS, summed: a new generation re-imports the release into fresh
    anonymous memory, so what it will hold is what the serving generation holds anonymously.
    Private_Clean + Private_Dirty misses most of it: the table the master built is shared
    copy-on-write with its workers, so it counts as Shared_* in all five processes and as
    Private in none (measured, 400,000 terms in heap mode: 7 MiB of private memory, 111 MiB
    of anonymous PSS, for a master holding 105 MiB of anonymous memory). PSS splits each
    shared page among its sharers, so the sum counts every page once. File-backed pages
    (code, libraries, the memory-mapped store) are left out: the new generation maps the same
    files and shares their page cache, which the kernel can reclaim anyway. A file on tmpfs
    is the exception the kernel makes: its pages count as Shmem (Pss_Shmem), like shared
    anonymous memory, yet the new generation maps the same file too, so shared_files() takes
    them out again; without that, a store on tmpfs counted twice (in the estimate, and in
    the cgroup's usage it is compared with) and refused reloads that fit. On a kernel
    without Pss_Anon in smaps_rollup: the whole Pss (an overestimate by the file pages)."""
    total, seen = 0, False
    for pid in pids:
        figures = rollup(pid)
        if not figures:
            continue
        seen = True
        if "Pss_Anon" in figures:
            shmem = figures.get("Pss_Shmem", 0)
            if shmem:
                shmem = max(0, shmem - shared_files(pid))
            total += figures["Pss_Anon"] + shmem
        else:
            total += figures.get("Pss", 0)
    return total if seen else None


# A mapping's header in /proc/PID/smaps: range, perms, offset, dev (hex major:minor), inode,
# path. The fields below it are in kB.
_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ (\S{4}) \S+ ([0-9a-f]+):([0-9a-f]+) (\d+)\s*(.*)$")
# Filesystems whose files' pages the kernel counts as Shmem.
SHMEM_FILESYSTEMS = {"tmpfs", "devtmpfs"}


def shmem_devices(pid: int) -> set[tuple[int, int]]:
    """(major, minor) of the tmpfs mounts `pid` sees (its own mount namespace)."""
    found = set()
    try:
        lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) > 2 and tail and tail[0] in SHMEM_FILESYSTEMS:
            major, _, minor = fields[2].partition(":")
            if major.isdigit() and minor.isdigit():
                found.add((int(major), int(minor)))
    return found


def shared_files(pid: int) -> int:
    """PSS bytes of `pid`'s shared mappings of files on tmpfs that still exist (a new
    generation maps the same files: no new memory). SysV, memfd and deleted files are not
    among them: a new generation makes its own."""
    devices = shmem_devices(pid)
    if not devices:
        return 0
    total, counting = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as handle:
            for line in handle:
                header = _MAPPING.match(line)
                if header:
                    perms, major, minor, inode, path = header.groups()
                    counting = (perms[3] == "s" and inode != "0" and path.startswith("/")
                                and not path.endswith(procs.DELETED)
                                and (int(major, 16), int(minor, 16)) in devices)
                elif counting and line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo (None where it is hidden, e.g. systemd's ProcSubset=pid)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- the memory cgroup ------------------------------------------------------------------------
def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _read_int(path: Path) -> int | None:
    words = _words(path)
    return int(words[0]) if words and words[0].lstrip("-").isdigit() else None


def _keyed(path: Path) -> dict[str, int]:
    """A "key value" file (memory.stat, memory.events, memory.oom_control)."""
    try:
        pairs = (line.split() for line in path.read_text().splitlines())
        return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].lstrip("-").isdigit()}
    except OSError:
        return {}


def _mounts() -> tuple[Path | None, Path | None]:
    """(cgroup v1 memory mount, cgroup v2 mount) from /proc/self/mountinfo."""
    v1 = v2 = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount = Path(fields[4])
        if tail[0] == "cgroup" and "memory" in tail[2].split(","):
            v1 = mount
        elif tail[0] == "cgroup2" and "memory" in _words(mount / "cgroup.controllers"):
            v2 = mount
    return v1, v2


@dataclass(frozen=True)
class Cgroup:
    """The memory cgroup a process runs in: its folder, and which interface it speaks."""

    path: Path
    version: int  # 1 or 2
    mount: Path

    def levels(self) -> list[Path]:
        """This cgroup and its ancestors below the mount: a limit anywhere up there counts."""
        found, here = [], self.path
        while here != self.mount and self.mount in here.parents:
            found.append(here)
            here = here.parent
        return found

    def _limit_and_in_use(self, level: Path) -> tuple[int | None, int | None]:
        """(limit, working set) of one level; the working set leaves out the inactive file
        pages, which the kernel reclaims before it would ever OOM-kill anything."""
        if self.version == 1:
            limit = _read_int(level / "memory.limit_in_bytes")
            usage = _read_int(level / "memory.usage_in_bytes")
            inactive = _keyed(level / "memory.stat").get("total_inactive_file", 0)
        else:
            limit = _read_int(level / "memory.max")  # None for "max"
            usage = _read_int(level / "memory.current")
            inactive = _keyed(level / "memory.stat").get("inactive_file", 0)
        if limit is None or limit >= NO_LIMIT:
            limit = None
        return limit, None if usage is None else max(0, usage - inactive)

    def tightest(self) -> tuple[int | None, int | None]:
        """(limit, in use) of the level with the least room under its limit; (None, in use
        here) if no level has one."""
        measured = [self._limit_and_in_use(level) for level in self.levels()]
        limited = [(limit, used) for limit, used in measured
                   if limit is not None and used is not None]
        if limited:
            return min(limited, key=lambda pair: pair[0] - pair[1])
        return None, measured[0][1] if measured else None

    def oom_kills(self) -> int | None:
        """How many processes the OOM killer killed in this cgroup (and below) so far. v2's
        memory.events counts the subtree; v1's memory.oom_control counts only its own
        cgroup on recent kernels (6.x), so a kill in a child cgroup (a new master moved into
        one) would go unseen: v1 sums the subtree. Not at the hierarchy's root, whose
        subtree is the whole machine: another tenant's OOM kill would fail our reload (seen
        when a test OOM-killed its own trap while another test reloaded); there, only its
        own count."""
        if self.version == 2:
            return _keyed(self.path / "memory.events").get("oom_kill")
        if self.path == self.mount:
            return _keyed(self.path / "memory.oom_control").get("oom_kill")
        counts = [_keyed(Path(folder) / "memory.oom_control").get("oom_kill")
                  for folder, _, _ in os.walk(self.path)]
        known = [count for count in counts if count is not None]
        return sum(known) if known else None


def cgroup_of(pid: int) -> Cgroup | None:
    """The memory cgroup of `pid` (v1 memory controller, else a v2 one with memory)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    v1, v2 = _mounts()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if v1 and "memory" in controllers.split(","):
            folder = v1 / path.lstrip("/")
            return Cgroup(folder, 1, v1) if folder.is_dir() else None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if v2 and controllers == "":
            folder = v2 / path.lstrip("/")
            return Cgroup(folder, 2, v2) if folder.is_dir() else None
    return None


# -- the preflight ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Room:
    """Whether a second generation fits: the estimate and the memory available, in bytes."""

    needs: int | None  # estimate() of the serving generation
    margin_percent: float
    mem_available: int | None
    cgroup: str | None  # the cgroup's folder, if it has a memory controller (not the root)
    limit: int | None  # the tightest memory limit on the cgroup's way up, if any
    in_use: int | None  # that level's working set
    oom_kills: int | None = None  # the cgroup's OOM kill counter when measured

    @property
    def required(self) -> int | None:
        return None if self.needs is None else int(self.needs * (1 + self.margin_percent / 100))

    @property
    def available(self) -> int | None:
        under_limit = None if self.limit is None or self.in_use is None else max(
            0, self.limit - self.in_use)
        known = [size for size in (self.mem_available, under_limit) if size is not None]
        return min(known) if known else None

    @property
    def fits(self) -> bool:
        """False only when both figures are known and the estimate does not fit."""
        required, available = self.required, self.available
        return required is None or available is None or required <= available

    @property
    def headroom(self) -> int | None:
        required, available = self.required, self.available
        return None if required is None or available is None else available - required

    def limit_text(self) -> str:
        if self.limit is None:
            return "no cgroup limit"
        return f"limit {human(self.limit)}, {human(self.in_use)} in use"

    def describe(self) -> str:
        return (f"needs ~{human(self.required)} (the serving generation's {human(self.needs)} "
                f"+ {self.margin_percent:g}%), {human(self.available)} available "
                f"(MemAvailable {human(self.mem_available)}; {self.limit_text()})")

    def to_json(self) -> dict:
        return {**asdict(self), "required": self.required, "available": self.available,
                "headroom": self.headroom, "fits": self.fits}


def measure(master: int, workers: list[int], margin_percent: float) -> Room:
    group = cgroup_of(master)
    limit, in_use = group.tightest() if group else (None, None)
    # At the hierarchy's root the cgroup is the whole machine's: its OOM counter cannot
    # tell our kills from another tenant's, so it only explains a death (seen: another
    # test's OOM kill rolled back a healthy reload); the swap treats it as no cgroup.
    own = group if group and group.path != group.mount else None
    return Room(needs=estimate([master, *workers]), margin_percent=margin_percent,
                mem_available=mem_available(), cgroup=str(own.path) if own else None,
                limit=limit, in_use=in_use, oom_kills=oom_kills(master))


def oom_kills(pid: int) -> int | None:
    """OOM kills so far in the memory cgroup of `pid`; without one, on the whole machine
    (/proc/vmstat); None if neither is readable."""
    group = cgroup_of(pid)
    counted = group.oom_kills() if group else None
    return counted if counted is not None else _keyed(Path("/proc/vmstat")).get("oom_kill")


# -- oom_score_adj ------------------------------------------------------------------------------
def score(pid: int) -> int | None:
    return _read_int(Path(f"/proc/{pid}/oom_score_adj"))


def remember_normal_score(run_dir: Path) -> int | None:
    """Record this process's oom_score_adj (the one uWSGI inherits) in the run dir: the value
    a generation returns to once it serves. Unprivileged, a process may lower its score only
    down to the last value a privileged writer set (systemd's OOMScoreAdjust=): this one."""
    normal = score(os.getpid())
    if normal is not None:
        (run_dir / NORMAL_SCORE_NAME).write_text(f"{normal}\n")
    return normal


def settle(run_dir: Path, master: int) -> str:
    """Bring generation `master` back to the service's normal oom_score_adj: the master first
    (a worker forked from now on inherits it), then its workers. Never raises (the accepting
    hook calls it just before the commit point); returns what it did, for the log."""
    normal = _read_int(run_dir / NORMAL_SCORE_NAME)
    if normal is None:
        normal = 0  # started without `hotswap start`: the kernel's default
    failed = []
    pids = [master, *procs.children(master)]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/oom_score_adj", "w") as handle:
                handle.write(str(normal))
        except OSError as exc:
            failed.append(f"{pid} ({exc.strerror})")
    done = f"oom_score_adj {normal} for master {master} and {len(pids) - 1} workers"
    return done + (f"; could not set it for {', '.join(failed)}" if failed else "")
