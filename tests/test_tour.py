"""The README's five-minute tour, run literally, so the README cannot drift from the code.

The commands come from the README's tour section (between `<!-- tour -->` and
`<!-- /tour -->`): every `$ ` line of its code blocks, in order, run with bash in a fresh copy
of the repo (the working tree without .venv, run, log, data; its .venv a link to this one, so
nothing is installed; TERMS small, so every import is quick). A command ending in
`echo "exit $?"` must print the `exit N` the README shows; every other command must exit 0.
Two markers say what a terminal does that a script cannot type: `<!-- tour: background -->`
(the block's command is the first terminal's foreground service) and `<!-- tour: ctrl-c -->`
(Ctrl-C to that terminal's process group, as a terminal sends it).

Beyond the commands: the generation changes on the good reload and not on the refused one;
Ctrl-C leaves in run/ exactly what `hotswap stop` leaves; `make reload` and `make status`
exit with make's 2 but name the CLI's own code and its meaning.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from terminal import Terminal

from hotswap.swap import probe
from hotswap.system import procs

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV = REPO / ".venv"
TERMS = "20000"
STEP_TIMEOUT = 120.0
NOT_COPIED = {".venv", ".wheels", "run", "log", "data", ".git", ".pytest_cache", ".ruff_cache",
              "__pycache__", "raw"}
EXIT_ECHO = 'echo "exit $?"'

pytestmark = pytest.mark.slow


@dataclass
class Step:
    kind: str  # "run", "background" or "ctrl-c"
    command: str = ""
    output: list[str] = field(default_factory=list)

    @property
    def expected_exit(self) -> int:
        """0, or the `exit N` the README shows after a command that echoes its code."""
        if not self.command.rstrip().endswith(EXIT_ECHO):
            return 0
        shown = [m.group(1) for line in self.output if (m := re.fullmatch(r"exit (\d+)", line))]
        assert shown, f"the README shows no `exit N` after: {self.command}"
        return int(shown[-1])


def tour_steps(text: str) -> list[Step]:
    """The tour's steps, in README order."""
    match = re.search(r"<!-- tour -->(.*?)<!-- /tour -->", text, re.S)
    assert match, "README.md has no <!-- tour --> ... <!-- /tour --> section"
    steps: list[Step] = []
    marker, in_block = None, False
    for line in match.group(1).splitlines():
        if m := re.fullmatch(r"\s*<!-- tour: ([a-z-]+) -->\s*", line):
            marker = m.group(1)
        elif line.startswith("```"):
            in_block = not in_block
            if in_block and marker == "ctrl-c":
                steps.append(Step("ctrl-c"))
            if not in_block:
                marker = None
        elif in_block and line.startswith("$ "):
            steps.append(Step("background" if marker == "background" else "run", line[2:]))
        elif in_block and steps:
            steps[-1].output.append(line)
    return steps


def run_files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")}


@pytest.fixture
def clone(tmp_path: Path):
    """A fresh copy of the working tree that uses this repo's .venv."""
    if not (VENV / ".installed-run").exists():
        pytest.skip("no .venv/.installed-run: run `make venv` first")
    root = tmp_path / "hotswap"
    shutil.copytree(REPO, root, ignore=lambda folder, names: [
        n for n in names if n in NOT_COPIED])  # copy2: keeps mtimes, so make installs nothing
    (root / ".venv").symlink_to(VENV)
    git = ["git", "-c", "user.name=tour", "-c", "user.email=tour@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "the tour's clone"]):
        subprocess.run([*git, *args], cwd=root, check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items()
           if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "HOTSWAP_INI"}}
    env["TERMS"] = TERMS
    terminals: list[Terminal] = []
    yield root, env, terminals
    for terminal in terminals:
        terminal.stop()
    masters = subprocess.run([str(VENV / "bin/hotswap"), "--ini", str(root / "srv.ini"),
                              "status", "--json"], capture_output=True, text=True, cwd=root)
    if masters.returncode == 0:  # a failed test left the service up: stop it by its pid
        procs.signal_quietly(json.loads(masters.stdout)["master_pid"], signal.SIGINT)


def make(root: Path, env: dict, target: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", target], cwd=root, env=env,
                          capture_output=True, text=True, timeout=STEP_TIMEOUT)


def generation(root: Path) -> str | None:
    health = probe.healthz(root / "run" / "http.sock", timeout=5.0)
    return health.get("generation") if health else None


def test_the_readme_tour(clone):
    root, env, terminals = clone
    steps = tour_steps(README.read_text())
    kinds = [s.kind for s in steps]
    assert kinds.count("background") == 1 and kinds.count("ctrl-c") == 1, kinds
    generations: list[tuple[Step, str | None]] = []
    for step in steps:
        if step.kind == "background":
            terminals.append(Terminal(step.command, root, env, root.parent / "terminal-1.out"))
            served = procs.wait_until(lambda: generation(root), STEP_TIMEOUT)
            assert served, f"`{step.command}` never served:\n{terminals[0].output()}"
        elif step.kind == "ctrl-c":
            assert terminals[0].ctrl_c() in (0, -signal.SIGINT), terminals[0].output()
            assert terminals[0].output().rstrip().endswith("hotswap: stopped")
            after_ctrl_c = run_files(root / "run")
        else:
            done = subprocess.run(["bash", "-c", step.command], cwd=root, env=env, text=True,
                                  capture_output=True, timeout=STEP_TIMEOUT)
            assert done.returncode == 0, f"{step.command}\n{done.stdout}{done.stderr}"
            if step.command.rstrip().endswith(EXIT_ECHO):
                assert done.stdout.splitlines()[-1] == f"exit {step.expected_exit}", (
                    f"{step.command}\n{done.stdout}{done.stderr}")
        generations.append((step, generation(root) if (root / "run/http.sock").exists()
                            else None))

    # a good reload changed the generation; a refused one did not
    served = [g for _, g in generations if g]
    assert len(set(served)) >= 2, f"the tour never changed the generation: {served}"
    for (_, before), (step, after) in zip(generations, generations[1:], strict=False):
        if step.kind == "run" and step.expected_exit != 0 and before:
            assert after == before, f"`{step.command}` changed what serves"

    # Ctrl-C left what `hotswap stop` leaves: start again, stop, compare
    hotswap = [str(VENV / "bin/hotswap"), "--ini", str(root / "srv.ini")]
    terminals.append(Terminal(" ".join([*hotswap, "start"]), root, env,
                              root.parent / "terminal-2.out"))
    assert procs.wait_until(lambda: generation(root), STEP_TIMEOUT), terminals[-1].output()
    # `make reload` of a broken release: make's own 2, but it names the CLI's 1 and why
    good = (root / "srv.py").read_text()
    (root / "srv.py").write_text(good + 'raise RuntimeError("broken for make")\n')
    made = make(root, env, "reload")
    (root / "srv.py").write_text(good)
    assert made.returncode == 2, made.stdout + made.stderr
    assert "`hotswap reload` exited 1: reload failed" in made.stderr, made.stderr
    assert "broken for make" in made.stderr
    stop = subprocess.run([*hotswap, "stop"], cwd=root, capture_output=True, text=True)
    assert stop.returncode == 0, stop.stderr
    assert terminals[-1].process.wait(timeout=STEP_TIMEOUT) == 0
    assert terminals[-1].output().rstrip().endswith("hotswap: stopped")
    assert "removed stale" not in terminals[-1].output()  # Ctrl-C left nothing to clear
    assert run_files(root / "run") == after_ctrl_c
    assert not {"0.fifo", "1.fifo", "http.sock", "stats.sock", "master.pid",
                "handover.json"} & after_ctrl_c

    # the make targets: make's own code is 2 for any failure, so they name the CLI's code
    for target, code in (("status", 3), ("reload", 3)):
        made = make(root, env, target)
        assert made.returncode == 2
        assert f"`hotswap {target}` exited {code}: nothing is running" in made.stderr
