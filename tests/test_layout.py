"""The package's folders are its architecture; these checks keep the tree telling the truth.

Code inside uWSGI's processes (hotswap/inside/) runs in every worker of every generation: it
must import fast and never take the service down, so it never imports the operator's side
(click, the reload machine, the instance, releases, the CLI's config and errors). Two views:
the imports written in the source (every one, including those inside functions), and what
a fresh interpreter really loads when it imports the inside modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "hotswap"
# what code inside uWSGI's processes may import of the kit: its own folder and the two below
INSIDE_MAY_IMPORT = ("hotswap.inside", "hotswap.protocol", "hotswap.system")
# each folder imports only the folders listed here (and itself): the floors of the house
FLOORS = {
    "system": (),
    "protocol": ("system",),
    "inside": ("protocol", "system"),
    "swap": ("inside", "protocol", "system", "config", "errors"),
    "service": ("swap", "inside", "protocol", "system", "config", "errors"),
    "releases": ("service", "swap", "inside", "protocol", "system", "config", "errors"),
}
# the old flat paths that users' inis and apps name, each kept by a shim
SHIMS = {"entry": "hotswap.inside.entry", "handover": "hotswap.inside.handover",
         "wsgi": "hotswap.inside.wsgi", "live_store": "hotswap.inside.live_store"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    return (REPO / dotted.replace(".", "/")).with_suffix(".py").exists()


def imports(path: Path) -> set[str]:
    """Every module a file imports, absolute, wherever the import statement stands."""
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from . import x` names a module: count hotswap.<pkg>.x, not only the package
            found.update(f"{module}.{alias.name}" for alias in node.names
                         if is_module(f"{module}.{alias.name}"))
    return found


def kit_imports(path: Path) -> set[str]:
    return {m for m in imports(path) if m == "hotswap" or m.startswith("hotswap.")}


def folder_of(module: str) -> str:
    """'inside' for hotswap.inside.wsgi, 'config' for hotswap.config, '' for hotswap."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_inside_imports_only_inside_protocol_and_system():
    wrong = []
    for path in sorted((PKG / "inside").rglob("*.py")):
        for module in sorted(kit_imports(path)):
            if module != "hotswap" and not module.startswith(INSIDE_MAY_IMPORT):
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
        if "click" in {m.split(".")[0] for m in imports(path)}:
            wrong.append(f"{path.relative_to(REPO)} imports click")
    assert not wrong, ("code inside uWSGI's processes imports the operator's side: "
                       + "; ".join(wrong))


def test_each_folder_imports_only_the_floors_below():
    wrong = []
    for folder, allowed in FLOORS.items():
        for path in sorted((PKG / folder).rglob("*.py")):
            for module in sorted(kit_imports(path)):
                target = folder_of(module)
                if target not in ("", folder, *allowed):
                    wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert not wrong, "an import runs up a floor: " + "; ".join(wrong)


def test_package_root_imports_nothing():
    # every import of hotswap.inside.* runs hotswap/__init__.py first, in every worker
    assert not imports(PKG / "__init__.py")


INSIDE_MODULES = ["hotswap.inside.wsgi", "hotswap.inside.live_store", "hotswap.inside.handover",
                  "hotswap.wsgi", "hotswap.live_store", "hotswap.handover"]


@pytest.mark.parametrize("module", INSIDE_MODULES)
def test_importing_inside_loads_nothing_of_the_outside(module):
    """What a worker really loads (hotswap.inside.entry imports the app: the static check
    above covers it)."""
    code = (f"import sys, {module}\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m == 'click' or m.startswith("
            "('click.', 'hotswap.')))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    outside = [m for m in loaded if not m.startswith(INSIDE_MAY_IMPORT) and m not in
               {"hotswap", *(f"hotswap.{name}" for name in SHIMS)}]
    assert not outside, f"importing {module} loads the operator's side: {outside}"


@pytest.mark.parametrize("old", sorted(set(SHIMS) - {"entry"}))
def test_old_paths_still_work(old):
    """Inis name `hotswap.entry:application` and `-m hotswap.handover`, apps `hotswap.wsgi`.
    Importing the entry point loads the app, so tests/test_app.py swaps a real service whose
    ini names both old paths (test_an_ini_naming_the_old_paths_still_swaps)."""
    if old == "handover":
        done = subprocess.run([sys.executable, "-m", "hotswap.handover", "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "--run-dir" in done.stdout, done.stderr
        return
    code = (f"import importlib; old = importlib.import_module('hotswap.{old}'); "
            f"new = importlib.import_module('{SHIMS[old]}'); assert old is new")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
