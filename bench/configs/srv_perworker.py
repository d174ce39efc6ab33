"""The alternatives to a re-fork that `make bench-scale` measures: each worker loads the table
into its own heap after the fork, and reloads it itself.

    SRV_ALT=ttl      reload every SRV_TTL seconds (default 5), lazily, on the first request
                     after expiry: a TTL cache over the whole table (cachetools.TTLCache /
                     lru_cache + cache_clear() do the same per key)
    SRV_ALT=signal   reload when <run_dir>/store.switch changes: the same uWSGI signal that
                     `hotswap refresh` uses, but each worker parses the table itself

Same routes and headers as srv.py (/healthz, /lookup). Each worker writes the kit's worker
report (hotswap/protocol/store.py) after every load, so the bench can ask each worker what
it serves.
"""

from __future__ import annotations

import os
import time

from flask import Flask, jsonify, request

from hotswap.inside.live_store import SWITCH_FILE, SWITCH_SIGNAL
from hotswap.protocol import store

HERE = os.path.dirname(os.path.abspath(__file__))
RESOURCE = os.environ.get("SRV_RESOURCE") or os.path.join(HERE, "data", "terms.tsv")
ALT = os.environ.get("SRV_ALT", "ttl")
TTL = float(os.environ.get("SRV_TTL", "5"))


class PerWorkerTable:
    def __init__(self) -> None:
        self.table: dict[str, str] = {}
        self.version = ""
        self.loaded_at = 0.0
        self.pid = 0
        self.run_dir: str | None = None

    def load(self) -> None:
        with open(RESOURCE, "rb") as handle:
            header = handle.readline().decode()
            body = handle.read().decode()
        fields = dict(f.split("=", 1) for f in header.split() if "=" in f)
        table = {}
        for line in body.splitlines():
            term, _, tags = line.partition("\t")
            table[term] = tags
        self.table, self.version = table, fields.get("version", "?")
        self.loaded_at, self.pid = time.monotonic(), os.getpid()
        if self.run_dir:
            store.write_report(self.run_dir, store.WorkerReport(
                os.getpid(), self.version, self.version, RESOURCE, RESOURCE, time.time()))

    def current(self) -> PerWorkerTable:
        if self.pid != os.getpid() or (ALT == "ttl" and time.monotonic() - self.loaded_at > TTL):
            self.load()
        return self


TABLE = PerWorkerTable()
try:
    import uwsgi  # type: ignore[import-not-found]

    _run_dir = uwsgi.opt.get("run_dir")
    TABLE.run_dir = _run_dir.decode() if isinstance(_run_dir, bytes) else _run_dir
    uwsgi.post_fork_hook = TABLE.load
    if ALT == "signal":
        _switch = os.path.join(TABLE.run_dir, SWITCH_FILE)
        open(_switch, "a").close()
        uwsgi.register_signal(SWITCH_SIGNAL, "workers", lambda _sig: TABLE.load())
        uwsgi.add_file_monitor(SWITCH_SIGNAL, _switch)
except ImportError:
    pass

MASTER_PID = os.getpid()
app = application = Flask(__name__)


@app.after_request
def _stamp(response):
    response.headers["X-Generation"] = f"{TABLE.version}+alt-{ALT}"
    response.headers["X-Master-Pid"] = str(os.getppid())
    return response


@app.get("/healthz")
def healthz():
    data = TABLE.current()
    return jsonify(status="ok", master_pid=os.getppid(), worker_pid=os.getpid(),
                   generation=f"{data.version}+alt-{ALT}", resource_version=data.version,
                   terms=len(data.table), load_seconds=0.0, mode=f"alt-{ALT}")


@app.get("/lookup")
def lookup():
    data = TABLE.current()
    term = request.args.get("q", "")
    tags = data.table.get(term)
    if tags is None:
        return jsonify(error="unknown term", status=404), 404
    return jsonify(term=term, tags=tags.split(","), generation=f"{data.version}+alt-{ALT}")
