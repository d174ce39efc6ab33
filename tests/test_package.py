"""The kit as a dependency: a wheel built from this tree, installed into a fresh venv outside
the clone, sets up and swaps an app there (docs/your-app.md's "add hotswap to your project").

Nothing here uses the clone's .venv for the service: the app's venv holds only the wheel and
what it depends on, so a template or module the wheel forgot fails here as it would for a user.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from app_util import plain_project, swaps_under_load

import hotswap
from hotswap.service import scaffold

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".wheels"  # the uWSGI wheel `make` compiled once: no second compile here
RELOADS = 3

pytestmark = pytest.mark.slow


def run(*args: str | Path, cwd: Path | None = None, timeout: float = 600) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the tracked files (a build in the clone leaves build/)."""
    source = tmp_path_factory.mktemp("source")
    tracked = run("git", "ls-files", "-z", cwd=REPO).split("\0")
    for name in filter(None, tracked):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, target, follow_symlinks=False)
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", out, source)
    (built,) = out.glob("hotswap-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory) -> Path:
    """A venv outside the clone with the wheel and its dependencies, as a user's project has."""
    root = tmp_path_factory.mktemp("uservenv") / ".venv"
    run(sys.executable, "-m", "venv", "--without-pip", root)
    # this venv's pip installs into that one (`pip --python`): no second pip to bootstrap
    run(sys.executable, "-m", "pip", "--python", root / "bin" / "python", "install", "--quiet",
        "--find-links", WHEELS, wheel)
    return root


def test_the_wheel_carries_the_templates_and_the_version(wheel: Path):
    assert wheel.name.startswith(f"hotswap-{hotswap.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hotswap/templates/hotswap.service" in names
    assert "hotswap/templates/hotswap.socket" in names  # what `init --socket` renders
    assert not [n for n in names if n.startswith(("tests/", "bench/", "deploy/", "scripts/"))]


def test_a_wheel_installed_kit_swaps_an_app_outside_the_clone(venv: Path, tmp_path: Path):
    python = str(venv / "bin" / "python")
    version = run(venv / "bin" / "hotswap", "--version")
    assert version.strip() == f"hotswap, version {hotswap.__version__}"
    located = run(python, "-c", "import hotswap; print(hotswap.__file__)", cwd=tmp_path)
    assert located.startswith(str(venv)), located  # the wheel's copy, not the clone's
    project = plain_project(tmp_path, python=python)
    try:
        unit = (tmp_path / scaffold.UNIT_NAME).read_text()
        assert f"ExecStart={venv}/bin/hotswap" in unit, unit
        health = project.start()
        assert health["kit_version"] == hotswap.__version__
        swaps_under_load(project, RELOADS)
        stopped = project.cli("stop")
        assert stopped.returncode == 0, stopped.stderr
    finally:
        project.teardown()


def test_a_git_url_installs_the_kit_with_its_templates(tmp_path: Path):
    """`pip install git+file://…` (the committed tree, as a git URL in requirements names it)."""
    target = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
        "--target", target, f"git+file://{REPO}")
    assert (target / "hotswap" / "templates" / "hotswap.service").is_file()
    assert (target / "hotswap" / "inside" / "entry.py").is_file()
