"""sd_notify, including the BARRIER=1 handshake, with no libsystemd dependency.

`hotswap start` moves systemd's NOTIFY_SOCKET to HOTSWAP_NOTIFY_SOCKET before exec'ing
uWSGI, so uWSGI's own notifications (READY=1 when its master, not its workers, is up) stay
out of the way and the kit alone tells systemd what is serving.
"""

from __future__ import annotations

import os
import select
import socket

ENV_VARS = ("HOTSWAP_NOTIFY_SOCKET", "NOTIFY_SOCKET")
BARRIER_TIMEOUT = 5.0


def socket_path() -> str | None:
    for name in ENV_VARS:
        if value := os.environ.get(name):
            return value
    return None


def _address(path: str) -> str:
    return "\0" + path[1:] if path.startswith("@") else path


def notify(message: str, barrier: bool = True, path: str | None = None) -> bool:
    """Send `message` (e.g. "MAINPID=42\\nREADY=1") to systemd.

    With barrier=True, also send BARRIER=1 with a pipe's write end and wait until systemd
    closes it: by then every earlier message has been processed. That ordering is what makes
    the main-pid hand-over safe (systemd must know the new master before the old one exits).
    Returns False when not running under systemd.
    """
    path = path or socket_path()
    if not path:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(_address(path))
        sock.sendall(message.encode())
        if barrier:
            read_end, write_end = os.pipe()
            try:
                socket.send_fds(sock, [b"BARRIER=1"], [write_end])
                os.close(write_end)
                write_end = -1
                # systemd closes its copy once the barrier is processed: we then see EOF/HUP.
                ready, _, _ = select.select([read_end], [], [], BARRIER_TIMEOUT)
                if not ready:
                    raise TimeoutError(f"systemd did not confirm BARRIER=1 in {BARRIER_TIMEOUT}s")
            finally:
                os.close(read_end)
                if write_end >= 0:
                    os.close(write_end)
    return True
