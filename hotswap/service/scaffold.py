"""`hotswap init`: the kit's srv.ini and a systemd unit for an existing WSGI project.

The generated srv.ini serves `module = hotswap.inside.entry:application`, which imports the app
named in `hotswap-app` and wraps it in the kit's middleware (hotswap/inside/entry.py,
hotswap/inside/wsgi.py): the user's module is not edited, and there is no generated Python file
to keep in step with the kit. The unit is hotswap/templates/hotswap.service rendered for the
project's folder, its venv's `hotswap` and the service user.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExitCode, HotswapError
from ..inside.wsgi import DEFAULT_HEALTH_PATH, EntryError, parse_target
from ..system import files

# package data (pyproject.toml), so a wheel or a plain `pip install` has it too;
# deploy/hotswap.service is a link to it for install-systemd.sh
UNIT_TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "hotswap.service"
SOCKET_TEMPLATE = UNIT_TEMPLATE.with_name("hotswap.socket")  # deploy/hotswap.socket links here
INI_NAME = "srv.ini"
UNIT_NAME = "hotswap.service"
SOCKET_NAME = "hotswap.socket"
# folders systemd's PrivateTmp=/ProtectHome= hide from the service
HIDDEN_FROM_UNIT = ("/tmp/", "/var/tmp/", "/home/", "/root/")

INI_TEMPLATE = """\
; srv.ini for @APP@, written by `hotswap init` (hotswap, zero-downtime swaps under uWSGI).
;
; Start with `hotswap start` (never bare uwsgi), swap a new release in with `hotswap
; reload`, see it with `hotswap status`. Lines under "the kit's contract" are what makes a
; swap safe: `hotswap start` refuses an ini that breaks them. Lines under "the app's to
; tune" are yours.

[uwsgi]
; ======== the kit's contract ========
; -- paths: everything derives from these two; %d is this file's folder --
run_dir = %drun
log_dir = %dlog
fifo_live = %(run_dir)/0.fifo
fifo_standby = %(run_dir)/1.fifo
; slot 0 is the live FIFO, slot 1 where a master waits to retire: the order matters
master-fifo = %(fifo_live)
master-fifo = %(fifo_standby)
pidfile = %(run_dir)/master.pid
; a unix stats socket: the newest master re-binds it (a TCP one breaks the re-fork)
stats = %(run_dir)/stats.sock
http-socket = %(run_dir)/http.sock
chmod-socket = 660
logto = %(log_dir)/uwsgi.log
; request lines would bury the startup log that `hotswap reload` shows on failure
disable-logging = true
log-date = true
; each new generation opens logto by its path: after a rotation by rename, the next swap
; writes where the CLI reads
log-reopen = true
; while a generation loads, the OOM killer picks it first, never the one serving (the
; accepting hook lowers it again before the commit); safeexec: a failure loses nothing
loading_oom_score_adj = 1000
hook-pre-app = safeexec:echo %(loading_oom_score_adj) > /proc/$PPID/oom_score_adj
; and at a low CPU and I/O priority (this many nice levels lower, 0 turns it off), so the
; generation that serves keeps the CPU; the accepting hook restores the service's own
hotswap-loading-nice = 10
import = hotswap.inside.loading

; -- the app: imported once, in the master, before the workers fork (no lazy-apps) --
chdir = %d
pythonpath = %d
; hotswap.inside.entry imports hotswap-app ("module:callable", or "module:factory()") and wraps
; it in the kit's middleware: the health path, X-Generation / X-Master-Pid, smoke checks
module = hotswap.inside.entry:application
hotswap-app = @APP@
; what `hotswap reload`, `status` and `probe` ask; the middleware answers it
hotswap-health = @HEALTH@
; a release that cannot import (or fails a smoke check) must not spawn workers
need-app = true
master = true
; SIGTERM stops (uWSGI 2.0 would otherwise treat it as "brutal reload")
die-on-term = true
thunder-lock = true
; vacuum would unlink the inherited, still-live socket when the old master exits
vacuum = false
; Runs in every worker before it accepts: one worker hands over (systemd's main pid, the
; pidfile, "p" then "q" to the old master); until then no worker of the new generation
; accepts. safeexec: a failing hook must not destroy the new generation.
hook-accepting = @HOOK@

; ======== the app's to tune ========
; smoke requests, run through the app at import before workers fork: one that fails fails
; the release ("GET /path -> 200", several separated by "|"). Name a real one of yours.
hotswap-smoke = GET @HEALTH@ -> 200
; per-generation request metrics at this path, summed over the workers (the `metrics` extra)
; hotswap-metrics = /metrics
processes = 4
; threads: keep 1 (`hotswap check` says why more are refused)
; the largest request header block a client may send, bytes
buffer-size = 8192
; connections waiting while nobody accepts (the ~0.25 s hand-over pause included)
listen = 1024
; how long a retiring worker may finish its in-flight request, seconds
worker-reload-mercy = 60
; harakiri = 60 (kill a worker stuck in one request this long; above your slowest request)
skip-atexit-teardown = true
auto-procname = true
procname-prefix-spaced = @NAME@
"""


# the same hook line as the repo's srv.ini
HOOK = ("safeexec:$(HOTSWAP_PYTHON) -m hotswap.inside.handover --run-dir %(run_dir) "
        "--fifo-standby %(fifo_standby) --pidfile %(pidfile) --log-file %(logto)")


@dataclass
class Written:
    """What `init` wrote, and what the operator should know about it."""

    paths: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _hotswap_command() -> Path:
    beside = Path(sys.executable).parent / "hotswap"
    found = beside if beside.exists() else shutil.which("hotswap")
    return Path(found or beside).absolute()


def render_ini(app: str, project: Path, health_path: str = DEFAULT_HEALTH_PATH) -> str:
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in project.name) or "hotswap"
    return (INI_TEMPLATE.replace("@APP@", app).replace("@NAME@", name).replace("@HOOK@", HOOK)
            .replace("@HEALTH@", health_path))


def render_unit(template: str, project: Path, user: str, app: str) -> str:
    """deploy/hotswap.service for this project: its folder instead of @PREFIX@/app, this
    venv's hotswap, the user; the run/ and log/ folders srv.ini names made writable."""
    # the template's own note on how install-systemd.sh renders it does not apply here
    lines = template.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.startswith("[")), len(lines))
    unit = "".join([line for line in lines[:first] if not (
        "install-systemd" in line or "@PREFIX@ =" in line or "@USER@ =" in line)]
        + lines[first:])
    unit = unit.replace("@PREFIX@/venv/bin/hotswap", str(_hotswap_command()))
    unit = unit.replace("@PREFIX@/app", str(project)).replace("@USER@", user)
    header = (f"# Rendered by `hotswap init` for {project} (hotswap-app = {app}), user {user}.\n"
              f"# Install: cp {project / UNIT_NAME} /etc/systemd/system/ && "
              "systemctl daemon-reload\n#\n")
    writable = (f"# hotswap init: srv.ini keeps run_dir and log_dir in the project "
                f"(ProtectSystem=strict\n# makes the rest read-only)\n"
                f"ReadWritePaths={project / 'run'} {project / 'log'}\n\n")
    unit = header + unit.replace("\n[Install]", "\n" + writable + "[Install]", 1)
    left = sorted(set(re.findall(r"@[A-Z_]+@", unit)))
    if left:
        raise HotswapError(f"the unit template has placeholders init does not fill: "
                           f"{', '.join(left)}", ExitCode.CONFIG)
    return unit


def with_socket_unit(ini: str, unit: str, template: str, address: str, user: str
                     ) -> tuple[str, str, str]:
    """srv.ini, hotswap.service and hotswap.socket for a socket systemd holds at `address`
    (install-systemd.sh --socket's edits): the ini's http-socket names the same string as
    ListenStream= (uWSGI matches the passed fd to its line by address), with `protocol = http`
    (an adopted socket speaks the ini's protocol, uwsgi by default), and the service needs the
    socket unit."""
    ini = re.sub(r"(?m)^http-socket = .*$", f"http-socket = {address}\nprotocol = http", ini,
                 count=1)
    unit = unit.replace("\n[Unit]\n", "\n[Unit]\n# hotswap init --socket: systemd holds the "
                        "listening socket (hotswap.socket)\nRequires=hotswap.socket\n"
                        "After=hotswap.socket\n", 1)
    sock = re.sub(r"(?m)^ListenStream=.*$", f"ListenStream={address}", template, count=1)
    sock = sock.replace("@USER@", user).replace("@PREFIX@", "PREFIX")
    return ini, unit, sock


def init(project: Path, app: str, user: str | None = None, force: bool = False,
         health_path: str = DEFAULT_HEALTH_PATH, template: Path = UNIT_TEMPLATE,
         socket: str | None = None) -> Written:
    """Write srv.ini and hotswap.service into `project` (and hotswap.socket, systemd holding
    the listening socket at `socket`: "unix" for the ini's run/http.sock, or HOST:PORT);
    refuse to overwrite unless `force`."""
    try:
        module, _, _ = parse_target(app)
    except EntryError as exc:
        raise HotswapError(str(exc), ExitCode.CONFIG) from None
    if not health_path.startswith("/") or any(c.isspace() or c in "|%" for c in health_path):
        raise HotswapError(f"--health-path must be a path such as /healthz, not {health_path!r}",
                           ExitCode.CONFIG)
    if socket not in (None, "unix") and not re.fullmatch(r"[^\s:/]+:\d{1,5}", socket):
        raise HotswapError(f"--socket-tcp needs HOST:PORT (e.g. 127.0.0.1:8080), not {socket!r}",
                           ExitCode.CONFIG)
    project = project.absolute()
    if not project.is_dir():
        raise HotswapError(f"no such project folder: {project}", ExitCode.CONFIG)
    user = user or pwd.getpwuid(os.geteuid()).pw_name
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise HotswapError(f"no such user: {user}", ExitCode.CONFIG) from None
    try:
        unit_template = template.read_text()
    except OSError as exc:
        raise HotswapError(f"cannot read the unit template {template}: {exc.strerror}",
                           ExitCode.CONFIG) from None
    targets = {project / INI_NAME: render_ini(app, project, health_path),
               project / UNIT_NAME: render_unit(unit_template, project, user, app)}
    if socket is not None:
        address = str(project / "run" / "http.sock") if socket == "unix" else socket
        ini, unit, sock = with_socket_unit(targets[project / INI_NAME],
                                           targets[project / UNIT_NAME],
                                           SOCKET_TEMPLATE.read_text(), address, user)
        targets = {project / INI_NAME: ini, project / UNIT_NAME: unit, project / SOCKET_NAME: sock}
    existing = [str(path) for path in targets if path.exists()]
    if existing and not force:
        raise HotswapError(f"{', '.join(existing)} already exist(s); --force overwrites",
                           ExitCode.CONFIG)
    written = Written()
    relative = Path(*module.split("."))
    if not any((project / candidate).exists() for candidate in
               (relative.with_suffix(".py"), relative / "__init__.py")):
        written.warnings.append(f"no {relative}.py or {relative}/__init__.py in {project}: "
                                f"{module} must be importable by the service's Python")
    for path, text in targets.items():
        files.atomic_write(path, text)
        written.paths.append(path)
    for folder in (project / "run", project / "log"):
        folder.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            os.chown(folder, account.pw_uid, account.pw_gid)
    if f"{project}/".startswith(HIDDEN_FROM_UNIT):
        written.warnings.append(f"{project} is under {'/'.join(str(project).split('/')[:2])}/, "
                                "which the unit's PrivateTmp=/ProtectHome= hide from the "
                                "service: move the project (e.g. to /srv) before installing it")
    return written
