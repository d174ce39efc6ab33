"""The service that hotswap swaps: a Flask app whose heavy resource loads at import.

The resource is a term -> tags table (see scripts/gen_resource.py), served in one of two
modes, both checked at import time, in the uWSGI master, before any worker is forked: a
release whose data is corrupt, truncated or missing raises here, so its master exits
(need-app) and never takes traffic.

- store (default): a memory-mapped LMDB store (scripts/build_store.py, hotswap/protocol/store.py),
  validated with one full pass (which also warms the page cache) and closed again; each
  worker maps it after the fork, and every process shares one copy of it through the page
  cache. `hotswap refresh` switches the workers to a new store without new processes.
- heap: the table is read, checked against its header's checksum and parsed into a dict;
  workers share it copy-on-write until reference counting dirties the pages.

Environment:
    SRV_MODE         "store" (default) or "heap"
    SRV_STORE        store mode: the symlink naming the current store
                     (default: data/store/current beside this file)
    SRV_RESOURCE     heap mode: path of the table (default: data/terms.tsv beside this file)
    SRV_TEST_ROUTES  "1" enables GET /sleep?seconds=S, used by drain tests and the bench
"""

from __future__ import annotations

import time

_started = time.monotonic()  # load_seconds covers the whole import: Flask and the table

import hashlib  # noqa: E402
import itertools  # noqa: E402
import os  # noqa: E402
from urllib.parse import quote  # noqa: E402

from flask import Flask, g, jsonify, request  # noqa: E402

from hotswap.inside import wsgi  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("SRV_MODE") or "store"
RESOURCE_PATH = os.environ.get("SRV_RESOURCE") or os.path.join(HERE, "data", "terms.tsv")
STORE_POINTER = os.environ.get("SRV_STORE") or os.path.join(HERE, "data", "store", "current")
HEADER_PREFIX = "# hotswap-resource v1 "
MAX_TERM_LENGTH = 200
MAX_SLEEP_SECONDS = 30.0


class ResourceError(RuntimeError):
    """The resource file cannot be trusted: this release must not serve."""


def _code_version() -> str:
    with open(os.path.abspath(__file__), "rb") as source:
        return hashlib.sha256(source.read()).hexdigest()[:8]


def load_resource(path: str) -> tuple[dict[str, str], dict[str, str]]:
    """Return (header fields, term -> tags), refusing anything that fails validation."""
    try:
        with open(path, "rb") as handle:
            header_line = handle.readline().decode("utf-8", "replace")
            body = handle.read()
    except OSError as exc:
        raise ResourceError(f"cannot read resource {path}: {exc.strerror}") from exc
    if not header_line.startswith(HEADER_PREFIX):
        raise ResourceError(f"{path}: not a hotswap resource (bad header)")
    header = dict(
        field.split("=", 1) for field in header_line[len(HEADER_PREFIX):].split() if "=" in field
    )
    for key in ("version", "terms", "sha256"):
        if key not in header:
            raise ResourceError(f"{path}: header lacks {key}=")
    digest = hashlib.sha256(body).hexdigest()
    if digest != header["sha256"]:
        raise ResourceError(
            f"{path}: checksum mismatch (header {header['sha256'][:12]}, body {digest[:12]})"
        )
    table: dict[str, str] = {}
    for number, line in enumerate(body.decode("utf-8").splitlines(), start=2):
        term, sep, tags = line.partition("\t")
        if not sep or not term:
            raise ResourceError(f"{path}:{number}: malformed line")
        table[term] = tags
    if len(table) != int(header["terms"]):
        raise ResourceError(f"{path}: header says {header['terms']} terms, body has {len(table)}")
    return header, table


class HeapTable:
    """Heap mode: the whole table in a dict; the same interface as a store Snapshot."""

    def __init__(self, path: str) -> None:
        header, self.table = load_resource(path)
        self.version = header["version"]
        self.entries = len(self.table)

    def get(self, term: str) -> str | None:
        return self.table.get(term)


if MODE == "heap":
    HEAP: HeapTable | None = HeapTable(RESOURCE_PATH)
    LIVE = None
    STORE_FACTS: dict = {}
    DATA_VERSION = HEAP.version
elif MODE == "store":
    from hotswap.inside.live_store import LiveStore  # noqa: E402
    from hotswap.protocol.store import StoreError  # noqa: E402

    HEAP = None
    LIVE = LiveStore(STORE_POINTER)
    try:
        _info = LIVE.validate_at_import()  # the full pass doubles as the warm pass
    except StoreError as exc:
        raise ResourceError(str(exc)) from exc
    LIVE.install_uwsgi_hooks()
    # the validation pass is the warm pass: every page is in the page cache after it
    STORE_FACTS = {"warm_seconds": _info.validate_seconds}
    DATA_VERSION = _info.version
else:
    raise ResourceError(f"SRV_MODE must be 'store' or 'heap', not {MODE!r}")

CODE_VERSION = _code_version()

app = application = Flask(__name__)


def data():
    """The data this request reads, taken once per request: a refresh between two requests
    never shows up in the middle of one."""
    if "data" not in g:
        g.data = HEAP if HEAP is not None else LIVE.current()
    return g.data


def generation() -> str:
    """The release id: which data and which code serve this request. In store mode a
    refresh changes the data part: each answer carries the version it was served from."""
    return f"{data().version}+{CODE_VERSION}"


def _source():
    """The data outside a request (the kit's health path, the smoke checks)."""
    return HEAP if HEAP is not None else LIVE.current()


def _error(status: int, message: str):
    return jsonify(error=message, status=status), status


@app.after_request
def _stamp(response):
    # The version this request was served from (the kit's middleware adds X-Master-Pid, and
    # would add the generation of the moment, not of this request's snapshot).
    response.headers["X-Generation"] = generation()
    return response


@app.errorhandler(404)
def _not_found(_exc):
    return _error(404, "no such route")


@app.errorhandler(405)
def _bad_method(_exc):
    return _error(405, "method not allowed")


@app.get("/lookup")
def lookup():
    if "q" not in request.args:
        return _error(400, "missing query parameter q")
    term = request.args["q"]
    if not term.strip():
        return _error(400, "empty query parameter q")
    if len(term) > MAX_TERM_LENGTH:
        return _error(400, f"q longer than {MAX_TERM_LENGTH} characters")
    tags = data().get(term)
    if tags is None:
        return _error(404, f"unknown term {term!r}")
    return jsonify(term=term, tags=tags.split(","), generation=generation())


if os.environ.get("SRV_TEST_ROUTES") == "1":

    @app.get("/sleep")
    def sleep():
        try:
            seconds = float(request.args.get("seconds", "1"))
        except ValueError:
            return _error(400, "seconds must be a number")
        if not 0 <= seconds <= MAX_SLEEP_SECONDS:
            return _error(400, f"seconds must be within 0..{MAX_SLEEP_SECONDS:g}")
        time.sleep(seconds)
        return jsonify(slept=seconds, worker_pid=os.getpid(), generation=generation())

    @app.get("/scan")
    def scan():
        """Read every entry once (or the first `limit`): the worst case for sharing."""
        source = data()
        entries = source.txn.cursor().iternext() if LIVE else iter(source.table.items())
        limit = request.args.get("limit", "")
        if limit.isdigit():
            entries = itertools.islice(entries, int(limit))
        count = sum(1 for _ in entries)
        return jsonify(scanned=count, worker_pid=os.getpid(), generation=generation())


def _health() -> dict:
    """The sample's fields beside the kit's (hotswap/inside/wsgi.py): one snapshot for all."""
    source = _source()
    return {
        "generation": f"{source.version}+{CODE_VERSION}",
        "resource_version": source.version,
        "terms": source.entries,
        "mode": MODE,
        **STORE_FACTS,
        **({"store_path": source.path, "store_sha256": source.sha256} if LIVE else {}),
    }


def _known_term() -> str:
    source = _source()
    if HEAP is not None:
        return next(iter(HEAP.table))
    return source.txn.cursor().iternext(values=False).__next__().decode()


# The kit's middleware: the health path, X-Master-Pid, and a smoke lookup of a term the data
# holds, run here in the master before any worker forks: a release that imports but cannot
# answer fails its import, and never serves.
app.wsgi_app = wsgi.wrap(
    app.wsgi_app,
    generation=lambda: f"{_source().version}+{CODE_VERSION}",
    health=_health,
    smoke=[wsgi.Smoke(f"/lookup?q={quote(_known_term())}", 200)],
    started=_started,
)
if LIVE is not None:
    LIVE.close()  # the smoke lookup mapped the store here: an LMDB env must not cross fork()
