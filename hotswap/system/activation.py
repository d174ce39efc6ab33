"""systemd socket activation: which listening sockets a unit (deploy/hotswap.socket) passed in.

systemd hands a service its sockets as fds 3.. with LISTEN_FDS=N and LISTEN_PID=<the pid it
started>. `hotswap start` execs uWSGI (same pid), so uWSGI sees them too. What uWSGI 2.0.31
does with them, read in core/setup_utils.c (uwsgi_setup_systemd) and seen by experiment: it
adds each fd as a NEW socket with the default protocol (the uwsgi protocol, unless the ini
sets `protocol = http`), and the ini's `http-socket` line naming the same address is then not
bound again; a re-forked master (UWSGI_RELOADS set) skips LISTEN_FDS and maps the inherited
fd to that line by its address. Its `listen` and `chmod-socket` do not apply to an adopted
socket: the socket unit's Backlog= and SocketMode= do.

The socket itself belongs to systemd: a connect() to it succeeds while no uWSGI runs (the
kernel queues it), and its file must not be unlinked as a dead instance's leftover.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

FIRST_FD = 3  # SD_LISTEN_FDS_START


def activated_addresses(env: Mapping[str, str] | None = None, pid: int | None = None
                        ) -> list[str]:
    """The addresses (a unix path, or host:port) of the sockets systemd passed to `pid`
    (this process by default); empty when it passed none."""
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    try:
        if int(env.get("LISTEN_PID", "")) != pid:
            return []
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    found = []
    for fd in range(FIRST_FD, FIRST_FD + max(count, 0)):
        address = _address(fd)
        if address:
            found.append(address)
    return found


def _address(fd: int) -> str | None:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        name = sock.getsockname()
    except OSError:
        return None
    finally:
        sock.close()
    if isinstance(name, tuple):  # AF_INET, AF_INET6
        return f"{name[0]}:{name[1]}"
    if isinstance(name, bytes):  # an abstract unix address
        return "@" + name[1:].decode(errors="replace")
    return name or None
