"""Issue 21: the CLI's own start imports only what the command needs.

`hotswap --help` and a command's `--help` run in a fresh interpreter; what it loaded is read
from sys.modules at exit, not timed (the figures are in bench/README.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hotswap import cli
from hotswap.releases import message

# what a swap, a status or a probe needs, and a help text does not
HEAVY = ("hotswap.releases", "hotswap.service", "hotswap.swap", "http.client", "ssl", "email")

CODE = """
import atexit, sys
def loaded():
    heavy = {heavy!r}
    print(" ".join(sorted(m for m in sys.modules if m.startswith(heavy))), file=sys.stderr)
atexit.register(loaded)
sys.argv = ["hotswap", *{args!r}]
from hotswap.cli import main
main()
"""


@pytest.mark.parametrize("args", [["--help"], ["status", "--help"], ["deploy", "--help"],
                                  ["announce", "--help"], ["--version"]])
def test_help_loads_no_heavy_module(args):
    done = subprocess.run([sys.executable, "-c", CODE.format(heavy=HEAVY, args=args)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    assert not loaded, f"hotswap {' '.join(args)} imported {loaded}"


def test_help_still_lists_every_command():
    code = CODE.format(heavy=HEAVY, args=["--help"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    for name in cli.main.commands:
        assert f"  {name} " in done.stdout, name


def test_announce_choices_are_the_messages_actions():
    assert tuple(sorted(message.ACTIONS)) == cli.ANNOUNCE_ACTIONS
