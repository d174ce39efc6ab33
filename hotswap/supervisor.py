"""`hotswap start` in a terminal: keep the foreground across swaps.

Without systemd, the process that started uWSGI would see the first master exit at the first
swap (the new master is its grandchild, in a session of its own) and hand the terminal back
while the service runs on. The supervisor makes itself a child subreaper, so every re-forked
master is re-parented to it, and it exits only when the last master does.

One loop, gunicorn-style: signals are received synchronously (sigtimedwait) and dispatched
to a handle_<name> method; children are reaped in the same loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys

from . import fifo, procs
from .config import Config

PR_SET_CHILD_SUBREAPER = 36
WAKE_SIGNALS = {signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class Supervisor:
    def __init__(self, cfg: Config, argv: list[str], env: dict[str, str], keep_fd: int) -> None:
        self.cfg = cfg
        self.argv = argv
        self.env = env
        self.keep_fd = keep_fd  # the instance lock, held by uWSGI too
        self.exit_code = 0
        self.stopping = False
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
            info = signal.sigtimedwait(WAKE_SIGNALS, 0.5)
            if info is not None and info.si_signo != signal.SIGCHLD:
                name = signal.Signals(info.si_signo).name.lower()
                getattr(self, f"handle_{name}")()
        return self.exit_code

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
        """Say once per generation when it serves (the accepting hook's record)."""
        try:
            record = json.loads(self.cfg.handover_file.read_text())
        except (OSError, ValueError):
            return
        if record.get("phase") == "done" and record.get("master_pid") != self.announced:
            self.announced = record.get("master_pid")
            print(f"hotswap: master {self.announced} serving generation "
                  f"{record.get('generation')} on {self.cfg.http_socket}", file=sys.stderr)

    def handle_sigint(self) -> None:
        """Ctrl-C: stop gracefully; a second one stops now."""
        if self.stopping:
            self.handle_sigquit()
            return
        self.stopping = True
        print("hotswap: stopping gracefully (Ctrl-C again to stop now)", file=sys.stderr)
        for path in (self.cfg.fifo_live, self.cfg.fifo_standby):
            with contextlib.suppress(fifo.NoReader):
                fifo.send(path, "q")

    handle_sigterm = handle_sigint

    def handle_sigquit(self) -> None:
        for pid in procs.children(os.getpid()):
            procs.signal_quietly(pid, signal.SIGINT)  # uWSGI: stop immediately

    def handle_sighup(self) -> None:
        """SIGHUP to the supervisor: run a swap, like `hotswap reload`."""
        subprocess.Popen([sys.executable, "-m", "hotswap", "--ini", str(self.cfg.ini), "reload"])
