"""A fake Host (hotswap/swap/host.py) for the reload machine's unit tests: a fake clock, one old
master (100) with four workers, and a new generation (200) whose hook follows a scripted plan.

It models only what the machine can observe, the way uWSGI behaves:
- "1f" on the live FIFO parks the old master on the standby FIFO and forks master 200;
- the hook's plan writes the hand-over record at given times; reaching COMMITTED means the
  hook wrote "q" (the old master drains for `drain_seconds`, then exits), unless the plan says
  the hook could not;
- "p" toggles the old workers' pause, "0" moves the old master back to the live FIFO, "q"
  retires it; a killed generation stops its plan (its hook dies with it).
Every FIFO command, notification and kill is recorded in `events`, in order, for assertions.
"""

from __future__ import annotations

from collections.abc import Callable

from hotswap.protocol import fifo
from hotswap.protocol.record import Handover, State
from hotswap.swap.host import Detached, Masters, Slot
from hotswap.system import memory

OLD, NEW = 100, 200
OLD_WORKERS = [101, 102, 103, 104]

# The hook's steps of a good hand-over, as (seconds after "1f", state).
GOOD_PLAN = [(0.5, State.STARTED), (0.51, State.NOTIFYING), (0.52, State.NOTIFIED),
             (0.53, State.PAUSED),
             (0.55, State.COMMITTED), (0.551, State.RETIRE_SENT), (0.552, State.DONE)]


class FakeHost:
    def __init__(self, plan: list[tuple[float, State]] | None = None,
                 drain_seconds: float = 0.2) -> None:
        self.t = 0.0
        self.plan = GOOD_PLAN if plan is None else plan
        self.drain_seconds = drain_seconds
        self.alive_pids = {OLD, *OLD_WORKERS}
        self.stopped_pids: set[int] = set()  # kill -STOP
        self.slot: dict[int, Slot] = {OLD: Slot.LIVE}  # which FIFO each master reads
        self.record: Handover | None = Handover(master_pid=OLD, state=State.DONE)
        self.paused = False
        self.log = b""
        self.events: list[tuple] = []
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.new = NEW
        self.forks = 0
        self.q_fails = False  # the hook cannot write "q" (its FIFO write fails)
        self.systemd = False  # whether notify() reaches a systemd
        self.lost: list[Detached] = []  # FIFOs whose path was removed under their master
        self.reattach_error: OSError | None = None
        self.drift: list[str] = []  # what config_drift() reports
        # memory: what the serving generation holds, what is free, the cgroup's OOM counter
        self.generation_bytes = 100 * memory.MIB
        self.available_bytes = 1000 * memory.MIB
        self.oom_count: int | None = 0
        self.cgroup: str | None = "/fake"  # None: the counter is the machine's (/proc/vmstat)
        # workers uWSGI respawned, pid -> (master, birth on the fake clock); parked ones never
        # exit by themselves, and their master does not exit while one lives (the soak's hang)
        self.run_dir_free: int | None = 10**9  # bytes free in the run dir
        self.respawned: dict[int, tuple[int, float]] = {}
        self.parked_pids: set[int] = set()

    # -- the fake world ------------------------------------------------------------------
    def at(self, when: float, action: Callable[[], None]) -> None:
        self.timers.append((when, action))

    def _run_timers(self) -> None:
        due = sorted((t, a) for t, a in self.timers if t <= self.t)
        self.timers = [(t, a) for t, a in self.timers if t > self.t]
        for _, action in due:
            action()

    def _hook_writes(self, state: State) -> None:
        if self.new not in self.alive_pids:
            return
        if state is State.STARTED:
            self.record = Handover(master_pid=self.new, state=state, retiring_pid=OLD,
                                   generation="v2", performer_pid=201)
            return
        current = self.record
        if current and current.master_pid == self.new and current.state is State.ABORTED:
            return  # the hook lost the race: it stops
        if state is State.PAUSED:
            self.paused = not self.paused
        if state is State.NOTIFYING and self.systemd:
            self.events.append(("notify", f"MAINPID={self.new}"))
        paused_at = self.t if state is State.PAUSED else self.record.paused_at
        self.record = self.record.to(state, paused_at=paused_at, notified_systemd=self.systemd
                                     and state not in (State.STARTED, State.NOTIFYING))
        if state is State.COMMITTED and not self.q_fails:
            self._quit(OLD)

    def _quit(self, master: int) -> None:
        self.events.append(("quit", master))
        self.at(self.t + self.drain_seconds, lambda: self._exit(master))

    def _exit(self, master: int) -> None:
        if self._respawned_of(master):
            self.at(self.t + 0.1, lambda: self._exit(master))  # waits for its stranded one
            return
        self.alive_pids -= {master, *(OLD_WORKERS if master == OLD else []),
                            *self._respawned_of(master)}
        self.slot.pop(master, None)

    def _fork(self) -> None:
        self.new = NEW + 10 * self.forks  # the first fork is NEW
        self.forks += 1
        self.alive_pids.add(self.new)
        self.slot[OLD] = Slot.STANDBY
        self.slot[self.new] = Slot.LIVE
        self.log += b"new master copy spawned with pid %d\n" % self.new
        start = self.t
        for delay, state in self.plan:
            self.at(start + delay, lambda s=state: self._hook_writes(s))

    def serving(self) -> int | None:
        """Whose workers accept: the new generation once committed, else the old one unless
        paused."""
        if self.record and self.record.master_pid == self.new and self.record.committed \
                and self.new in self.alive_pids:
            return self.new
        return OLD if OLD in self.alive_pids and not self.paused else None

    # -- Host ----------------------------------------------------------------------------
    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(seconds, 0.001)
        self._run_timers()

    def masters(self) -> Masters:
        live = [m for m, s in self.slot.items() if s is Slot.LIVE and m in self.alive_pids]
        parked = [m for m, s in self.slot.items() if s is Slot.STANDBY and m in self.alive_pids]
        committed = self.record and self.record.committed and self.record.master_pid
        loading = [m for m in self.reforked_below(OLD) if m != committed]
        serving = [m for m in live if m not in loading]
        return Masters(serving[0] if serving else None, parked[0] if parked else None, loading)

    def alive(self, pid: int | None) -> bool:
        return pid in self.alive_pids

    def stopped(self, pid: int) -> bool:
        return pid in self.stopped_pids

    def reforked_below(self, master: int) -> list[int]:
        return [self.new] if master == OLD and OLD in self.alive_pids and \
            self.new in self.alive_pids else []

    def workers_of(self, master: int) -> list[int]:
        return [w for w in OLD_WORKERS if w in self.alive_pids and master == OLD] + \
            self._respawned_of(master)

    def _respawned_of(self, master: int) -> list[int]:
        return [w for w, (m, _) in self.respawned.items() if m == master and w in self.alive_pids]

    def respawn(self, pid: int, parked: bool, master: int = OLD) -> None:
        """uWSGI respawns a worker of `master` now (a SIGKILLed one), parked or not."""
        self.respawned[pid] = (master, self.t)
        self.alive_pids.add(pid)
        if parked:
            self.parked_pids.add(pid)

    def stranded_workers(self, master: int, paused_at: float) -> list[int]:
        return [w for w in self._respawned_of(master)
                if self.respawned[w][1] > paused_at and w in self.parked_pids]

    def signal(self, pid: int, sig: int) -> None:
        self.events.append(("signal", pid, sig))
        if sig == 9 and pid in self.respawned:
            self.alive_pids.discard(pid)

    def kill_generations(self, masters: list[int]) -> None:
        self.events.append(("kill", tuple(masters)))
        self.alive_pids -= set(masters)
        for master in masters:
            self.slot.pop(master, None)

    def send(self, slot: Slot, commands: str) -> None:
        readers = [m for m, s in self.slot.items() if s is slot and m in self.alive_pids]
        if not readers:
            raise fifo.NoReader(6, f"no master is reading the {slot.value} FIFO")
        self.events.append(("send", slot.value, commands))
        master = readers[0]
        if commands == "1f":
            self._fork()
        elif commands == "p":
            self.paused = not self.paused
        elif commands == "q":
            self._quit(master)
        elif commands == "0" and not any(s is Slot.LIVE and m in self.alive_pids
                                         for m, s in self.slot.items()):
            self.slot[master] = Slot.LIVE

    def holds(self, master: int, slot: Slot) -> bool:
        return self.slot.get(master) is slot and master in self.alive_pids

    def remove_stale(self, slot: Slot) -> bool:
        return False

    def detached(self) -> list[Detached]:
        return list(self.lost)

    def reattach(self, item: Detached) -> None:
        if self.reattach_error:
            raise self.reattach_error
        self.events.append(("reattach", item.slot.value, item.master))
        self.lost.remove(item)

    def config_drift(self, master: int) -> list[str]:
        return list(self.drift)

    def handover(self) -> Handover | None:
        return self.record

    def abort(self, master: int, error: str) -> Handover:
        before = self.record if self.record and self.record.master_pid == master else None
        if before and (before.committed or before.state is State.ABORTED):
            return before
        after = (before.to(State.ABORTED, error=error, aborted_from=before.state) if before
                 else Handover(master_pid=master, state=State.ABORTED, error=error))
        self.record = after
        self.events.append(("abort", master))
        return after

    def freeze(self, master: int) -> None:
        self.events.append(("freeze", master))
        self.timers.clear()  # a stopped hook writes nothing more

    def resume(self, master: int) -> bool:
        self.send(Slot.STANDBY, "p")
        self.record = self.record.to(self.record.state, resumed=True)
        return True

    def record_serving(self, master: int) -> None:
        self.record = Handover(master_pid=master, state=State.DONE)

    def log_mark(self) -> int:
        return len(self.log)

    def log_since(self, mark: int) -> bytes:
        return self.log[mark:]

    def healthz(self, timeout: float) -> dict | None:
        master = self.serving()
        if master is None:
            self.sleep(timeout)  # nobody accepts: the probe times out
            return None
        return {"master_pid": master, "generation": "v1" if master == OLD else "v2"}

    def stats(self) -> dict | None:
        master = self.serving()
        return {"pid": master, "workers": [{"pid": 1, "accepting": 1}]} if master else None

    def notify(self, message: str) -> bool:
        self.events.append(("notify", message.splitlines()[0]))
        return self.systemd

    def write_pidfile(self, master: int) -> None:
        self.events.append(("pidfile", master))

    def memory_room(self, master: int, margin_percent: float) -> memory.Room:
        self.events.append(("memory_room", master))
        return memory.Room(needs=self.generation_bytes, margin_percent=margin_percent,
                           mem_available=self.available_bytes, cgroup=self.cgroup, limit=None,
                           in_use=None, oom_kills=self.oom_count)

    def restore_priority(self, master: int) -> str:
        self.events.append(("priority", master))
        return f"nice 0 for master {master} and 2 workers"

    def run_dir_space(self) -> tuple[str, int | None]:
        return "/fake/run", self.run_dir_free

    def oom_kills(self, master: int) -> int | None:
        return self.oom_count

    def oom_kill(self, pid: int) -> None:
        """The kernel's OOM killer kills `pid` (the counter first, as the kernel does)."""
        self.oom_count = (self.oom_count or 0) + 1
        self.alive_pids.discard(pid)
        self.slot.pop(pid, None)
