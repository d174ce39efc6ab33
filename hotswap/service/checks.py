"""What `hotswap start` refuses: a uWSGI or an ini with which a swap breaks in a known way.

Each check reads what uWSGI itself sees (config.read_keys: one `uwsgi --get` call for
every key, placeholders expanded) and its message says what would break, so the operator
learns it at start, not from a failed reload under traffic.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ..config import Config, read_keys
from ..errors import ExitCode, HotswapError

MIN_UWSGI = (2, 0, 31)
KEYS = ["need-app", "vacuum", "stats", "hook-accepting"]
TRUE = {"1", "true", "yes", "on", "y", "t"}


# the accepting hook's module; the second is its old path, still named by inis written
# before the layout by role (hotswap/inside/handover.py keeps it working)
HANDOVER_MODULES = ("hotswap.inside.handover", "hotswap.handover")


def uwsgi_version(uwsgi: Path) -> tuple[int, ...] | None:
    try:
        done = subprocess.run([str(uwsgi), "--version"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", done.stdout.strip())
    return tuple(int(part) for part in match.groups()) if match else None


def problems(cfg: Config, version: tuple[int, ...] | None,
             values: dict[str, str | None]) -> list[str]:
    """Every reason `cfg` cannot swap safely, one line each (pure: tests feed it values)."""
    found = []
    ini = cfg.ini
    if version is None or version < MIN_UWSGI:
        shown = ".".join(map(str, version)) if version else "of unknown version"
        found.append(f"uWSGI {shown} ({cfg.uwsgi}) is older than 2.0.31: the old master of a "
                     "swap hangs after 'q' instead of exiting (unbit/uwsgi#2722); install "
                     "uWSGI>=2.0.31")
    if (values.get("need-app") or "").lower() not in TRUE:
        found.append(f"{ini} does not set need-app = true: a release that fails to import "
                     "would still fork workers, take over and answer 500 to every request")
    if (values.get("vacuum") or "").lower() in TRUE:
        found.append(f"{ini} sets vacuum = true: the retiring master would unlink the socket "
                     "the new generation serves on, and new connections would be refused")
    stats = values.get("stats") or ""
    if ":" in stats and not stats.startswith(("/", "@", ".")):
        found.append(f"{ini} has a TCP stats socket ({stats}): the re-forked master cannot "
                     "bind it while the old one holds it, and the swap fails (uwsgi#2364); "
                     "use a unix one, e.g. stats = %(run_dir)/stats.sock")
    hook = values.get("hook-accepting") or ""
    if not any(module in hook for module in HANDOVER_MODULES):
        found.append(f"{ini} has no hook-accepting running `python -m {HANDOVER_MODULES[0]}`: "
                     "a new generation would accept before its hand-over and the old master "
                     "would never be told to quit; copy it from an ini `hotswap init` writes")
    return found


def refuse_unsafe(cfg: Config) -> None:
    """HotswapError (exit 2) naming the first problem, if any (what `start` calls)."""
    found = problems(cfg, uwsgi_version(cfg.uwsgi), read_keys(cfg, KEYS))
    if found:
        more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
        raise HotswapError(f"refusing to start: {found[0]}{more}", ExitCode.CONFIG)
