"""Every path the kit uses, read once from srv.ini, resolved by uWSGI itself.

uWSGI's `--get KEY` prints an option's value after its own placeholder expansion (%d,
%(run_dir), ...), so the CLI and the server can never disagree about where the FIFOs, the
pidfile or the socket are.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import ExitCode, HotswapError
from .inside.wsgi import DEFAULT_HEALTH_PATH, HEALTH_PATH_KEY
from .protocol import endpoint
from .protocol.endpoint import Endpoint


def here(text: str) -> str:
    """Human output names paths under the current folder relatively (`run/0.fifo`), as
    they are typed from the repo; --json and the state files keep them absolute."""
    prefix = os.path.join(os.getcwd(), "")
    return text.replace(prefix, "") if prefix != "/" else text


# defaults the CLI's options show: here, not beside their users, so `--help` imports no more
DEFAULT_GRACE = 25.0  # seconds from SIGTERM to SIGKILL of what still runs; Kubernetes: 30
DEFAULT_KEEP = 5  # releases kept after a deploy


# srv.ini key -> Config field. Custom keys (run_dir, fifo_*) are srv.ini placeholders.
REQUIRED_KEYS = {
    "run_dir": "run_dir",
    "fifo_live": "fifo_live",
    "fifo_standby": "fifo_standby",
    "pidfile": "pidfile",
    "stats": "stats_socket",
    "logto": "log_file",
}
# srv.ini key -> Config field, for keys with a default (the field's default when unset).
OPTIONAL_KEYS = {
    HEALTH_PATH_KEY: "health_path",
    "hotswap-metrics-file": "metrics_file",  # swap/metrics.py; default <run_dir>/hotswap.prom
}


@dataclass(frozen=True)
class Config:
    ini: Path
    uwsgi: Path
    run_dir: Path
    fifo_live: Path  # slot 0: the serving master reads it
    fifo_standby: Path  # slot 1: where the old master waits to be retired during a swap
    pidfile: Path
    stats_socket: Path
    log_file: Path
    # every socket the ini binds (each inherited by a re-fork), the one the kit probes first
    sockets: tuple[Endpoint, ...] = ()
    # what reload, status and probe GET (hotswap/inside/wsgi.py)
    health_path: str = DEFAULT_HEALTH_PATH
    # where each swap writes its Prometheus textfile (None: <run_dir>/hotswap.prom)
    metrics_file: Path | None = None

    @property
    def socket(self) -> Endpoint:
        """The socket reload, status and probe ask (protocol/endpoint.py states the rule)."""
        return self.sockets[0]

    @property
    def http_socket(self) -> Path:
        """The probed socket's address as a path (kept for callers written when it was the
        only socket the kit knew); probe.get() reads a host:port in it as TCP."""
        return Path(self.socket.address)

    @property
    def lock_file(self) -> Path:
        return self.run_dir / "reload.lock"

    @property
    def last_reload_file(self) -> Path:
        return self.run_dir / "last-reload.json"


def find_uwsgi() -> Path:
    """The uwsgi binary installed beside this Python (the venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "uwsgi"
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("uwsgi")
    if not found:
        raise HotswapError(
            "no uwsgi binary beside this Python or on PATH (run `make venv`)", ExitCode.CONFIG
        )
    return Path(found)


def _uwsgi_get(uwsgi: Path, ini: Path, keys: list[str], set_ph: str | None = None) -> list[str]:
    args = [str(uwsgi), "--ini", str(ini)]
    if set_ph:
        args += ["--set-ph", set_ph]
    for key in keys:
        args += ["--get", key]
    # uWSGI sends "STATUS=initializing uWSGI" to $NOTIFY_SOCKET even for --get, which
    # would overwrite the unit's status line each time the CLI reads its config.
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=10, check=False, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HotswapError(f"cannot run {uwsgi} to read {ini}: {exc}", ExitCode.CONFIG) from exc
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["no detail"])[-1]
        raise HotswapError(f"uwsgi cannot parse {ini}: {detail}", ExitCode.CONFIG)
    return [line for line in done.stdout.splitlines() if line.strip()]


# release.py reads a staged release's srv.ini with it (same parsing, same errors)
uwsgi_get = _uwsgi_get


# Asked between keys: `--get` prints nothing for an unset key, so values are told apart by
# this placeholder's value, not by their position.
_SEPARATOR = "@@hotswap@@"


def read_all_values(uwsgi: Path, ini: Path, keys: list[str]) -> dict[str, list[str]]:
    """Every value uWSGI resolves for each of `keys` in `ini` ([] if unset), in one run."""
    asked = [name for key in keys for name in (key, "hotswap_separator")]
    lines = _uwsgi_get(uwsgi, ini, asked, set_ph=f"hotswap_separator={_SEPARATOR}")
    values: dict[str, list[str]] = {}
    pending: list[str] = []
    keys_left = iter(keys)
    for line in lines:
        if line == _SEPARATOR:
            values[next(keys_left)] = pending
            pending = []
        else:
            pending.append(line)
    return values


def read_values(uwsgi: Path, ini: Path, keys: list[str]) -> dict[str, str | None]:
    """What uWSGI resolves for each of `keys` in `ini` (None if unset; the first value of
    a repeated key), in one uwsgi run."""
    return {key: (found[0] if found else None)
            for key, found in read_all_values(uwsgi, ini, keys).items()}


def read_keys(cfg: Config, keys: list[str]) -> dict[str, str | None]:
    """read_values() for the ini of `cfg`, with its uwsgi."""
    return read_values(cfg.uwsgi, cfg.ini, keys)


def load(ini: str | os.PathLike) -> Config:
    """Read the kit's paths from `ini`; a HotswapError says exactly what is wrong."""
    ini_path = Path(ini).absolute()
    if not ini_path.exists():
        raise HotswapError(f"no such ini file: {ini_path}", ExitCode.CONFIG)
    if not ini_path.is_file():
        raise HotswapError(f"not a file: {ini_path}", ExitCode.CONFIG)
    if not os.access(ini_path, os.R_OK):
        raise HotswapError(f"cannot read {ini_path}: permission denied", ExitCode.CONFIG)
    uwsgi = find_uwsgi()
    every = read_all_values(uwsgi, ini_path, [*REQUIRED_KEYS, *OPTIONAL_KEYS,
                                              *endpoint.SOCKET_KEYS, endpoint.PROBE_KEY])
    values = {key: (found[0] if found else None) for key, found in every.items()}
    missing = [key for key in REQUIRED_KEYS if not values.get(key)]
    if not any(every.get(key) for key in endpoint.SOCKET_KEYS):
        missing.append(" or ".join(endpoint.SOCKET_KEYS))
    if missing:
        raise HotswapError(
            f"{ini_path} does not set {', '.join(missing)} (see the srv.ini shipped with "
            f"hotswap; for an ini of your own: `hotswap init --from {ini_path.name}`)",
            ExitCode.CONFIG,
        )
    try:
        sockets = endpoint.from_values(every, values.get(endpoint.PROBE_KEY))
    except ValueError as exc:
        raise HotswapError(f"{ini_path}: {exc}", ExitCode.CONFIG) from exc
    fields: dict = {field: Path(values[key]) for key, field in REQUIRED_KEYS.items()}
    fields.update({field: values[key] for key, field in OPTIONAL_KEYS.items() if values.get(key)})
    if "metrics_file" in fields:  # relative: to the ini's folder, as uWSGI's %d would be
        fields["metrics_file"] = ini_path.parent / fields["metrics_file"]
    return Config(ini=ini_path, uwsgi=uwsgi, sockets=sockets, **fields)
