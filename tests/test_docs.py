"""The pages under docs/ and bench/README.md, run as written, so they cannot rot unseen.

A page marks what a reader can run here as a session:

    <!-- doc-session: shop -->        a copy of examples/shop/ is the working folder
                                      (`repo`: a copy of the working tree, as the tour's)
    <!-- doc: background -->          the next block's command is a terminal's foreground service
    ```
    $ command                         every `$ ` line runs with bash, in order
    shown output
    ```
    <!-- /doc-session -->

A command ending in `echo "exit=$?"` (or `echo "exit $?"`) must print the code the page shows;
every other command must exit 0. Of the output a page shows, the lines the kit prints as
`hotswap: …` must be printed, up to their first number or path (pids, times and paths differ
from run to run; the words do not). A block with `$ ` lines outside a session must say why
it cannot run here: `<!-- doc: not run: REASON -->` before it. The README's tour has its own
test (tests/test_tour.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from terminal import Terminal

from hotswap.swap import probe
from hotswap.system import procs

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"
PAGES = sorted([*(REPO / "docs").glob("*.md"), REPO / "bench" / "README.md"])
STEP_TIMEOUT = 180.0
TERMS = "20000"
NOT_COPIED = {".venv", ".wheels", "run", "log", "data", ".git", ".pytest_cache", ".ruff_cache",
              "__pycache__", "raw", "build", "dist"}
EXIT_SHOWN = re.compile(r"exit[= ](\d+)")
SESSION = re.compile(r"<!-- doc-session: ([a-z0-9-]+) -->(.*?)<!-- /doc-session -->", re.S)
NOT_RUN = re.compile(r"<!-- doc: not run: (.+?) -->")


@dataclass
class Step:
    command: str
    background: bool = False
    output: list[str] = field(default_factory=list)

    @property
    def expected_exit(self) -> int:
        if not re.search(r'echo "?exit[= ]\$\?"?\s*(#.*)?$', self.command):
            return 0
        shown = [int(m.group(1)) for line in self.output if (m := EXIT_SHOWN.fullmatch(
            line.strip()))]
        assert shown, f"the page shows no `exit=N` after: {self.command}"
        return shown[-1]

    def shown_kit_lines(self) -> list[str]:
        """The stable part of each `hotswap: …` line the page shows."""
        keys = []
        for line in self.output:
            line = line.strip()
            if line.startswith("hotswap: "):
                key = re.split(r"[\d/'\"(]", line, maxsplit=1)[0].strip()
                if len(key) > len("hotswap: ") + 8:
                    keys.append(key)
        return keys


def blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(offset, the text just before, lines) of each fenced block with `$ ` lines."""
    found, start, opened, closed, inside = [], 0, 0, 0, False
    for match in re.finditer(r"^ *```.*$", text, re.M):
        if not inside:
            inside, opened, start = True, match.start(), match.end()
        else:
            inside = False
            lines = [line.strip() for line in text[start:match.start()].splitlines()]
            if any(line.startswith("$ ") for line in lines):
                found.append((start, text[closed:opened], lines))
            closed = match.end()
    return found


def session_steps(body: str) -> list[Step]:
    steps: list[Step] = []
    background = False
    for _, before, lines in blocks(body):
        background = "<!-- doc: background -->" in before
        for line in lines:
            if line.startswith("$ "):
                steps.append(Step(line[2:], background=background))
                background = False
            elif steps:
                steps[-1].output.append(line)
    return steps


def sessions() -> list[tuple[Path, str, list[Step]]]:
    return [(page, m.group(1), session_steps(m.group(2)))
            for page in PAGES for m in SESSION.finditer(page.read_text())]


def test_every_command_block_runs_or_says_why_not():
    unmarked = []
    for page in PAGES:
        text = page.read_text()
        spans = [m.span() for m in SESSION.finditer(text)]
        for offset, before, _ in blocks(text):
            in_session = any(a <= offset <= b for a, b in spans)
            if not in_session and not NOT_RUN.search(before):
                line = text.count("\n", 0, offset)
                unmarked.append(f"{page.relative_to(REPO)}:{line}")
    assert not unmarked, ("command blocks neither in a <!-- doc-session --> nor marked "
                          f"<!-- doc: not run: REASON -->: {unmarked}")


def working_copy(example: str, tmp_path: Path) -> Path:
    """`repo`: a copy of the working tree using this repo's .venv (as the tour's); any other
    name: a copy of examples/NAME."""
    if example != "repo":
        return Path(shutil.copytree(REPO / "examples" / example, tmp_path / example))
    root = tmp_path / "hotswap"
    shutil.copytree(REPO, root, ignore=lambda folder, names: [
        n for n in names if n in NOT_COPIED])  # copy2 keeps mtimes: make installs nothing
    (root / ".venv").symlink_to(VENV)
    return root


def serving(folder: Path) -> bool:
    socket = folder / "run" / "http.sock"
    return socket.exists() and (folder / "run" / "handover.json").exists() and bool(
        probe.healthz(socket, timeout=2.0))


@pytest.mark.slow
@pytest.mark.parametrize("page,example,steps", sessions(),
                         ids=[f"{p.stem}-{e}" for p, e, _ in sessions()])
def test_a_page_session_runs_as_written(page: Path, example: str, steps: list[Step],
                                        tmp_path: Path):
    folder = working_copy(example, tmp_path)
    env = {k: v for k, v in os.environ.items()
           if k not in {"HOTSWAP_INI", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    env["PATH"] = f"{VENV / 'bin'}:{env['PATH']}"
    env["TERMS"] = TERMS  # `make run`'s table: small, so every import is quick
    terminals: list[Terminal] = []
    try:
        for step in steps:
            if step.background:
                terminals.append(Terminal(step.command, folder, env,
                                          tmp_path / f"terminal-{len(terminals)}.out"))
                assert procs.wait_until(lambda: serving(folder), STEP_TIMEOUT), (
                    f"`{step.command}` never served:\n{terminals[-1].log.read_text()}")
                continue
            done = subprocess.run(["bash", "-c", step.command], cwd=folder, env=env,
                                  text=True, capture_output=True, timeout=STEP_TIMEOUT)
            said = done.stdout + done.stderr
            if step.expected_exit:
                shown = EXIT_SHOWN.findall(done.stdout)
                assert shown and int(shown[-1]) == step.expected_exit, f"{step.command}\n{said}"
            else:
                assert done.returncode == 0, f"{page.name}: {step.command}\n{said}"
            for key in step.shown_kit_lines():
                assert key in said, f"{page.name}: `{step.command}` did not say {key!r}:\n{said}"
    finally:
        for terminal in terminals:
            terminal.stop()


def test_the_release_sources_script_makes_what_releases_md_deploys(tmp_path: Path):
    script = REPO / "examples" / "releases" / "make-sources.sh"
    done = subprocess.run(["bash", str(script), str(tmp_path / "src"), "500"], cwd=REPO,
                          capture_output=True, text=True, timeout=STEP_TIMEOUT)
    assert done.returncode == 0, done.stderr
    for name in ("v1", "v2", "v3", "broken"):
        assert {p.name for p in (tmp_path / "src" / name).iterdir()} == {
            "srv.py", "srv.ini", "data"}, name
    assert "import no_such_module" in (tmp_path / "src" / "broken" / "srv.py").read_text()
