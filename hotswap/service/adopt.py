"""`hotswap init --from THEIR.ini`: the kit's srv.ini made from an ini a team already runs.

Their app and tuning lines are kept as written (placeholders and all: the result is written
beside their ini, so %d still means their folder); the app is served through the kit's entry
point (`hotswap-app`, resolved by uWSGI itself from their module / wsgi-file / callable);
the kit's contract replaces what it must own (FIFOs, pidfile, stats, log, hooks); and what a
re-fork breaks (service/checks.py says why) is left out, commented, with the reason. Their
file is never written to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import find_uwsgi, read_all_values
from ..errors import ExitCode, HotswapError
from ..protocol.endpoint import SOCKET_KEYS
from ..system import files
from . import checks, scaffold

# keys the kit's contract owns: theirs is replaced, and the line says so
OWNED = {
    "master": "the kit runs a master", "master-fifo": "the kit's two FIFOs drive the swap",
    "pidfile": "the hand-over rewrites the pidfile", "stats": "a unix stats socket under run/",
    "logto": "reload shows the log it reads from log/", "daemonize": "start runs uWSGI in "
    "the foreground, or under systemd", "need-app": "a broken release must not fork",
    "vacuum": "vacuum unlinks the socket the new generation serves on",
    "die-on-term": "SIGTERM stops", "hook-accepting": "the kit's hand-over hook",
    "hook-pre-app": "the loading generation's OOM score", "log-reopen": "each generation "
    "reopens the log", "chdir": "the project's folder",
}
# list options: theirs are kept beside the kit's (another path on sys.path harms nothing)
ADDED = {"pythonpath"}
# their app keys: turned into hotswap-app (the kit's entry point wraps the app)
APP_KEYS = ["module", "wsgi-file", "wsgi", "callable", "chdir"]
SECTION = re.compile(r"^\s*\[(?P<name>[^\]]+)\]\s*$")
LINE = re.compile(r"^\s*(?P<key>[A-Za-z0-9_.-]+)\s*=\s*(?P<value>.*?)\s*$")


@dataclass
class Adopted:
    path: Path
    changes: list[str] = field(default_factory=list)  # one line each: what changed, why
    refused: list[str] = field(default_factory=list)  # left out: what a re-fork breaks


def app_of(values: dict[str, list[str]], folder: Path) -> str:
    """hotswap-app ("module:callable") from their module, or wsgi-file + callable."""
    first = {key: (found[0] if found else None) for key, found in values.items()}
    callable_ = first.get("callable") or "application"
    module = first.get("module") or first.get("wsgi")
    if module:
        return module if ":" in module else f"{module}:{callable_}"
    script = first.get("wsgi-file")
    if not script:
        raise HotswapError("the ini names no app (module, wsgi or wsgi-file): nothing to serve",
                           ExitCode.CONFIG)
    base = Path(first.get("chdir") or folder)
    path = Path(script) if Path(script).is_absolute() else base / script
    try:
        relative = path.resolve().relative_to(base.resolve())
    except ValueError:
        raise HotswapError(f"wsgi-file {script} is outside {base}: name it as `module = ...`",
                           ExitCode.CONFIG) from None
    return ".".join(relative.with_suffix("").parts) + f":{callable_}"


def their_lines(text: str) -> list[tuple[str, str]]:
    """(key, value) of each line of their [uwsgi] section, as written."""
    found, inside = [], False
    for raw in text.splitlines():
        if match := SECTION.match(raw):
            inside = match["name"].strip() == "uwsgi"
        elif inside and (match := LINE.match(raw)) and not raw.lstrip().startswith((";", "#")):
            found.append((match["key"], match["value"]))
    return found


def refusal(key: str, value: str) -> str | None:
    """Why a re-fork breaks with `key = value` (the reason start gives), or None."""
    if key in ("lazy-apps", "lazy") and value.lower() in checks.TRUE:
        return "the app must import in the master, so a broken release fails at once"
    if key == "threads" and value.isdigit() and int(value) > 1:
        return ("the hand-over's pause never wakes an old worker's threads: the old "
                "generation would never exit; use processes")
    if key in checks.GATEWAYS:
        return "a re-forked master's router cannot bind the port the old one holds"
    if key == "emperor":
        return "the kit swaps one instance; run each vassal with `hotswap start`"
    return None


def adopt(their: Path, force: bool = False) -> Adopted:
    """Write THEIR-stem.hotswap.ini beside `their`; never over their file."""
    their = their.absolute()
    try:
        text = their.read_text()
    except OSError as exc:
        raise HotswapError(f"cannot read {their}: {exc.strerror}", ExitCode.CONFIG) from None
    out = their.with_name(f"{their.stem}.hotswap.ini")
    if out.exists() and not force:
        raise HotswapError(f"{out} already exists; --force overwrites it", ExitCode.CONFIG)
    values = read_all_values(find_uwsgi(), their, APP_KEYS)
    app = app_of(values, their.parent)
    elsewhere = values.get("chdir") and Path(values["chdir"][0]).resolve() != their.parent
    owned = {key: why for key, why in OWNED.items()
             if not (elsewhere and key == "chdir")}  # their app's folder, not the ini's
    result = Adopted(out, [f"app: served through the kit's entry point as hotswap-app = {app} "
                           "(its health path, smoke checks, X-Generation)"])
    ini = scaffold.render_ini(app, their.parent)
    kit = dict(their_lines(ini))
    kept = []
    for key, value in their_lines(text):
        why = refusal(key, value)
        if why:
            result.refused.append(f"{key} = {value}: {why}")
            kept.append(f"; hotswap: left out ({why}): {key} = {value}")
        elif key in owned and kit.get(key) == value:
            pass  # theirs already says what the kit's contract does
        elif key in owned:
            result.changes.append(f"{key} = {value} -> the kit's contract: {owned[key]}")
        elif key not in APP_KEYS or (elsewhere and key == "chdir"):
            kept.append(f"{key} = {value}")
    if elsewhere:
        kept.append(f"pythonpath = {values['chdir'][0]}")  # where hotswap-app imports from
    keys = {line.split(" ", 1)[0] for line in kept if not line.startswith(";")}
    if keys & set(SOCKET_KEYS):  # their sockets replace the kit's unix http-socket
        ini = re.sub(r"^http-socket = .*\n", "", ini, flags=re.M)
    # their tuning replaces the kit's default for the same key (a repeated scalar is confusing)
    ini = "".join(line for line in ini.splitlines(keepends=True)
                  if (LINE.match(line) or {"key": None})["key"] not in keys - set(owned) - ADDED)
    header = f"; ======== from {their.name} (their app's own lines, as written) ========\n"
    files.atomic_write(out, ini + "\n" + header + "".join(f"{line}\n" for line in kept))
    return result
