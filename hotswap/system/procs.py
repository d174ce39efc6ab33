"""Process facts from /proc, and the one polling helper every wait in the kit uses."""

from __future__ import annotations

import os
import platform
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T],
    timeout: float,
    interval: float = 0.02,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T | None:
    """Call `probe` until it returns something truthy or `timeout` seconds pass.

    Returns the truthy value, or None at the deadline. The probe always runs at least once
    and once more at the deadline, so a zero timeout still checks. `clock` and `sleep` are
    injectable: the reload machine passes its host's, so its unit tests run on a fake clock.
    """
    deadline = clock() + timeout
    while True:
        value = probe()
        if value:
            return value
        remaining = deadline - clock()
        if remaining <= 0:
            value = probe()
            return value or None
        sleep(min(interval, remaining))


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str  # R, S, D, Z, ...
    ppid: int
    pgrp: int
    session: int


def stat(pid: int) -> ProcStat | None:
    """The /proc/PID/stat fields we use, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            raw = handle.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: the fields start after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return ProcStat(pid, fields[0], int(fields[1]), int(fields[2]), int(fields[3]))


def start_ticks(pid: int) -> int | None:
    """When pid began, in clock ticks since boot (/proc/PID/stat's starttime), or None if
    there is no such process: with the pid, it names one process even after the pid is
    reused."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            raw = handle.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(raw[raw.rindex(")") + 2:].split()[19])


def started_at(pid: int) -> float | None:
    """When pid began, on the wall clock (time.time()), to the kernel's clock tick (10 ms);
    None if there is no such process. starttime counts from boot on CLOCK_BOOTTIME."""
    ticks = start_ticks(pid)
    if ticks is None:
        return None
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def alive(pid: int | None) -> bool:
    """True if pid names a process that has not exited (zombies count as exited)."""
    if not pid or pid <= 0:
        return False
    info = stat(pid)
    return info is not None and info.state != "Z"


PF_EXITING = 0x4  # include/linux/sched.h: the process is in its exit


def exiting(pid: int) -> bool:
    """True while pid is being torn down by the kernel (after a SIGKILL, say): it may still
    hold its locks and files for a moment, though it will never run again."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            raw = handle.read()
    except OSError:
        return False
    fields = raw[raw.rindex(")") + 2 :].split()
    return bool(int(fields[6]) & PF_EXITING)


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def children(pid: int) -> list[int]:
    """Live (non-zombie) children of pid."""
    return [
        p for p in all_pids() if (info := stat(p)) and info.ppid == pid and info.state != "Z"
    ]


def descendants(pid: int) -> list[int]:
    """Every process below pid, parents before children."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        kids = [p for parent in frontier for p in children(parent)]
        found.extend(kids)
        frontier = kids
    return found


def wait_gone(pids: list[int], timeout: float) -> bool:
    """True once none of `pids` is alive (zombies count as gone), False at the deadline."""
    return bool(wait_until(lambda: not any(alive(p) for p in pids), timeout, interval=0.05))


def signal_quietly(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


# How /proc names a descriptor whose file was unlinked (or renamed over) since it was opened.
DELETED = " (deleted)"


def held_fd(pid: int, path: os.PathLike | str) -> tuple[int, bool] | None:
    """(fd, detached) if pid holds `path` open: detached when the file it holds is no longer
    at that path (removed, or replaced by another file), so /proc says "PATH (deleted)".
    None if it does not hold it (or is gone, or not ours to see)."""
    wanted = os.path.abspath(path)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    found = None
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link == wanted:
            return int(fd), False
        if link == wanted + DELETED:
            found = (int(fd), True)
    return found


def holds_open(pid: int, path: os.PathLike | str) -> bool:
    """True if pid holds `path` open, even if that path was since removed or replaced: a
    master still reads its FIFO after an operator's `rm`, and is still this instance's."""
    return held_fd(pid, path) is not None


def writers(path: os.PathLike | str) -> list[int]:
    """Processes holding `path`, or for a folder a file under it, open for writing (of those
    this user may see in /proc): a drop-folder entry with a writer is not complete yet."""
    wanted = os.path.abspath(path)
    below = os.path.join(wanted, "")
    found = []
    for pid in all_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (link == wanted or link.startswith(below)) and _writable(pid, fd):
                found.append(pid)
                break
    return found


def _writable(pid: int, fd: str) -> bool:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as handle:
            flags = next((line.split()[1] for line in handle if line.startswith("flags:")), "0")
    except (OSError, IndexError):
        return False
    return (int(flags, 8) & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)


def ancestor_below(pid: int, top: int, levels: int = 3) -> int | None:
    """The ancestor of pid (or pid itself) whose parent is `top`, within `levels` steps:
    for a hook process, the uWSGI worker of master `top` that runs it."""
    for _ in range(levels + 1):
        info = stat(pid)
        if info is None:
            return None
        if info.ppid == top:
            return pid
        pid = info.ppid
    return None


# x86_64's poll and ppoll: uWSGI's suspended worker waits in poll(NULL, 0, 10000)
_POLL_SYSCALLS = {"7", "271"} if platform.machine() == "x86_64" else set()


def suspended(pid: int) -> bool | None:
    """True if pid waits in poll() on no descriptor at all: where a uWSGI worker sits while
    suspended ("p"), at the top of its loop, holding no connection (core/utils.c). Exact,
    unlike parked_in_poll (a request polling a socket looks the same there). None when
    /proc/PID/syscall cannot tell: another architecture, or ptrace rules (Yama) deny it."""
    if not _POLL_SYSCALLS:
        return None
    try:
        with open(f"/proc/{pid}/syscall") as handle:
            fields = handle.read().split()
    except OSError:
        return None
    if len(fields) < 3:
        return False  # "running", or "-1 ..." (not in a system call)
    return fields[0] in _POLL_SYSCALLS and int(fields[1], 16) == 0 and int(fields[2], 16) == 0


def worker_initialised(pid: int) -> bool:
    """True once a uWSGI worker runs its own signal handlers: it catches SIGUSR2, the last
    handler uWSGI's worker init installs (core/uwsgi.c) and one its master does not catch.
    Until then a just-forked worker still runs its master's: a SIGTSTP there is the master's
    pause toggle (suspend_resume_them_all), run in the child. Found by the chaos soak: a
    nudge that landed between a respawn's fork() and its own signal() toggled the whole
    instance's pause over and over and left that child spinning in the handler for good."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGUSR2 - 1) & 1)
    except (OSError, ValueError, IndexError):
        return False
    return False


def parked_in_poll(pid: int) -> bool:
    """True if pid sleeps in poll(): where a suspended uWSGI worker waits for its resume
    (`poll(NULL, 0, 10000)`); an idle one waits in epoll or on the accept lock instead.
    /proc/PID/wchan needs no privilege and no log line, which a rotation can hide."""
    try:
        with open(f"/proc/{pid}/wchan") as handle:
            where = handle.read()
    except OSError:
        return False
    return where.startswith(("poll_schedule_timeout", "do_sys_poll"))


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def _tcp_address(hex_address: str) -> str:
    """/proc/net/tcp{,6}'s "0100007F:1F90" as "127.0.0.1:8080" ("[::1]:8080" for v6): the
    address is in 32-bit words of host byte order."""
    host, port = hex_address.split(":")
    raw = b"".join(int(host[i:i + 8], 16).to_bytes(4, sys.byteorder)
                   for i in range(0, len(host), 8))
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw)}:{int(port, 16)}"
    return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{int(port, 16)}"


def tcp_listeners(pid: int) -> set[str]:
    """The host:port of every listening TCP socket pid holds (/proc/net/tcp and tcp6)."""
    inodes = _socket_inodes(pid)
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                rows = [line.split() for line in handle.readlines()[1:]]
        except OSError:
            continue
        found |= {_tcp_address(row[1]) for row in rows
                  if len(row) >= 10 and row[3] == "0A" and row[9] in inodes}  # 0A: LISTEN
    return found


def unix_sockets(pid: int) -> set[str]:
    """The paths of the bound unix sockets pid holds (from /proc/net/unix, by inode)."""
    inodes = _socket_inodes(pid)
    if not inodes:
        return set()
    try:
        with open("/proc/net/unix") as handle:
            rows = [line.split() for line in handle.readlines()[1:]]
    except OSError:
        return set()
    return {row[7] for row in rows if len(row) >= 8 and row[6] in inodes}


def environ(pid: int) -> dict[str, str]:
    """The environment pid started with ({} if unreadable: gone, or another user's)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def session_leaders_below(pid: int) -> list[int]:
    """Live children of pid that lead their own session: for a uWSGI master, the masters it
    re-forked ("f" calls setsid() in the child), as opposed to its workers."""
    return [child for child in children(pid) if (info := stat(child)) and info.session == child]


def read_pidfile(path: os.PathLike | str) -> int | None:
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() else None
