"""The loading priority (hotswap/system/priority.py) as an unprivileged service meets it: a
master lowers its priority only when it may come back to the service's own, and comes back.
A real child process drops root for nobody (no CAP_SYS_NICE), so the kernel decides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hotswap.system import priority

CHILD = """
import json, os, resource, sys
from pathlib import Path
from hotswap.system import priority
run_dir = Path(sys.argv[1])
service = priority.remember_normal(run_dir)
resource.setrlimit(resource.RLIMIT_NICE, (0, resource.getrlimit(resource.RLIMIT_NICE)[1]))
os.setgid(65534)
os.setuid(65534)  # nobody: no capabilities from here on
nice = lambda: os.getpriority(os.PRIO_PROCESS, 0)
out = {"service": service.nice}
out["refused"], out["nice_refused"] = priority.lower(run_dir, 10), nice()
os.setpriority(os.PRIO_PROCESS, 0, service.nice + 10)  # as if it had lowered anyway
out["settled"], out["nice_stuck"] = priority.settle(run_dir, os.getpid()), nice()
print(json.dumps(out))
"""

# Allowed and restored is the root case (CAP_SYS_NICE): tests/test_memory.py sees a real
# generation load at nice +10 and serve at the service's own. An RLIMIT_NICE that allows it
# unprivileged (systemd's LimitNICE=+0) cannot be made here: raising the hard limit needs
# CAP_SYS_RESOURCE, which this machine's root lacks.


@pytest.fixture
def unprivileged(tmp_path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_an_unprivileged_master_lowers_only_what_it_may_restore(unprivileged: dict):
    out = unprivileged
    assert out["nice_refused"] == out["service"], out
    assert out["refused"].startswith("loading at the service's priority: RLIMIT_NICE "), out
    assert "LimitNICE=+0" in out["refused"], out
    # had it lowered anyway, nothing could bring it back: what the refusal avoids
    assert out["nice_stuck"] == out["service"] + 10, out
    assert "could not set it for" in out["settled"] and "Permission denied" in out["settled"]


def test_a_bad_loading_nice_loads_at_the_services_priority(tmp_path: Path):
    """hotswap-loading-nice = 0 turns it off; nothing here raises (it runs in the master)."""
    assert priority.lower(tmp_path, 0).endswith("(hotswap-loading-nice = 0)")
    assert priority.normal(tmp_path) is None
