"""The chaos soak's rig: one isolated instance, the CLI runs it watches, and the faults it
lands (bench/chaos.py draws which and when).

Everything here is real: `hotswap start --supervise` in a temp folder (its own socket,
FIFOs, log), `hotswap reload` as a subprocess whose phase lines are read as it prints them,
signals sent by pid. Nothing is stopped by name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import chaos_squeeze
from bench.bench import LoadProcess
from hotswap.swap import probe
from hotswap.system import procs
from scripts.gen_resource import write_resource

REPO = Path(__file__).resolve().parents[1]
TERMS = 50_000  # the tests' size: an import of about a second, so a swap is a few seconds
START_TIMEOUT = 120.0
ANSWER_BOUND = 10.0  # after each swap, some generation answers /healthz within this


class RigError(RuntimeError):
    pass


@dataclass
class Run:
    """One `hotswap reload` as it happened."""

    argv: list[str]
    started: float  # time.time()
    code: int | None = None
    ended: float | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def first_error(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.startswith("hotswap:")]
        return lines[0] if lines else ""


class Cli:
    """A background `hotswap reload`: its lines as printed (with the time each arrived)."""

    def __init__(self, instance: Instance, *args: str) -> None:
        argv = [sys.executable, "-m", "hotswap", "--ini", str(instance.ini), *args]
        self.run = Run(argv, time.time())
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=instance.root, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.lines: list[tuple[float, str]] = []
        self._err: list[str] = []
        self._threads = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read_out(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.time(), line))

    def _read_err(self) -> None:
        self._err.extend(self.process.stderr)

    def phase(self) -> str:
        """The phase of the last line printed ("" before the first): where a fault landed."""
        for _, line in reversed(self.lines):
            if line.lstrip().startswith("[") and "]" in line:
                words = line.split("]", 1)[1].split()
                if words:
                    return words[0]
        return "starting"

    def finish(self, timeout: float) -> Run:
        try:
            self.run.code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.run.code = self.process.wait(timeout=30)
            self._err.append(f"chaos: reload still running after {timeout:g}s: killed\n")
        self.run.ended = time.time()
        for thread in self._threads:
            thread.join(timeout=10)
        self.run.stdout = "".join(line for _, line in self.lines)
        self.run.stderr = "".join(self._err)
        return self.run


class Instance:
    """srv.py + srv.ini copied into a temp folder, served by `hotswap start --supervise`."""

    def __init__(self, keep: bool = False, terms: int = TERMS, small_disk: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hotswap-chaos-"))
        self.keep = keep
        self.terms = terms
        shutil.copy(REPO / "srv.py", self.root / "srv.py")
        shutil.copy(REPO / "srv.ini", self.root / "srv.ini")
        self.ini = self.root / "srv.ini"
        self.run_dir = self.root / "run"
        self.socket = self.run_dir / "http.sock"
        self.supervisor: subprocess.Popen | None = None
        self.seen: set[int] = set()  # every pid of the instance we met, stopped at the end
        # the "disk full" fault's small disk for the run dir, the "new master OOM" one's cgroups
        self.disk = chaos_squeeze.RunDirDisk(self.run_dir) if small_disk else None
        self.traps = chaos_squeeze.OomTrap(f"hotswap-chaos-{os.getpid()}")
        self.release("v0")

    def fill(self) -> int:
        if self.disk is None:
            raise RigError("the disk full fault needs Instance(small_disk=True)")
        return self.disk.fill()

    def trap(self, pid: int) -> str:
        return self.traps.trap(pid)

    def settle(self) -> None:
        """After a swap: free the filled disk, lift and remove the OOM traps."""
        if self.disk:
            self.disk.free()
        self.traps.release()

    def release(self, version: str) -> None:
        write_resource(str(self.root / "data" / "terms.tsv"), self.terms, seed=7,
                       version=version)

    def sample_paths(self, count: int = 40) -> list[str]:
        with open(self.root / "data" / "terms.tsv") as handle:
            next(handle)
            terms = [line.split("\t")[0] for _, line in zip(range(count), handle, strict=False)]
        return ["/healthz", *(f"/lookup?q={term}" for term in terms)]

    def start(self) -> dict:
        self.supervisor = subprocess.Popen(
            [sys.executable, "-m", "hotswap", "--ini", str(self.ini), "start", "--supervise"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.root,
            env=dict(os.environ, SRV_MODE="heap"), start_new_session=True)
        health = procs.wait_until(self._ready, START_TIMEOUT, interval=0.05)
        if not health:
            raise RigError(f"the instance did not start; log:\n{self.log_tail()}")
        return health

    def _ready(self) -> dict | None:
        if not (self.run_dir / "handover.json").exists():
            return None
        return probe.from_master(self.health(2.0), procs.read_pidfile(self.run_dir /
                                                                     "master.pid"))

    def health(self, timeout: float = 5.0) -> dict | None:
        answer = probe.healthz(self.socket, timeout=timeout)
        if answer:
            self.seen.add(answer["master_pid"])
        return answer

    def answers_within(self, bound: float = ANSWER_BOUND) -> dict | None:
        return procs.wait_until(lambda: self.health(2.0), bound, interval=0.05)

    def handover(self) -> dict:
        try:
            return json.loads((self.run_dir / "handover.json").read_text())
        except (OSError, ValueError):
            return {}

    def reload(self, *args: str) -> Cli:
        return Cli(self, "reload", *args)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.root / "log" / "uwsgi.log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> list[int]:
        roots = set(self.seen)
        if self.supervisor:
            roots.add(self.supervisor.pid)
        master = procs.read_pidfile(self.run_dir / "master.pid")
        if master:
            roots.add(master)
        found = set()
        for pid in roots:
            if procs.alive(pid):
                found.add(pid)
                found.update(procs.descendants(pid))
        return sorted(found)

    def stop(self) -> None:
        if self.supervisor and self.supervisor.poll() is None:
            os.kill(self.supervisor.pid, signal.SIGTERM)
            try:
                self.supervisor.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(3):
            doomed = self.pids()
            for pid in doomed:
                procs.signal_quietly(pid, signal.SIGKILL)
            procs.wait_gone(doomed, 10)
        if self.supervisor and self.supervisor.poll() is None:
            self.supervisor.kill()
            self.supervisor.wait(timeout=10)
        self.traps.release()
        if self.disk:
            self.disk.unmount()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


class Load(LoadProcess):
    """bench.bench's load process, given the time a loaded machine needs to stop it: 64
    threads joined and a few hundred thousand records written can take minutes there (the
    bench's 60 s once cost a whole segment of records)."""

    STOP_SECONDS = 900.0

    def stop(self) -> list[dict]:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=self.STOP_SECONDS)
        if self.proc.returncode != 0 or not os.path.exists(self.out):
            raise RigError(f"load client failed (exit {self.proc.returncode}): {err[-1000:]}")
        with open(self.out) as handle:
            return [json.loads(line) for line in handle]


# -- faults -----------------------------------------------------------------------------------
# Two faults are no signal: the run dir's disk filling up (a filler file on the run dir's own
# small tmpfs, freed once the reload exited), and the new master moved, while it loads, into
# a memory cgroup of its own whose limit is below what its import needs (the kernel's OOM
# killer takes it, or the first of its processes to allocate).
FILL = "fill"
OOM = "oom"
# Each fault is (target, signal or one of those two). Targets: the reload CLI; the accepting
# hook that performs the hand-over; the new master while it loads; a worker of the old
# generation, or of the new one once it serves (a request in flight in a worker killed dies
# with it: counted as killed by the fault, not lost by the kit); the run dir. A SIGSTOP is
# followed by SIGCONT STOP_SECONDS later.
FAULTS = {
    "cli SIGTERM": ("cli", signal.SIGTERM),
    "cli SIGINT": ("cli", signal.SIGINT),
    "cli SIGKILL": ("cli", signal.SIGKILL),
    "cli SIGSTOP": ("cli", signal.SIGSTOP),
    "hook SIGKILL": ("hook", signal.SIGKILL),
    "hook SIGSTOP": ("hook", signal.SIGSTOP),
    "new master SIGKILL": ("new master", signal.SIGKILL),
    "new master SIGSTOP": ("new master", signal.SIGSTOP),
    "new master OOM": ("new master", OOM),
    "old worker SIGKILL": ("old worker", signal.SIGKILL),
    "old worker SIGTERM": ("old worker", signal.SIGTERM),
    "old worker SIGSTOP": ("old worker", signal.SIGSTOP),
    "new worker SIGKILL": ("new worker", signal.SIGKILL),
    "new worker SIGTERM": ("new worker", signal.SIGTERM),
    "new worker SIGSTOP": ("new worker", signal.SIGSTOP),
    "disk full": ("run dir", FILL),
}
# Faults whose target may be inside a request when it dies: a request in flight at that
# moment is the fault's, not a loss of the kit's.
KILLS_REQUESTS = {"old worker SIGKILL", "new worker SIGKILL", "old worker SIGTERM",
                  "new worker SIGTERM"}
STOP_SECONDS = 2.0  # a SIGSTOPped CLI is continued this long after
# A signal that reached the CLI before its first line (cli.py installs its handlers there,
# hotswap/system/early.py) met the interpreter's defaults: it dies of it having run nothing
# of the kit's. The soak checks that nothing changed, and counts such swaps apart.
STARTUP = "interpreter-startup"


@dataclass
class Landed:
    """Where and when a fault landed (None: its target never appeared)."""

    fault: str
    at: float | None = None  # time.time()
    pid: int | None = None
    phase: str = ""
    note: str = ""


def land(fault: str, delay: float, cli: Cli, instance: Instance, old_master: int,
         budget: float = 60.0) -> Landed:
    """Wait `delay` seconds into the reload (measured from the target's appearance for a
    hook or new master), then land the fault on its target."""
    target, action = FAULTS[fault]
    landed = Landed(fault)
    if target in ("cli", "run dir"):
        pid = cli.process.pid if _sleep_while_running(cli, delay) else None
    elif target == "old worker":
        workers = _workers(old_master) if _sleep_while_running(cli, delay) else []
        pid = workers[0] if workers else None
    elif target == "new worker":
        # a worker of the generation that took over: its moment counts from the commit,
        # whether or not the reload has exited by then (it often has: the moment is 0-1 s)
        pid = procs.wait_until(lambda: _new_worker(instance, old_master, cli), budget,
                               interval=0.002)
        if pid and pid > 0:
            time.sleep(delay)  # the fault's random moment, not a wait for a condition
        else:
            pid = None
    else:
        pid = procs.wait_until(lambda: _target_pid(target, instance, old_master, cli),
                               budget, interval=0.002)
        if not pid or pid < 0 or not _sleep_while_running(cli, delay):
            pid = None
    if not pid or (target != "new worker" and cli.process.poll() is not None):
        landed.note = f"no {target} to hit (the reload was done or it never appeared)"
        return landed
    if target == "new master" and _committed(instance, pid):
        # then it is the serving master: killing it is an outage of the fault's own making
        landed.note = "the new master had committed before the moment: not hit"
        return landed
    landed.phase = cli.phase()
    if target == "cli" and not catches(pid, signal.SIGTERM):
        landed.phase = STARTUP  # no handler of the kit's yet: the interpreter's defaults
    landed.pid, landed.at = pid, time.time()
    if action == FILL:
        landed.pid = None  # no process was hit
        landed.note = f"filled the run dir ({instance.fill()} bytes)"
    elif action == OOM:
        landed.note = instance.trap(pid) or f"master {pid} in a cgroup limited to " \
            f"{chaos_squeeze.OOM_LIMIT >> 20} MiB"
    else:
        procs.signal_quietly(pid, action)
    if action == signal.SIGSTOP:
        time.sleep(STOP_SECONDS)  # the fault is the stop's length: a pause, not a poll
        procs.signal_quietly(pid, signal.SIGCONT)
    return landed


def catches(pid: int, signum: int) -> bool:
    """True if pid has a handler for signum (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            caught = next(line for line in handle if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) & (1 << (signum - 1)))


def _committed(instance: Instance, master: int) -> bool:
    record = instance.handover()
    return record.get("master_pid") == master and record.get("state") in (
        "committed", "retire-sent", "done")


def _sleep_while_running(cli: Cli, delay: float) -> bool:
    """True if the reload still runs after `delay` seconds (the fault's random moment)."""
    return not procs.wait_until(lambda: cli.process.poll() is not None, delay, interval=0.005)


def _workers(master: int) -> list[int]:
    """A master's workers: its children but the master it re-forked (a child too, leading
    its own session). Found by the every-class soak: late in a swap, when the old workers
    had gone, `old worker SIGKILL` hit the new master that by then served: an outage the
    rig caused, not the kit."""
    reforked = set(procs.session_leaders_below(master))
    return [pid for pid in procs.children(master) if pid not in reforked]


def _new_worker(instance: Instance, old_master: int, cli: Cli) -> int | None:
    """A worker of the new generation once it committed (-1: the reload ended without)."""
    record = instance.handover()
    if record.get("master_pid") not in (None, old_master) and record.get("state") in (
            "committed", "retire-sent", "done"):
        workers = _workers(record["master_pid"])
        return workers[0] if workers else None
    return -1 if cli.process.poll() is not None else None


def _target_pid(target: str, instance: Instance, old_master: int, cli: Cli) -> int | None:
    if cli.process.poll() is not None:
        return -1  # stop waiting: nothing to hit
    if target == "new master":
        reforked = procs.session_leaders_below(old_master)
        return reforked[0] if reforked else None
    record = instance.handover()  # the hook: the performer of the new master's hand-over
    if record.get("master_pid") not in (None, old_master) and record.get("performer_pid") \
            and record.get("state") not in ("committed", "retire-sent", "done", "aborted"):
        return record["performer_pid"]
    return None
