"""What `hotswap start` refuses: a uWSGI or an ini with which a swap breaks in a known way;
and `hotswap check`: those refusals, what a reload would refuse, and what the kit supports,
as a list, without starting anything.

Each check reads what uWSGI itself sees (config.read_keys: one `uwsgi --get` call for
every key, placeholders expanded) and its message says what would break, so the operator
learns it at start, not from a failed reload under traffic.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, read_keys
from ..errors import ExitCode, HotswapError
from ..swap.host import RealHost

MIN_UWSGI = (2, 0, 31)
# the gateways: processes of their own that the master spawns and that bind their own
# address; a re-forked master spawns another, which cannot bind the address the first holds
GATEWAYS = ["http", "https", "fastrouter", "rawrouter", "sslrouter"]
# options that change a swap and that the kit supports (each covered by tests/test_options.py)
SUPPORTED = {
    "cheaper": "workers spawned later in a generation's life pass the gate at once",
    "max-requests": "a worker respawned during a swap joins its own generation",
    "harakiri": "a worker respawned during a swap joins its own generation",
    "enable-threads": "threads the app starts at import run in each worker",
}
KEYS = ["need-app", "vacuum", "stats", "hook-accepting", "lazy-apps", "lazy", "emperor",
        "threads", *GATEWAYS]
TRUE = {"1", "true", "yes", "on", "y", "t"}
# the longest unix socket path uWSGI binds: 102 bytes binds, 103 is "invalid socket name"
# (measured with uWSGI 2.0.31; the kernel's sun_path holds 107 and a NUL)
MAX_UNIX_PATH = 102


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
    for key in ("lazy-apps", "lazy"):
        if (values.get(key) or "").lower() in TRUE:
            found.append(f"{ini} sets {key} = true: the app would import in each worker, not "
                         "in the master, so a release that fails to import is respawned "
                         "forever instead of failing fast; remove it (each swap already "
                         "imports the release afresh, in a new master)")
    threads = values.get("threads") or "1"
    if threads.isdigit() and int(threads) > 1:
        # seen with uWSGI 2.0.31, threads = 4 under load: the old workers stayed suspended
        # after "q", past worker-reload-mercy, until killed
        found.append(f"{ini} sets threads = {threads}: the hand-over's pause (\"p\") suspends "
                     "every thread of the old workers and uWSGI's graceful stop never wakes "
                     "them, so the old generation never exits and the next reload is refused; "
                     "use processes instead of threads (or threads = 1)")
    for key in GATEWAYS:
        if values.get(key):
            found.append(f"{ini} sets {key} = {values[key]}: that router is a process of its "
                         "own that binds its address, and a re-forked master's router cannot "
                         "bind it while the old one holds it; serve with http-socket (or "
                         "socket) and put a proxy in front (deploy/nginx-site.conf)")
    if values.get("emperor"):
        found.append(f"{ini} runs uWSGI's Emperor (emperor = {values['emperor']}): the kit "
                     "swaps one instance, not an Emperor; run each vassal with `hotswap "
                     "start` instead")
    unix = [(where.key, where.address) for where in cfg.sockets if where.path]
    if ":" not in stats and stats:
        unix.append(("stats", stats))
    for key, address in unix:
        if len(address.encode()) > MAX_UNIX_PATH:
            found.append(f"{ini} sets {key} = {address}: {len(address.encode())} bytes, longer "
                         f"than the {MAX_UNIX_PATH} a unix socket path may have (uWSGI says "
                         "\"invalid socket name\" and serves nothing); use a shorter run dir, "
                         "e.g. run_dir = /run/hotswap")
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


@dataclass(frozen=True)
class Finding:
    verdict: str  # REFUSED (start or reload would refuse), or SUPPORTED
    message: str


REFUSED, SUPPORTED_VERDICT = "refused", "supported"


def review(cfg: Config) -> list[Finding]:
    """What `hotswap check` says: every refusal start makes, then those a reload of the
    running instance (if any) would make before forking (an ini change only a restart
    applies, an Emperor), then each option the ini sets that changes a swap and is supported."""
    host = RealHost(cfg)
    live = host.masters().live
    reload_refusals = host.config_drift(live) if live else []
    values = read_keys(cfg, [*KEYS, *SUPPORTED])
    found = [Finding(REFUSED, line) for line in
             [*problems(cfg, uwsgi_version(cfg.uwsgi), values), *reload_refusals]]
    found += [Finding(SUPPORTED_VERDICT, f"{key} = {values[key]}: {why}")
              for key, why in SUPPORTED.items() if values.get(key)]
    sockets = ", ".join(str(where) for where in cfg.sockets)
    found.append(Finding(SUPPORTED_VERDICT, f"sockets {sockets}: each is inherited by every "
                         f"generation; the kit probes {cfg.socket.address}"))
    return found
