"""Config drift: what a re-fork cannot apply, refused before anything forks.

A re-forked master re-reads srv.ini, but it inherits the serving generation's sockets, its
user and its FIFOs: a changed `http-socket` would be applied half-way (the new generation
serves on the old socket while the CLI probes the new path). `hotswap start` records what
the instance was started with (run/instance.json); the reload's preflight compares the ini
as it is now, and refuses a change to any of these keys, naming it, because only a restart
applies it. Without that record (an instance started before it existed, or a run dir
removed), the socket the serving master really listens on is read from /proc instead.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, read_keys
from ..protocol import endpoint
from ..system import files, procs

# Keys a re-forked master inherits instead of applying (sockets are bound, the user is set
# and the FIFOs are created once, by the first master).
INHERITED = ["http-socket", "socket", "https-socket", "uwsgi-socket", "shared-socket",
             "chmod-socket", "uid", "gid", "master-fifo", "fifo_live", "fifo_standby",
             "run_dir", "listen"]
SNAPSHOT_NAME = "instance.json"


@dataclass(frozen=True)
class Change:
    key: str
    was: str | None
    now: str | None

    def __str__(self) -> str:
        return f"{self.key} changed in the ini ({self.was or 'unset'} -> {self.now or 'unset'})"


def snapshot_path(cfg: Config) -> Path:
    return cfg.run_dir / SNAPSHOT_NAME


def record_start(cfg: Config, activated: tuple[str, ...] = ()) -> None:
    """Called by `hotswap start`: what this instance's first master reads, and the
    addresses systemd passed in (socket activation: a restart refuses nothing)."""
    document = {"ini": str(cfg.ini), "started_at": time.time(),
                "keys": read_keys(cfg, INHERITED), "activated": list(activated)}
    files.atomic_write(snapshot_path(cfg), json.dumps(document, indent=1) + "\n")


def as_started(cfg: Config) -> Config:
    """`cfg` with the sockets the running instance was started with, if the ini has moved
    them since: `status` asks the socket that serves, and names the edit as a notice, instead
    of paging for a socket nobody was ever told to open (docs/operations.md)."""
    try:
        started = json.loads(snapshot_path(cfg).read_text())["keys"]
        values = {key: [value] for key in endpoint.SOCKET_KEYS
                  if isinstance(value := started.get(key), str) and value}
        sockets = endpoint.from_values(values)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return cfg
    if not sockets or {s.address for s in sockets} == {s.address for s in cfg.sockets}:
        return cfg
    return dataclasses.replace(cfg, sockets=sockets)


def changes(cfg: Config, serving_master: int | None) -> list[Change]:
    """What the ini now says differently from what the running instance uses."""
    try:
        started = json.loads(snapshot_path(cfg).read_text())["keys"]
    except (OSError, ValueError, KeyError, TypeError):
        started = None
    if started is not None:
        now = read_keys(cfg, list(started))
        return [Change(key, was, now.get(key)) for key, was in started.items()
                if was != now.get(key)]
    if serving_master:
        return _unheld(cfg, serving_master)
    return []


def _unheld(cfg: Config, master: int) -> list[Change]:
    """The ini's sockets that the serving master does not hold (/proc), each a Change from
    what it does hold: a unix path, or a TCP port (0.0.0.0 and :: hold every address)."""
    unix, tcp = procs.unix_sockets(master), procs.tcp_listeners(master)
    if not unix and not tcp:
        return []  # /proc unreadable (another user's master): nothing to compare with
    unix.discard(str(cfg.stats_socket))  # not one a client connects to
    found = []
    for where in cfg.sockets:
        if where.is_tcp:
            host, port = where.address.rsplit(":", 1)
            anywhere = {f"0.0.0.0:{port}", f"[::]:{port}"}
            host = "127.0.0.1" if host in ("", "0.0.0.0") else host
            ok = bool({f"{host}:{port}", *anywhere} & tcp) or where.address in tcp
        else:
            ok = str(where.path) in unix if where.path else True
        if not ok:
            held = ", ".join(sorted(tcp if where.is_tcp else unix)) or None
            found.append(Change(where.key, held, where.address))
    return found


# uWSGI's Emperor hands each vassal the end of a socketpair in this variable (core/emperor.c)
EMPEROR_FD = "UWSGI_EMPEROR_FD"


def emperor_refusal(master: int) -> str | None:
    """Why a vassal of uWSGI's Emperor cannot be swapped by a re-fork, or None if `master`
    is no vassal. Seen by experiment (tests/test_options.py): after "1f" the old master
    retires, the new one reads EOF on the emperor pipe it inherited ("lost connection with my
    emperor !!!"), kills its workers, and the Emperor respawns the vassal cold."""
    if EMPEROR_FD not in procs.environ(master):
        return None
    info = procs.stat(master)
    emperor = f"pid {info.ppid}" if info else "its parent"
    return (f"master {master} is a vassal of uWSGI's Emperor ({emperor}): a re-forked vassal "
            "loses its emperor pipe and the Emperor restarts it cold, dropping requests; "
            "reload it the Emperor's way (touch its ini), or run it outside the Emperor with "
            "`hotswap start` (e.g. under systemd, deploy/hotswap.service)")


def socket_activated(cfg: Config) -> bool:
    """Whether the running instance's probed socket was passed in by systemd (recorded by
    `hotswap start`): a restart then queues connections instead of refusing them."""
    try:
        held = json.loads(snapshot_path(cfg).read_text()).get("activated") or []
    except (OSError, ValueError, AttributeError):
        return False
    return cfg.socket.address in held


def restart_hint(cfg: Config) -> str:
    """The one command that restarts this instance, and what a restart costs clients."""
    if socket_activated(cfg):
        return "`systemctl restart hotswap` (socket-activated: nothing is refused)"
    return "`hotswap stop && hotswap start`"


def refusal(found: list[Change], hint: str = "`hotswap stop && hotswap start`") -> str:
    return (f"{'; '.join(map(str, found))}: a reload cannot apply this (the new generation "
            f"inherits the running one's sockets, user and FIFOs); restart to apply it "
            f"({hint}), or undo the change and reload")
