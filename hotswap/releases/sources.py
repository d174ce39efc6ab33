"""Where announcements come from: PostgreSQL LISTEN/NOTIFY, Redis pub/sub, Redis Streams.

Each source is one small class with `name` (for log lines: no password), `errors` (what a
lost server raises) and `session(tick)`: connect, yield the catch-up first (what may have
been announced while nobody listened), then live messages, and None after each idle
`tick` seconds so the loop can run what is due. `deliveries()` wraps a session in the
reconnect loop, so a restarted server costs one log line and a catch-up, never a release.

Delivery promises (docs/releases.md, "Which source"):
    postgres://USER@HOST:PORT/DB       a row INSERTed into hotswap_releases fires pg_notify
        (SCHEMA below); NOTIFYs sent while disconnected are lost, so each (re)connect reads
        the newest row: the table is the source of truth.
    redis://HOST:PORT/CHANNEL          PUBLISH CHANNEL MSG, with SET CHANNEL:latest MSG;
        pub/sub drops what nobody hears, so each (re)connect reads CHANNEL:latest.
    redis-stream://HOST:PORT/STREAM?group=G   XADD STREAM * msg MSG; one consumer group per
        host (default hotswap-HOSTNAME) keeps what it has not acknowledged; each (re)connect
        re-reads its pending entries; an entry is acknowledged after its action (or refusal).

The client libraries are the `sources` extra (psycopg 3, redis-py), imported only here.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import ExitCode, HotswapError

TABLE = CHANNEL = "hotswap_releases"

# The "database trigger": what a publisher's INSERT runs. Applied by whoever owns the schema
# (not the watcher, which only reads: GRANT SELECT on the table to the watcher's role).
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    seq bigserial PRIMARY KEY,
    body text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION {TABLE}_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', NEW.body);
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE OR REPLACE TRIGGER {TABLE}_notify AFTER INSERT ON {TABLE}
    FOR EACH ROW EXECUTE FUNCTION {TABLE}_notify();
"""


@dataclass(frozen=True)
class Delivery:
    raw: bytes
    where: str  # the source and the message's place in it, for log lines
    ack: Callable[[], None] = lambda: None
    catchup: bool = False  # read on (re)connect: a repeat of what was done is expected


class Source(Protocol):
    name: str
    errors: tuple[type[BaseException], ...]

    def session(self, tick: float) -> Iterator[Delivery | None]: ...


class Postgres:
    def __init__(self, url: str) -> None:
        import psycopg  # the `sources` extra

        self.url, self.psycopg = url, psycopg
        parts = urlsplit(url)
        self.name = f"postgres://{parts.hostname}:{parts.port or 5432}{parts.path}"
        self.errors = (psycopg.OperationalError, psycopg.InterfaceError)

    def session(self, tick: float) -> Iterator[Delivery | None]:
        with self.psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"LISTEN {CHANNEL}")  # before the catch-up: nothing falls between
            row = conn.execute(f"SELECT seq, body FROM {TABLE} ORDER BY seq DESC LIMIT 1"
                               ).fetchone()
            if row:
                yield Delivery(row[1].encode(), f"{self.name} row {row[0]}", catchup=True)
            while True:
                for note in conn.notifies(timeout=tick):
                    yield Delivery(note.payload.encode(), f"{self.name} NOTIFY")
                yield None


def _redis(parts, redis_module):
    return redis_module.Redis(host=parts.hostname or "127.0.0.1", port=parts.port or 6379,
                              username=unquote(parts.username) if parts.username else None,
                              password=unquote(parts.password) if parts.password else None,
                              socket_connect_timeout=5, socket_keepalive=True)


class RedisPubSub:
    def __init__(self, url: str) -> None:
        import redis  # the `sources` extra

        self.parts, self.redis = urlsplit(url), redis
        self.channel = self.parts.path.strip("/")
        if not self.channel:
            raise HotswapError(f"{url}: name the channel (redis://HOST:PORT/CHANNEL)",
                               ExitCode.CONFIG)
        self.name = f"redis://{self.parts.hostname}:{self.parts.port or 6379}/{self.channel}"
        self.errors = (redis.ConnectionError, redis.TimeoutError)

    def session(self, tick: float) -> Iterator[Delivery | None]:
        client = _redis(self.parts, self.redis)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.channel)  # before the catch-up: nothing falls between
            latest = client.get(f"{self.channel}:latest")
            if latest:
                yield Delivery(latest, f"{self.name} {self.channel}:latest", catchup=True)
            while True:
                message = pubsub.get_message(timeout=tick)
                yield (Delivery(message["data"], f"{self.name} PUBLISH")
                       if message and message["type"] == "message" else None)
        finally:
            pubsub.close()
            client.close()


class RedisStream:
    def __init__(self, url: str) -> None:
        import redis  # the `sources` extra

        self.parts, self.redis = urlsplit(url), redis
        self.stream = self.parts.path.strip("/")
        if not self.stream:
            raise HotswapError(f"{url}: name the stream (redis-stream://HOST:PORT/STREAM)",
                               ExitCode.CONFIG)
        query = parse_qs(self.parts.query)
        self.group = query.get("group", [f"hotswap-{socket.gethostname()}"])[0]
        self.consumer = query.get("consumer", ["watcher"])[0]
        self.name = (f"redis-stream://{self.parts.hostname}:{self.parts.port or 6379}/"
                     f"{self.stream}?group={self.group}")
        self.errors = (redis.ConnectionError, redis.TimeoutError)

    def session(self, tick: float) -> Iterator[Delivery | None]:
        client = _redis(self.parts, self.redis)
        try:
            try:  # from the stream's start: what was added before this host's first watch counts
                client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            except self.redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            # "0": this consumer's pending entries (delivered, never acknowledged), then ">"
            for start, catchup in (("0", True), (">", False)):
                while True:
                    block = None if catchup else int(tick * 1000)
                    batch = client.xreadgroup(self.group, self.consumer, {self.stream: start},
                                              count=50, block=block)
                    entries = batch[0][1] if batch else []
                    for entry, fields in entries:
                        yield self._delivery(client, entry, fields, catchup)
                    if catchup and not entries:
                        break
                    if not catchup:
                        yield None
        finally:
            client.close()

    def _delivery(self, client, entry: bytes, fields: dict, catchup: bool) -> Delivery:
        where = f"{self.name} entry {entry.decode()}"
        return Delivery(fields.get(b"msg", b""), where, catchup=catchup,
                        ack=lambda: client.xack(self.stream, self.group, entry))


SCHEMES = {"postgres": Postgres, "postgresql": Postgres, "redis": RedisPubSub,
           "redis-stream": RedisStream}


def open_source(url: str) -> Source:
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise HotswapError(f"--source {url}: unknown scheme {scheme!r} (one of "
                           f"{', '.join(sorted(SCHEMES))})", ExitCode.CONFIG)
    try:
        return SCHEMES[scheme](url)
    except ImportError as exc:
        raise HotswapError(f"--source {scheme}: its client is not installed ({exc.name}): "
                           "pip install 'hotswap[sources]'", ExitCode.CONFIG) from None


def deliveries(source: Source, stop: threading.Event, tick: float,
               log: Callable[[str], None]) -> Iterator[Delivery | None]:
    """The source's sessions, one after another: a lost connection is logged once, retried
    with a growing pause (at most 5 s), and the next session starts with its catch-up."""
    delay, down = 0.25, False
    while not stop.is_set():
        try:
            for item in source.session(tick):
                if down:
                    log(f"{source.name}: connected again; caught up from the source of truth")
                    down = False
                delay = 0.25
                yield item
                if stop.is_set():
                    return
        except source.errors as exc:
            if not down:
                cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)
                log(f"{source.name}: connection lost or refused ({cause}); retrying "
                    "until it answers")
                down = True
        stop.wait(delay)  # a pause between attempts, not a synchronisation
        delay = min(delay * 2, 5.0)
        yield None
