"""Quick checks behind the README (issue 13): its exit-code table is errors.MEANING, the
prerequisite check names what is missing in one line each, the Makefile installs per
target, and the small operator-facing formats (socket state, ISO times, relative paths)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import size_text
from hotswap import config
from hotswap.errors import MEANING
from hotswap.service import instance
from hotswap.system import files
from tests.test_tour import tour_steps

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def words(text: str) -> str:
    return " ".join(text.replace("`", "").split()).lower()


def readme_exit_codes() -> dict[int, str]:
    """`| N | meaning | ...` rows of the README's "Exit codes" section."""
    section = README.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(r"(?m)^\|\s*(\d+)\s*\|\s*([^|]*?)\s*\|", section)}


def test_the_readme_exit_code_table_is_errors_meaning():
    table = readme_exit_codes()
    assert set(table) == {int(code) for code in MEANING}, (
        "README's exit-code table and hotswap/errors.py MEANING list different codes")
    for code, meaning in MEANING.items():
        assert words(table[int(code)]).startswith(words(meaning)), (
            f"README's row for exit {int(code)} must begin with MEANING: {meaning!r}")


def test_the_tour_has_its_steps_and_shows_its_codes():
    steps = tour_steps(README)
    assert [s.kind for s in steps if s.kind != "run"] == ["background", "ctrl-c"]
    runs = [s for s in steps if s.kind == "run"]
    assert any("reload" in s.command and s.expected_exit == 0 for s in runs)
    assert any("reload" in s.command and s.expected_exit == 1 for s in runs)
    assert any("status" in s.command and s.expected_exit == 3 for s in runs)


# -- scripts/check-prereqs.sh ---------------------------------------------------------------
FAKE_PYTHON = """#!/bin/sh
echo version {version}; echo modern {modern}; echo venv {venv}; echo headers {headers}
echo tag cp39
"""


def check_prereqs(tmp_path: Path, python: str, cc: str = "cc") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts/check-prereqs.sh"), python,
                           str(tmp_path / "no-wheels")], capture_output=True, text=True,
                          env=dict(os.environ, CC=cc))


def fake_python(tmp_path: Path, version="3.9.2", modern=0, venv=1, headers=1) -> str:
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON.format(version=version, modern=modern, venv=venv,
                                       headers=headers))
    path.chmod(0o755)
    return str(path)


def test_prerequisites_pass_here():
    done = subprocess.run(["bash", "scripts/check-prereqs.sh", sys.executable],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and done.stderr == ""


@pytest.mark.parametrize(("fake", "cc", "expected"), [
    ({"modern": 0}, "cc", ["Python >= 3.11: {python} is 3.9.2"]),
    ({"modern": 1, "venv": 0}, "cc", ["the venv module (with ensurepip)"]),
    ({"modern": 1, "headers": 0}, "no-such-cc",
     ["a C compiler (no-such-cc)", "the Python headers (Python.h)"]),
])
def test_each_missing_prerequisite_is_one_line(tmp_path: Path, fake, cc, expected):
    python = fake_python(tmp_path, **fake)
    done = check_prereqs(tmp_path, python, cc)
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and len(lines) == len(expected), done.stderr
    for line, text in zip(lines, expected, strict=True):
        assert line.startswith("prerequisite missing: ") and text.format(python=python) in line
        assert "apt-get install" in line or "PYTHON=" in line


def test_no_python_at_all_is_one_line(tmp_path: Path):
    done = check_prereqs(tmp_path, str(tmp_path / "nothing"))
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert "no working interpreter" in done.stderr


# -- the Makefile ----------------------------------------------------------------------------
def make_plan(target: str) -> str:
    """What `make TARGET` would run from scratch (-B: as if nothing were built yet)."""
    return subprocess.run(["make", "-n", "-B", "--no-print-directory", target], cwd=REPO,
                          capture_output=True, text=True, check=True,
                          env={k: v for k, v in os.environ.items()
                               if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}).stdout


def test_make_run_installs_only_what_serves():
    plan = make_plan("run")
    assert "scripts/check-prereqs.sh" in plan.splitlines()[0]
    assert "-e ." in plan and "[test" not in plan and "[bench" not in plan


def test_make_test_adds_its_extras_and_install_systemd_builds_no_dev_venv():
    plan = make_plan("test")
    assert "'.[test,fleet]'" in plan and "'.[bench]'" in plan
    assert plan.index("install-system-deps.sh") < plan.index("python3 -m venv")
    assert make_plan("install-systemd").strip().splitlines() == [
        "bash deploy/install-systemd.sh /opt/hotswap /etc/systemd/system"]


# -- small formats ---------------------------------------------------------------------------
def test_status_formats(tmp_path: Path):
    assert instance.socket_state(tmp_path / "none.sock", master=False, answered=False) == \
        "missing"
    (tmp_path / "old.sock").touch()
    assert instance.socket_state(tmp_path / "old.sock", master=False, answered=False) == \
        "stale"
    assert instance.socket_state(tmp_path / "old.sock", master=True, answered=True) == \
        "listening"
    shown = instance.with_iso_times({"state": "done", "at": 0.0 + 86400, "paused_at": 86399.5})
    assert shown == {"state": "done", "updated_at": "1970-01-02T00:00:00Z",
                     "paused_at": "1970-01-01T23:59:59Z"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", files.iso_time())


def test_paths_under_the_current_folder_are_shown_relatively(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config.here(f"sent to {tmp_path}/run/0.fifo") == "sent to run/0.fifo"
    assert config.here("/elsewhere/run/0.fifo") == "/elsewhere/run/0.fifo"
    monkeypatch.chdir("/")
    assert config.here("/run/hotswap/0.fifo") == "/run/hotswap/0.fifo"


def test_a_small_resource_is_not_zero_mib():
    assert size_text(700 * 1024) == "700 KiB"
    assert size_text(3 * 2**20) == "3.0 MiB" and size_text(51 * 2**20) == "51 MiB"


def test_not_linux_is_one_line(tmp_path: Path):
    uname = tmp_path / "bin" / "uname"
    uname.parent.mkdir()
    uname.write_text("#!/bin/sh\necho Darwin\n")
    uname.chmod(0o755)
    done = subprocess.run(["bash", str(REPO / "scripts/check-prereqs.sh"), sys.executable],
                          capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PATH=f"{uname.parent}:{os.environ['PATH']}"))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "prerequisite missing: Linux: this is Darwin; hotswap reads /proc and uses "
        "prctl(PR_SET_CHILD_SUBREAPER)"]
