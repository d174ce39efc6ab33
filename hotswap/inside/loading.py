"""Imported by every master just before it imports the app (srv.ini: `import =
hotswap.inside.loading`): the generation about to load lowers its CPU and I/O priority, so
the import takes the CPU the serving generation leaves idle (hotswap/system/priority.py).
Its workers inherit the priority; the accepting hook restores the service's own before the
commit point.

`hotswap-loading-nice` (default 10) is how many nice levels lower; 0 turns it off. This runs
in the master at every start, the first one included: it never raises, and it writes one
line to the uWSGI log.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..system import files, priority

NICE_KEY = "hotswap-loading-nice"


def main() -> str:
    from . import wsgi  # the middleware's reader of ini values: imported by the app anyway

    raw = wsgi.ini_option(NICE_KEY)
    try:
        step = int(raw) if raw not in (None, "") else priority.DEFAULT_LOADING_NICE
    except ValueError:
        return (f"{NICE_KEY} = {raw!r} is not a whole number: loading at the service's "
                "priority")
    run_dir = os.environ.get(files.RUN_DIR_ENV)
    return priority.lower(Path(run_dir) if run_dir else None, step)


try:
    print(f"hotswap loading [{os.getpid()}]: {main()}", file=sys.stderr, flush=True)
except Exception:  # noqa: BLE001, S110 - nothing here may fail the import of a release
    pass
