"""Memory sampling for the bench: sum of RSS (and PSS where /proc/PID/smaps_rollup is
readable) over all of a server's processes, a few times a second.

Which processes belong to a server is the mode's business (Mode.pids()); the helpers here
find them by session id and by parentage, since every server the bench starts runs in a
session of its own (its masters may re-fork or re-exec and get re-parented, but none of
them calls setsid).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class Sample:
    t: float  # time.time()
    processes: int
    rss_kb: int
    pss_kb: int | None  # None when smaps_rollup was unreadable for any process
    foreign_cores: float | None = None  # CPU used by processes that are not the bench's


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            raw = handle.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    rest = raw[raw.rfind(")") + 2:].split()
    return rest  # rest[0] = state, rest[1] = ppid, rest[2] = pgrp, rest[3] = session


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, state) for every live process."""
    return {pid: (ppid, sid, state) for pid, (ppid, sid, state, _) in cpu_table().items()}


def cpu_table() -> dict[int, tuple[int, int, str, int]]:
    """pid -> (ppid, session id, state, utime + stime in clock ticks) for every process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None or len(fields) < 13:
            continue
        table[int(name)] = (int(fields[1]), int(fields[3]), fields[0],
                            int(fields[11]) + int(fields[12]))
    return table


def descendants(table: dict[int, tuple], roots: Iterable[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, row in table.items():
        children.setdefault(row[0], []).append(pid)
    found = set(roots)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


class ForeignCpu:
    """CPU used by everything on the machine except the bench (this process and its
    descendants) and the server under test, between two calls: a busy neighbour (a test
    suite, a build) skews every figure, so the bench records it. Kernel threads are left
    out (their work is mostly the bench's own I/O)."""

    def __init__(self) -> None:
        self.last: dict[int, int] | None = None
        self.last_t = 0.0

    def __call__(self, ours: Iterable[int], sessions: Iterable[int] = ()) -> float | None:
        table = cpu_table()
        now = time.monotonic()
        sessions = set(sessions)
        mine = descendants(table, [os.getpid(), *ours,
                                   *(p for p, row in table.items() if row[1] in sessions)])
        # zombies are left out too: their whole lifetime's CPU would show up at once
        ticks = {pid: row[3] for pid, row in table.items()
                 if pid not in mine and pid != 2 and row[0] != 2 and row[2] not in ("Z", "X")}
        result = None
        if self.last is not None and now > self.last_t:
            used = sum(t - self.last.get(pid, 0) for pid, t in ticks.items())
            result = round(max(0, used) / CLOCK_TICKS / (now - self.last_t), 2)
        self.last, self.last_t = ticks, now
        return result


def server_pids(sessions: Iterable[int] = (), roots: Iterable[int] = ()) -> list[int]:
    """Live (non-zombie) processes in any of `sessions`, plus `roots` and their descendants."""
    sessions = {s for s in sessions if s > 0}
    roots = {r for r in roots if r > 0}
    table = process_table()
    in_sessions = {pid for pid, (_, sid, _) in table.items() if sid in sessions}
    found = descendants(table, in_sessions | {r for r in roots if r in table})
    return sorted(pid for pid in found if table.get(pid, (0, 0, "Z"))[2] not in ("Z", "X"))


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return None


class Gone(Exception):
    """The process exited while being measured."""


def pss_kb(pid: int) -> int | None:
    """PSS in kB; None when smaps_rollup is not readable (permissions, old kernel); raises
    Gone when the process exited (or is a zombie: its smaps_rollup is empty)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise Gone from exc
    except (OSError, ValueError):
        return None
    raise Gone


def measure(pids: Iterable[int]) -> Sample:
    total_rss, total_pss, count, pss_ok = 0, 0, 0, True
    for pid in pids:
        rss = rss_kb(pid)
        if rss is None:  # exited between listing and reading
            continue
        try:
            pss = pss_kb(pid)
        except Gone:
            continue
        count += 1
        total_rss += rss
        if pss is None:
            pss_ok = False
        else:
            total_pss += pss
    return Sample(time.time(), count, total_rss, total_pss if pss_ok else None)


class MemorySampler:
    """Samples measure(pids_fn()) every `interval` seconds in a daemon thread."""

    def __init__(self, pids_fn: Callable[[], Iterable[int]], interval: float = 0.2,
                 foreign_every: int = 5,
                 sessions_fn: Callable[[], Iterable[int]] = tuple) -> None:
        self.pids_fn = pids_fn
        self.sessions_fn = sessions_fn
        self.interval = interval
        self.foreign_every = foreign_every  # samples between two foreign-CPU readings
        self.foreign = ForeignCpu()
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="memory-sampler")

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                pids = self.pids_fn()
                sample = measure(pids)
                if n % self.foreign_every == 0:
                    sample = Sample(sample.t, sample.processes, sample.rss_kb, sample.pss_kb,
                                    self.foreign(pids, self.sessions_fn()))
            except Exception:  # noqa: BLE001 - a failed sample must not end the bench
                sample = None
            n += 1
            if sample is not None and sample.processes:
                self.samples.append(sample)
            self._stop.wait(self.interval)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(timeout=10)
        return list(self.samples)
