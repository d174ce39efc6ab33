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
from .wsgi import DEFAULT_HEALTH_PATH, HEALTH_PATH_KEY

# srv.ini key -> Config field. Custom keys (run_dir, fifo_*) are srv.ini placeholders.
REQUIRED_KEYS = {
    "run_dir": "run_dir",
    "fifo_live": "fifo_live",
    "fifo_standby": "fifo_standby",
    "pidfile": "pidfile",
    "stats": "stats_socket",
    "http-socket": "http_socket",
    "logto": "log_file",
}
# srv.ini key -> Config field, for keys with a default (the field's default when unset).
OPTIONAL_KEYS = {
    HEALTH_PATH_KEY: "health_path",
}
# `--get` prints nothing for an unset key and only the first value of a repeated one: a
# placeholder of our own between two keys' answers tells them apart in one call.
SEPARATOR_KEY = "hotswap-get-separator"
SEPARATOR = "--hotswap-get-separator--"


@dataclass(frozen=True)
class Config:
    ini: Path
    uwsgi: Path
    run_dir: Path
    fifo_live: Path  # slot 0: the serving master reads it
    fifo_standby: Path  # slot 1: where the old master waits to be retired during a swap
    pidfile: Path
    stats_socket: Path
    http_socket: Path
    log_file: Path
    health_path: str = DEFAULT_HEALTH_PATH  # what reload, status and probe GET (hotswap/wsgi.py)

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


def _uwsgi_output(uwsgi: Path, ini: Path, extra: list[str]) -> str:
    """stdout of `uwsgi --ini INI EXTRA...` (a --get or --version call: it exits at once)."""
    args = [str(uwsgi), "--ini", str(ini), *extra]
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
    return done.stdout


def _uwsgi_get(uwsgi: Path, ini: Path, keys: list[str]) -> list[str]:
    extra = [arg for key in keys for arg in ("--get", key)]
    return [line for line in _uwsgi_output(uwsgi, ini, extra).splitlines() if line.strip()]


def read_values(uwsgi: Path, ini: Path, keys: list[str]) -> dict[str, str | None]:
    """Each key's value as uWSGI sees it (placeholders expanded), None when unset; one call.
    A repeated key gives its first value."""
    extra = ["--set-placeholder", f"{SEPARATOR_KEY}={SEPARATOR}"]
    for key in keys:
        extra += ["--get", key, "--get", SEPARATOR_KEY]
    answers: list[list[str]] = [[]]
    for line in _uwsgi_output(uwsgi, ini, extra).splitlines():
        if line == SEPARATOR:
            answers.append([])
        else:
            answers[-1].append(line)
    return {key: (answer[0] if answer else None)
            for key, answer in zip(keys, answers, strict=False)}


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
    values = read_values(uwsgi, ini_path, [*REQUIRED_KEYS, *OPTIONAL_KEYS])
    missing = [key for key in REQUIRED_KEYS if not values[key]]
    if missing:
        raise HotswapError(
            f"{ini_path} does not set {', '.join(missing)} (see the srv.ini shipped with hotswap)",
            ExitCode.CONFIG,
        )
    fields: dict = {field: Path(values[key]) for key, field in REQUIRED_KEYS.items()}
    fields.update({field: values[key] for key, field in OPTIONAL_KEYS.items() if values[key]})
    return Config(ini=ini_path, uwsgi=uwsgi, **fields)
