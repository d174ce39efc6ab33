"""`hotswap start` as PID 1 of its own PID and mount namespaces: a container's entrypoint,
without a container runtime.

    ns = PidNamespace(service)               # a Service from conftest (its files only)
    ns.start()                               # unshare ... hotswap start; waits for /healthz
    ns.cli("reload")                         # nsenter -t PID1 -m -p hotswap ... (kubectl exec)
    ns.zombies(), ns.pids(), ns.terminate()  # from /proc, by the namespace's PID 1
    ns.kill()                                # SIGKILL PID 1: the kernel ends the namespace

What runs: ``unshare --pid --fork --mount-proc`` (what a runtime does for a container's
PID namespace; --mount-proc gives it a private /proc, so the kit's /proc scans see only the
namespace), whose forked child execs ``hotswap start`` and is PID 1 inside. Pids that the
kit writes (pidfile, hand-over record, /healthz's master_pid) are the namespace's: never
signal them from the test's side. Everything here signals host pids read from /proc
(``NSpid``), and Service.teardown() must not run for such a service.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import Service

from hotswap.system import procs

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]


def unavailable() -> str | None:
    """Why PID namespaces cannot be made here (for a skip), or None."""
    try:
        done = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed"
    if done.returncode:
        return f"unshare cannot create a PID namespace here: {done.stderr.strip()}"
    return None


def ns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def ns_pids_line(pid: int) -> list[int]:
    """/proc/PID/status's NSpid: the pid in each namespace, outermost first."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(n) for n in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


class PidNamespace:
    def __init__(self, service: Service, *start_args: str, env: dict | None = None) -> None:
        self.service = service
        self.start_args = start_args
        self.env = dict(os.environ, SRV_MODE=service.mode, SRV_TEST_ROUTES="1", **(env or {}))
        self.launcher: subprocess.Popen | None = None
        self.pid1 = 0  # PID 1 of the namespace, as the host sees it
        self.ns = ""

    # -- lifecycle ---------------------------------------------------------------------
    def launch(self, argv: list[str] | None = None) -> None:
        """Start `argv` (default `hotswap start`) as PID 1; do not wait for it to serve."""
        argv = argv or [sys.executable, "-m", "hotswap", "--ini", str(self.service.ini),
                        "start", *self.start_args]
        # Its own session: the test's signals and terminal stay out; stderr is kept to read.
        self.launcher = subprocess.Popen(
            [*UNSHARE, *argv], cwd=self.service.root, env=self.env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        child = procs.wait_until(lambda: procs.children(self.launcher.pid)
                                 or self.launcher.poll() is not None, 30, interval=0.01)
        assert child, "unshare forked no PID 1"
        if child is True:  # PID 1 has exited already (a refusal, say): nothing to follow
            return
        self.pid1 = child[0]
        self.ns = procs.wait_until(lambda: ns_of(self.pid1) if ns_pids_line(self.pid1)[-1:]
                                   == [1] else None, 30, interval=0.01)
        assert self.ns, "unshare's child never became PID 1 of a new namespace"

    def start(self, timeout: float = 60.0) -> dict:
        """`hotswap start` as PID 1, once it serves: /healthz (namespace pids inside)."""
        self.launch()
        return self.service.wait_ready(timeout)

    def exit_code(self, timeout: float) -> int:
        """Wait for PID 1 to exit; unshare exits with its status (128+N for a signal N)."""
        code = self.launcher.wait(timeout=timeout)
        return code

    def stderr(self) -> str:
        return self.launcher.stderr.read() if self.launcher and self.launcher.stderr else ""

    def terminate(self) -> None:
        """SIGTERM to PID 1, as the kubelet (or `docker stop`) sends it."""
        os.kill(self.pid1, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to PID 1 from outside, as the kubelet after the grace period."""
        procs.signal_quietly(self.pid1, signal.SIGKILL)

    def teardown(self) -> None:
        if self.launcher is None:
            return
        if self.launcher.poll() is None:
            self.kill()  # the kernel kills every process of the namespace with it
            self.launcher.wait(timeout=30)
        assert procs.wait_until(lambda: not self.pids(), 30), f"left running: {self.pids()}"
        for process in self.service.background:  # nsenter: its child was in the namespace
            process.communicate(timeout=30)
        if self.launcher.stderr:
            self.launcher.stderr.close()

    # -- inside ------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess:
        """`hotswap ARGS` inside the namespace, as `kubectl exec POD -- hotswap ARGS` runs."""
        return subprocess.run(self.nsenter_argv(*args), capture_output=True, text=True,
                              timeout=timeout, cwd=self.service.root, env=self.env)

    def cli_background(self, *args: str) -> subprocess.Popen:
        process = subprocess.Popen(
            self.nsenter_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=self.service.root, env=dict(self.env, PYTHONUNBUFFERED="1"))
        self.service.background.append(process)
        return process

    def nsenter_argv(self, *args: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid1), "-m", "-p", "--", sys.executable, "-m",
                "hotswap", "--ini", str(self.service.ini), *args]

    def pids(self) -> list[int]:
        """Host pids of every process in the namespace (none once PID 1 has gone)."""
        if not self.ns:
            return []
        return sorted(pid for pid in procs.all_pids() if ns_of(pid) == self.ns)

    def host_pid(self, ns_pid: int) -> int | None:
        """The host pid of the namespace's pid `ns_pid` (the pidfile's, /healthz's)."""
        for pid in self.pids():
            if ns_pids_line(pid)[-1:] == [ns_pid]:
                return pid
        return None

    def zombies(self) -> list[int]:
        """Processes of the namespace that exited and were not reaped (state Z)."""
        return [pid for pid in self.pids() if (st := procs.stat(pid)) and st.state == "Z"]
