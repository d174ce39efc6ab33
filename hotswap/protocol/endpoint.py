"""A socket the service listens on, as its ini names it: a unix path or host:port, and the
protocol spoken on it (HTTP for `http-socket`, the uwsgi protocol for `socket` and
`uwsgi-socket`, what nginx's `uwsgi_pass` speaks).

Every one of them is bound once, by the first master, and inherited by each re-forked
master, so all of them survive a swap. The kit probes one (Config.socket): the one named by
the ini's `hotswap-socket`, else the first `http-socket`, else the first uwsgi-protocol
socket; HTTP is preferred because it is what a health checker or a load balancer asks.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

HTTP = "http"
UWSGI = "uwsgi"

# ini key -> the protocol spoken on the sockets it binds (in the kit's order of preference)
SOCKET_KEYS = {"http-socket": HTTP, "socket": UWSGI, "uwsgi-socket": UWSGI}
# names the socket the kit probes, when the rule above would pick another one
PROBE_KEY = "hotswap-socket"


@dataclass(frozen=True)
class Endpoint:
    address: str  # a unix socket's path, or host:port
    protocol: str = HTTP  # HTTP or UWSGI
    key: str = "http-socket"  # the ini key that binds it

    @classmethod
    def parse(cls, value: str, key: str = "http-socket") -> Endpoint:
        """`value` as uWSGI reads it: a path, `@name` (abstract), or `[host]:port`. uWSGI
        binds ":8000" on every address; the kit reaches it on 127.0.0.1."""
        address = value.strip().split(",")[0]  # uWSGI allows ",modifier" suffixes
        if address.startswith(":"):
            address = "127.0.0.1" + address
        return cls(address, SOCKET_KEYS.get(key, HTTP), key)

    @property
    def is_tcp(self) -> bool:
        host, sep, port = self.address.rpartition(":")
        return bool(sep) and port.isdigit() and not self.address.startswith(("/", ".", "@"))

    @property
    def path(self) -> Path | None:
        """The unix socket's file (None for TCP and abstract sockets): what start clears."""
        if self.is_tcp or self.address.startswith("@"):
            return None
        return Path(self.address)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        host = host.strip("[]")
        return ("127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host,
                int(port))

    def connect(self, timeout: float) -> socket.socket:
        """A connected stream socket; OSError (incl. TimeoutError) when nobody accepts."""
        if self.is_tcp:
            return socket.create_connection(self.host_port, timeout=timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            sock.connect(target)
        except OSError:
            sock.close()
            raise
        return sock

    def accepts(self, timeout: float = 1.0) -> bool:
        """True if something accepts connections on it."""
        try:
            self.connect(timeout).close()
            return True
        except OSError:
            return False

    def exists(self) -> bool:
        """A unix socket's file exists; a TCP port has no file, so it always 'exists'."""
        return self.path.exists() if self.path else True

    def __str__(self) -> str:
        return self.address if self.protocol == HTTP else f"{self.address} (uwsgi protocol)"


def from_values(values: dict[str, list[str]], named: str | None = None) -> tuple[Endpoint, ...]:
    """Every socket the ini binds (values: ini key -> every value of it), the probed one
    first: the one `named` (hotswap-socket), else in SOCKET_KEYS' order."""
    found = [Endpoint.parse(value, key) for key in SOCKET_KEYS for value in values.get(key, [])]
    if named:
        chosen = [item for item in found if item.address == Endpoint.parse(named).address]
        if not chosen:
            raise ValueError(f"{PROBE_KEY} = {named} names none of the ini's sockets "
                             f"({', '.join(item.address for item in found) or 'none'})")
        found.remove(chosen[0])
        found.insert(0, chosen[0])
    return tuple(found)
