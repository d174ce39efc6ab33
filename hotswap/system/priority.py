"""CPU and I/O priority: a generation imports at a low priority while another one serves, and
goes back to the service's own at its hand-over (docs/how-a-swap-works.md, "Priority").

The same three steps as the OOM score (memory.py): `hotswap start` records the service's
own priority in the run dir; every master lowers its own just before it imports the app
(hotswap/inside/loading.py, srv.ini's `import =`), so its workers inherit it; the accepting
hook brings the master, its workers and itself back (settle()) before the old master is told
to quit. A master lowers itself only when it will be allowed to come back: raising one's nice
value needs nothing, lowering it again needs CAP_SYS_NICE or an RLIMIT_NICE that allows the
service's value (systemd: LimitNICE=+0). Otherwise it loads at the service's priority, and
says why, rather than serve at a low one for good.

Nice values and I/O priorities belong to threads: a master is single-threaded while it
imports, and a worker's threads started later inherit what the worker has then.
"""

from __future__ import annotations

import os
import platform
import resource
from dataclasses import dataclass
from pathlib import Path

from . import procs

NORMAL_NAME = "priority"  # run dir file: "<nice> <ioprio>", the service's own
DEFAULT_LOADING_NICE = 10
# ioprio values: class << 13 | level. Best-effort level 7 is the lowest that still gets the
# disk when others use it (the idle class could starve an import on a busy disk).
IOPRIO_CLASS_SHIFT = 13
IOPRIO_BEST_EFFORT_LOWEST = (2 << IOPRIO_CLASS_SHIFT) | 7
IOPRIO_WHO_PROCESS = 1
# (ioprio_set, ioprio_get): no libc wrapper, so the raw syscall (asm-generic numbers on arm64)
IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31)}
CAP_SYS_NICE = 23


@dataclass(frozen=True)
class Priority:
    nice: int
    ioprio: int | None  # None where the syscall is not known here

    def text(self) -> str:
        return f"{self.nice} {self.ioprio if self.ioprio is not None else '-'}\n"


def _syscall(index: int, *args: int) -> int | None:
    numbers = IOPRIO_SYSCALLS.get(platform.machine())
    if numbers is None:
        return None
    import ctypes  # only when a priority changes: not on a worker's import path

    libc = ctypes.CDLL(None, use_errno=True)
    done = libc.syscall(numbers[index], *args)
    if done < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return done


def current(pid: int = 0) -> Priority:
    try:
        ioprio = _syscall(1, IOPRIO_WHO_PROCESS, pid)
    except OSError:
        ioprio = None
    return Priority(os.getpriority(os.PRIO_PROCESS, pid), ioprio)


def apply(pid: int, priority: Priority) -> None:
    """Set `pid`'s nice value and I/O priority (OSError: why not)."""
    os.setpriority(os.PRIO_PROCESS, pid, priority.nice)
    if priority.ioprio is not None:
        _syscall(0, IOPRIO_WHO_PROCESS, pid, priority.ioprio)


def remember_normal(run_dir: Path) -> Priority:
    """Record this process's priority (the one uWSGI inherits): what a generation returns to."""
    normal = current()
    (run_dir / NORMAL_NAME).write_text(normal.text())
    return normal


def normal(run_dir: Path) -> Priority | None:
    try:
        nice, ioprio = (run_dir / NORMAL_NAME).read_text().split()
        return Priority(int(nice), None if ioprio == "-" else int(ioprio))
    except (OSError, ValueError):
        return None  # started without `hotswap start`


def _has_cap_sys_nice() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def why_irreversible(nice: int) -> str | None:
    """Why this process could not come back to `nice` once it raised it (None: it could)."""
    if _has_cap_sys_nice():
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    # RLIMIT_NICE r allows nice values down to 20 - r (setrlimit(2))
    if soft == resource.RLIM_INFINITY or 20 - soft <= nice:
        return None
    return (f"RLIMIT_NICE {soft} would not let it return to nice {nice} (systemd: "
            "LimitNICE=+0; a shell: `ulimit -e 20` as root, or run it as root)")


def lower(run_dir: Path | None, step: int) -> str:
    """Lower this process (a master about to import) by `step` nice levels and to the lowest
    best-effort I/O priority, if it can come back; what it did, for the log. Never raises."""
    try:
        service = (normal(run_dir) if run_dir else None) or current()
        if step <= 0:
            return "loading at the service's priority (hotswap-loading-nice = 0)"
        why_not = why_irreversible(service.nice)
        if why_not:
            return f"loading at the service's priority: {why_not}"
        target = Priority(min(19, service.nice + step),
                          IOPRIO_BEST_EFFORT_LOWEST if service.ioprio is not None else None)
        apply(0, target)
        return (f"loading at nice {target.nice} and I/O best-effort 7; the hand-over "
                f"restores nice {service.nice}")
    except Exception as exc:  # noqa: BLE001 - a priority is no reason to fail an import
        return f"loading at the service's priority: {type(exc).__name__}: {exc}"


def background(step: int = DEFAULT_LOADING_NICE) -> None:
    """Lower this process for good: a child that exits once done (the refresh's validation of
    a store, a full pass over it), so it needs no way back. Never raises."""
    try:
        apply(0, Priority(min(19, current().nice + step), IOPRIO_BEST_EFFORT_LOWEST))
    except Exception:  # noqa: BLE001 - a priority is no reason to fail a validation
        pass


def settle(run_dir: Path, master: int, also: tuple[int, ...] = ()) -> str:
    """Bring generation `master` back to the service's priority: the master first (a worker
    forked from now on inherits it), then its workers, then `also` (the accepting hook, which
    goes on to pause the old workers). Never raises; what it did, for the log."""
    service = normal(run_dir) or Priority(0, None)
    workers = procs.children(master)
    pids = [master, *workers, *also]
    failed = []
    for pid in pids:
        try:
            if current(pid) != service:
                apply(pid, service)
        except OSError as exc:
            failed.append(f"{pid} ({exc.strerror})")
    done = f"nice {service.nice} for master {master} and {len(workers)} workers"
    return done + (f"; could not set it for {', '.join(failed)}" if failed else "")
