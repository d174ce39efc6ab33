"""`hotswap start` in a terminal: keep the foreground across swaps.

Without systemd, the process that started uWSGI would see the first master exit at the first
swap (the new master is its grandchild, in a session of its own) and hand the terminal back
while the service runs on. The supervisor makes itself a child subreaper, so every re-forked
master is re-parented to it, and it exits only when the last master does.

One loop, gunicorn-style: signals are received synchronously (sigtimedwait) and dispatched
to a handle_<name> method; children are reaped in the same loop.

Ctrl-C (or SIGTERM) during a reload waits for the reload to settle (it holds the reload lock,
and either commits or rolls back), then stops whatever serves: never a new generation left
running after "stopping". It exits non-zero if uWSGI exits before any generation served.

As a container's PID 1 (docs/containers.md) it is the same loop: PID 1 reaps every orphan of
its namespace anyway, and signals reach it because it blocks and waits for them (PID 1 gets
no default action, so a handler-less SIGTERM would be ignored). A stop has a grace (--grace,
HOTSWAP_GRACE, 25 s: inside Kubernetes' default terminationGracePeriodSeconds of 30): past
it, whatever still runs is SIGKILLed and start exits 5, before the kubelet's own SIGKILL
would take PID 1 and, with it, every process of the namespace at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

from ..config import DEFAULT_GRACE, Config, here
from ..errors import ExitCode, HotswapError
from ..protocol import record
from ..swap import lock
from ..system import procs
from . import instance

PR_SET_CHILD_SUBREAPER = 36
WAKE_SIGNALS = {signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def refuse_exec_as_pid1() -> None:
    """`start --exec` as PID 1 would make the first uWSGI master PID 1: at the first swap it
    exits, and the kernel kills the namespace with it, the new generation included."""
    if os.getpid() == 1:
        raise HotswapError(
            "start --exec refused: this process is PID 1 (a container's entrypoint), and the "
            "first master would be PID 1: its exit at the first swap kills every process of "
            "the container; run `hotswap start` (it supervises as PID 1)", ExitCode.CONFIG)


class Supervisor:
    def __init__(self, cfg: Config, argv: list[str], env: dict[str, str], keep_fd: int,
                 grace: float = DEFAULT_GRACE) -> None:
        self.cfg = cfg
        self.grace = grace
        self.stop_deadline: float | None = None  # monotonic; set by the first SIGTERM/SIGINT
        self.grace_over = False
        self.argv = argv
        self.env = env
        self.keep_fd = keep_fd  # the instance lock, held by uWSGI too
        self.exit_code = 0
        self.stopping = False  # Ctrl-C seen
        self.stop_sent = False  # ... and the masters were told to quit
        self.announced: int | None = None

    def run(self) -> int:
        _become_subreaper()
        signal.pthread_sigmask(signal.SIG_BLOCK, WAKE_SIGNALS)
        # uWSGI must not inherit our blocked mask: unblock in the child before exec.
        # Its own session: a terminal's Ctrl-C reaches only us, and we turn it into a
        # graceful "q" (uWSGI itself treats SIGINT as "stop now").
        first = subprocess.Popen(
            self.argv, env=self.env, start_new_session=True, pass_fds=(self.keep_fd,),
            preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, WAKE_SIGNALS),
        )
        self.first_master = first.pid
        while self.reap():
            self.announce()
            if self.stopping and not self.stop_sent:
                self.try_stop()
            if self.stopping and not self.grace_over and time.monotonic() > self.stop_deadline:
                self.end_grace()
            info = signal.sigtimedwait(WAKE_SIGNALS, 0.5)
            if info is not None and info.si_signo != signal.SIGCHLD:
                name = signal.Signals(info.si_signo).name.lower()
                getattr(self, f"handle_{name}")()
        self.clean_up()
        if self.announced is None and not self.stopping:
            print(f"hotswap: uWSGI exited before any generation served (exit "
                  f"{self.exit_code}); see {self.cfg.log_file}", file=sys.stderr)
            return 1
        if self.grace_over:
            return ExitCode.TIMEOUT
        if self.stopping or self.exit_code == 0:
            print("hotswap: stopped", file=sys.stderr)
        return self.exit_code

    def clean_up(self) -> None:
        """Leave what `hotswap stop` leaves. Every master was our descendant and is gone, and
        the instance lock we still hold keeps a new start out: nothing owns the FIFOs, the
        sockets or the pidfile any more."""
        try:
            instance.clear_stale_files(self.cfg)
        except OSError as exc:
            print(f"hotswap: could not clean {self.cfg.run_dir}: {exc.strerror or exc}",
                  file=sys.stderr)

    def reap(self) -> bool:
        """Collect exited children; False once none is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            code = os.waitstatus_to_exitcode(status)
            if pid == procs.read_pidfile(self.cfg.pidfile) or pid == self.first_master:
                self.exit_code = code if code >= 0 else 128 - code

    def announce(self) -> None:
        """Say once per generation when it serves (its hand-over committed)."""
        current = record.read(self.cfg.run_dir)
        if current and current.committed and current.master_pid != self.announced:
            self.announced = current.master_pid
            print(here(f"hotswap: master {self.announced} serving generation "
                       f"{current.generation} on {self.cfg.socket}"), file=sys.stderr)

    def handle_sigint(self) -> None:
        """Ctrl-C: stop gracefully (once a reload in progress settles); again: stop now."""
        if self.stopping:
            self.handle_sigquit()
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.grace
        reloading = lock.holder(self.cfg)
        if reloading:
            print(f"hotswap: stopping once the reload in progress (pid {reloading}) settles "
                  "(Ctrl-C again to stop now)", file=sys.stderr)
        else:
            print("hotswap: stopping gracefully (Ctrl-C again to stop now)", file=sys.stderr)
        self.try_stop()

    def try_stop(self) -> None:
        """Roll back what loads, "q" to what serves; not while a reload holds its lock."""
        try:
            with lock.reload_lock(self.cfg, "stop"):
                instance.begin_stop(self.cfg)
        except (HotswapError, OSError):
            return  # a reload is in progress (retried on the next turn), or nothing runs
        self.stop_sent = True

    handle_sigterm = handle_sigint

    def end_grace(self) -> None:
        """The grace is over: SIGKILL every process still running (a master still draining,
        a reload still loading), so that start exits on its own, with 5, and says who."""
        self.grace_over = True
        left = procs.descendants(os.getpid())
        for pid in left:
            procs.signal_quietly(pid, signal.SIGKILL)
        print(f"hotswap: still running {self.grace:g}s after the stop began (the grace, "
              f"--grace or HOTSWAP_GRACE): killed pid {', '.join(map(str, left)) or 'none'}; "
              f"their in-flight requests are lost; next: hotswap --ini {self.cfg.ini} start",
              file=sys.stderr)

    def handle_sigquit(self) -> None:
        for pid in procs.children(os.getpid()):
            procs.signal_quietly(pid, signal.SIGINT)  # uWSGI: stop immediately

    def handle_sighup(self) -> None:
        """SIGHUP to the supervisor: run a swap, like `hotswap reload`."""
        subprocess.Popen([sys.executable, "-m", "hotswap", "--ini", str(self.cfg.ini), "reload"])
