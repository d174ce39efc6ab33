"""A small closed-loop HTTP load client over a unix socket (or 127.0.0.1), used by the tests
and the benchmark alike.

Each of N threads sends one request per fresh connection (uWSGI's http-socket closes after
each answer), waits for the answer, records it and goes again, until a deadline or a request
budget is reached. Nothing is retried: every failure is recorded with its kind, so "lost
requests" means exactly what a client would have seen.

    python -m bench.loadgen --socket run/http.sock --connections 32 --seconds 10 --out load.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

DEFAULT_PATHS = ("/healthz",)
HARD_CAP_SECONDS = 900.0  # whatever the caller asks, a load run stops by itself


@dataclass(frozen=True)
class Record:
    started: float  # time.time() when the connection was opened
    latency: float  # seconds until the whole answer was read (or the failure)
    outcome: str  # "ok", "http_<status>", or a failure kind: refused, reset, timeout, ...
    master_pid: int  # from the X-Master-Pid header, 0 when absent
    generation: str  # from the X-Generation header, "" when absent


def _parse_answer(raw: bytes) -> tuple[str, int, str]:
    head, _, _ = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return "bad_response", 0, ""
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    pid = headers.get("x-master-pid", "0")
    outcome = "ok" if 200 <= status < 300 else f"http_{status}"
    return outcome, int(pid) if pid.isdigit() else 0, headers.get("x-generation", "")


def _failure_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, FileNotFoundError):
        return "no_socket"
    return type(exc).__name__


def request_once(target: str | tuple[str, int], path: str, timeout: float,
                 sent: Callable[[], None] | None = None) -> Record:
    """One request on a fresh connection; never raises for network trouble.

    `sent` is called once the request is written: a test that needs connections waiting in
    a listen backlog (a restart's gap) waits for it instead of for a time.
    """
    started = time.time()
    t0 = time.perf_counter()
    family = socket.AF_UNIX if isinstance(target, str) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(target)
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: hotswap\r\n\r\n".encode())
            if sent is not None:
                sent()
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        raw = b"".join(chunks)
        outcome, pid, generation = _parse_answer(raw) if raw else ("empty", 0, "")
    except Exception as exc:  # noqa: BLE001 - every failure is a data point here
        outcome, pid, generation = _failure_kind(exc), 0, ""
    return Record(started, time.perf_counter() - t0, outcome, pid, generation)


class LoadGenerator:
    """Closed-loop load from `connections` threads; start(), then stop() returns the records."""

    def __init__(
        self,
        target: str | tuple[str, int],
        connections: int = 32,
        paths: tuple[str, ...] = DEFAULT_PATHS,
        max_seconds: float = 60.0,
        max_requests: int = 1_000_000,
        request_timeout: float = 10.0,
    ) -> None:
        self.target = target
        self.connections = connections
        self.paths = paths
        self.deadline_seconds = min(max_seconds, HARD_CAP_SECONDS)
        self.max_requests = max_requests
        self.request_timeout = request_timeout
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self, index: int, deadline: float) -> None:
        n = index
        while not self._stop.is_set() and time.monotonic() < deadline:
            path = self.paths[n % len(self.paths)]
            record = request_once(self.target, path, self.request_timeout)
            n += self.connections
            with self._lock:
                if len(self.records) >= self.max_requests:
                    return
                self.records.append(record)

    def start(self) -> LoadGenerator:
        deadline = time.monotonic() + self.deadline_seconds
        self._threads = [
            threading.Thread(target=self._run, args=(i, deadline), daemon=True)
            for i in range(self.connections)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Record]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.request_timeout + 5)
        with self._lock:
            return sorted(self.records, key=lambda r: r.started)

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class OpenLoopGenerator:
    """Open-loop load: request k is due at start + k/rate, on a clock, whatever the answers
    before it did. Each runs on its own connection in a pool of `in_flight` threads; one that
    finds the pool full is recorded as "dropped" at its due time, never delayed (a delayed
    start would hide the stall it waited for: coordinated omission). Record.started is the
    scheduled wall time and latency runs from it, so a late dispatch counts as latency."""

    def __init__(self, target: str | tuple[str, int], rate: float,
                 paths: tuple[str, ...] = DEFAULT_PATHS, in_flight: int = 256,
                 request_timeout: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 send: Callable[..., Record] = request_once) -> None:
        self.target, self.rate, self.paths = target, rate, paths
        self.request_timeout, self.clock, self.send = request_timeout, clock, send
        self.records: list[Record] = []
        self.idle = in_flight
        self.next_index = 0
        self.start_mono = clock()
        self.start_wall = time.time()
        self._lock = threading.Lock()
        self.queue: list[tuple[int, float]] = []  # (index, due) handed to a free slot

    def due(self, index: int) -> float:
        return self.start_mono + index / self.rate

    def dispatch_due(self, now: float) -> int:
        """Hand every request due by `now` to a free slot (or drop it); returns how many."""
        count = 0
        while self.due(self.next_index) <= now:
            index, due = self.next_index, self.due(self.next_index)
            self.next_index += 1
            count += 1
            with self._lock:
                if self.idle == 0:
                    self.records.append(Record(self.start_wall + due - self.start_mono, 0.0,
                                               "dropped", 0, ""))
                    continue
                self.idle -= 1
            self.queue.append((index, due))
        return count

    def serve(self, index: int, due: float) -> Record:
        """Send request `index` and record it with its latency from `due`; frees the slot."""
        answer = self.send(self.target, self.paths[index % len(self.paths)],
                           self.request_timeout)
        record = Record(self.start_wall + due - self.start_mono, self.clock() - due,
                        answer.outcome, answer.master_pid, answer.generation)
        with self._lock:
            self.records.append(record)
            self.idle += 1
        return record


def summarize(records: list[Record]) -> dict:
    outcomes = collections.Counter(r.outcome for r in records)
    return {
        "requests": len(records),
        "failed": sum(n for kind, n in outcomes.items() if kind != "ok"),
        "outcomes": dict(outcomes),
        "generations": sorted({r.generation for r in records if r.generation}),
        "master_pids": sorted({r.master_pid for r in records if r.master_pid}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="closed-loop HTTP load over a unix socket")
    parser.add_argument("--socket", help="unix socket path")
    parser.add_argument("--tcp", help="HOST:PORT on loopback instead of a unix socket")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--path", action="append", help="request path (repeatable)")
    parser.add_argument("--out", help="write one JSON record per line here")
    args = parser.parse_args(argv)
    if bool(args.socket) == bool(args.tcp):
        parser.error("give exactly one of --socket or --tcp")
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "::1"):
            parser.error("--tcp is for loopback addresses only")
        target: str | tuple[str, int] = (host, int(port))
    else:
        target = args.socket
    gen = LoadGenerator(target, args.connections, tuple(args.path or DEFAULT_PATHS),
                        args.seconds, args.max_requests)
    gen.start()
    try:
        while any(t.is_alive() for t in gen._threads):
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    records = gen.stop()
    if args.out:
        with open(args.out, "w") as out:
            for record in records:
                out.write(json.dumps(asdict(record)) + "\n")
    print(json.dumps(summarize(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
