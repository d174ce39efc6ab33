"""The service that hotswap swaps: a Flask app whose heavy resource loads at import.

The resource is a term -> tags table (see scripts/gen_resource.py). It is read, checked
against the checksum in its header and parsed into memory at import time, in the uWSGI
master, before any worker is forked: a release whose file is corrupt, truncated or missing
raises here, so its master exits (need-app) and never takes traffic.

Environment:
    SRV_RESOURCE     path of the table (default: data/terms.tsv beside this file)
    SRV_TEST_ROUTES  "1" enables GET /sleep?seconds=S, used by drain tests and the bench
"""

from __future__ import annotations

import time

_started = time.monotonic()  # load_seconds covers the whole import: Flask and the table

import hashlib  # noqa: E402
import os  # noqa: E402

from flask import Flask, jsonify, request  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESOURCE_PATH = os.environ.get("SRV_RESOURCE") or os.path.join(HERE, "data", "terms.tsv")
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


RESOURCE_HEADER, TERMS = load_resource(RESOURCE_PATH)
LOAD_SECONDS = round(time.monotonic() - _started, 3)
LOADED_AT = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
# The release id: which data and which code this generation serves.
GENERATION = f"{RESOURCE_HEADER['version']}+{_code_version()}"
# Exported so the kit's accepting hook (a child of a worker) can report it to systemd.
os.environ["HOTSWAP_GENERATION"] = GENERATION

app = application = Flask(__name__)


def _error(status: int, message: str):
    return jsonify(error=message, status=status), status


@app.after_request
def _stamp(response):
    # Lets load tests and the bench attribute every answer to a generation.
    response.headers["X-Generation"] = GENERATION
    response.headers["X-Master-Pid"] = str(os.getppid())
    return response


@app.errorhandler(404)
def _not_found(_exc):
    return _error(404, "no such route")


@app.errorhandler(405)
def _bad_method(_exc):
    return _error(405, "method not allowed")


@app.get("/healthz")
def healthz():
    return jsonify(
        status="ok",
        master_pid=os.getppid(),
        worker_pid=os.getpid(),
        generation=GENERATION,
        resource_version=RESOURCE_HEADER["version"],
        terms=len(TERMS),
        loaded_at=LOADED_AT,
        load_seconds=LOAD_SECONDS,
    )


@app.get("/lookup")
def lookup():
    term = request.args.get("q", "")
    if not term.strip():
        return _error(400, "missing query parameter q")
    if len(term) > MAX_TERM_LENGTH:
        return _error(400, f"q longer than {MAX_TERM_LENGTH} characters")
    tags = TERMS.get(term)
    if tags is None:
        return _error(404, f"unknown term {term!r}")
    return jsonify(term=term, tags=tags.split(","), generation=GENERATION)


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
        return jsonify(slept=seconds, worker_pid=os.getpid(), generation=GENERATION)
