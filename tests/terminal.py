"""A terminal's foreground command, for the tests that run documented sessions
(tests/test_tour.py, tests/test_docs.py): its own process group, as a shell gives it."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

STEP_TIMEOUT = 120.0  # how long Ctrl-C may take to stop the terminal's command


class Terminal:
    """The first terminal: one foreground command in its own process group."""

    def __init__(self, command: str, cwd: Path, env: dict, log: Path) -> None:
        self.log = log
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env,
                                            stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def ctrl_c(self) -> int:
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=STEP_TIMEOUT)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        """Teardown: Ctrl-C (the supervisor stops its masters), then SIGKILL if need be."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
