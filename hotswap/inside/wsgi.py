"""The kit's side of a served app: a WSGI middleware holding the health contract.

Any WSGI callable (Flask, Django, Falcon, a plain function) is wrapped at import, in the
uWSGI master, before any worker forks:

    application = hotswap.inside.wsgi.wrap(application)               # any WSGI callable
    app.wsgi_app = hotswap.inside.wsgi.wrap(app.wsgi_app, ...)        # Flask: app stays the app

`wrap()` does these things:

- runs the smoke requests (srv.ini's `hotswap-smoke`, plus the app's own `smoke=`) through the
  wrapped app, in this process. One that fails raises SmokeError, so the import fails: with
  `need-app` the new master exits before forking workers, and `hotswap reload` rolls back and
  shows the SmokeError line from the uWSGI log. No client ever sees that release.
- exports HOTSWAP_GENERATION, which the accepting hook (hotswap/inside/handover.py) reports.
- answers GET <health path> (srv.ini's `hotswap-health`, default /healthz) with what `hotswap
  reload`, `status` and `probe` read: status, master_pid, worker_pid, generation, loaded_at,
  load_seconds, plus the app's `health()` dict; a `health()` that raises answers 503. Every
  other answer gets X-Master-Pid, and X-Generation unless the app set its own (srv.py does:
  its data version can change per request with `hotswap refresh`).
- with srv.ini's `hotswap-metrics = PATH`, counts each request per generation and answers
  PATH with the sum over every worker (hotswap/inside/app_metrics.py, imported only then).

Smoke requests run in the master: whatever they open lazily (a database connection, a
memory-mapped file) is opened there and would be inherited by every worker. An app closes
it after wrap() returns (srv.py closes its store snapshot) or picks smoke paths that open
nothing shared.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from .. import __version__
from ..system import procs, uwsgilog

# srv.ini keys the kit reads (uWSGI keeps unknown keys as placeholders; `uwsgi.opt` and
# `uwsgi --get` both see them). config.py reads the same keys for the CLI.
HEALTH_PATH_KEY = "hotswap-health"
SMOKE_KEY = "hotswap-smoke"
APP_KEY = "hotswap-app"  # what hotswap/inside/entry.py serves (an ini `hotswap init` wrote)
# opt-in: the path the per-generation request metrics are served at (inside/app_metrics.py),
# and how long a gone generation's counts stay in the scrape (seconds, default 300)
METRICS_PATH_KEY = "hotswap-metrics"
METRICS_KEEP_KEY = "hotswap-metrics-keep"
DEFAULT_HEALTH_PATH = "/healthz"
# uWSGI keeps only the last value of a repeated custom key: several checks share one line.
SMOKE_SEPARATOR = "|"

WsgiApp = Callable[..., Iterable[bytes]]


class EntryError(RuntimeError):
    """srv.ini does not name an importable WSGI callable."""


def parse_target(spec: str) -> tuple[str, str, bool]:
    """'pkg.mod:name' or 'pkg.mod:factory()' -> (module, attribute, call it)."""
    module, sep, attr = spec.strip().partition(":")
    if sep and not attr:  # "pkg.mod:" names nothing; "pkg.mod" alone means :application
        raise EntryError(f"{APP_KEY} = {spec!r}: nothing after the ':'; expected "
                         "package.module:callable or package.module:factory()")
    attr = attr or "application"
    factory = attr.endswith("()")
    attr = attr.removesuffix("()")
    names_ok = all(p.isidentifier() for p in module.split(".")) and attr.isidentifier()
    if not module or not names_ok:
        raise EntryError(f"{APP_KEY} = {spec!r}: expected package.module:callable "
                         "or package.module:factory()")
    return module, attr, factory


class SmokeError(RuntimeError):
    """A smoke request failed: this release must not serve."""


@dataclass(frozen=True)
class Smoke:
    """One request run through the app at import, and the status it must answer."""

    path: str  # with its query string, as a client sends it
    status: int = 200
    method: str = "GET"

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status}"


def parse_smoke(text: str) -> list[Smoke]:
    """'GET /lookup?q=a -> 200 | /ready' -> Smokes; method GET and status 200 by default."""
    checks = []
    for item in filter(None, (part.strip() for part in text.split(SMOKE_SEPARATOR))):
        request, _, expect = (s.strip() for s in item.partition("->"))
        words = request.split()
        if len(words) == 1:
            words.insert(0, "GET")
        if len(words) != 2 or not words[1].startswith("/") or (expect and not expect.isdigit()):
            raise SmokeError(f"{SMOKE_KEY}: cannot read {item!r} (expected 'GET /path -> 200')")
        checks.append(Smoke(words[1], int(expect or 200), words[0].upper()))
    return checks


# Outside uWSGI, `hotswap refresh`'s app check (releases/app_check.py) passes the ini's
# values here as JSON, so the app runs the same smoke checks as in a master.
INI_OPTIONS_ENV = "HOTSWAP_INI_OPTIONS"


def ini_option(key: str) -> str | None:
    """An srv.ini value as uWSGI parsed it; None outside uWSGI (and the app check) or when
    unset."""
    try:
        import uwsgi  # type: ignore[import-not-found]
    except ImportError:
        try:
            return json.loads(os.environ.get(INI_OPTIONS_ENV) or "{}").get(key)
        except (ValueError, AttributeError):
            return None
    value = uwsgi.opt.get(key)
    if isinstance(value, list):
        value = value[-1]
    return value.decode() if isinstance(value, bytes) else value


def master_pid() -> int:
    """The uWSGI master serving this process. Not os.getppid(): a worker whose master died
    is re-parented (to init, or to `hotswap start`'s subreaper), and a process that is
    itself the master (a smoke request at import) has the shell or the old master above."""
    try:
        import uwsgi  # type: ignore[import-not-found]
    except ImportError:
        return os.getppid()
    return uwsgi.masterpid()


def process_age() -> float:
    """Seconds since this process began: for a master re-forked by "f", since the fork."""
    started = (procs.start_ticks(os.getpid()) or 0) / os.sysconf("SC_CLK_TCK")
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)


def release_id() -> str | None:
    """The release directory this process serves from, in the release layout
    (ROOT/releases/<id>/, docs/releases.md: uWSGI chdirs into the resolved release), else
    None."""
    here = Path.cwd()
    return here.name if here.parent.name == "releases" else None


def source_digest(module_file: str | os.PathLike) -> str:
    """8 hex digits over the Python sources of the module's top-level package (or the module
    alone): the default generation, which changes with any code change of the release."""
    path = Path(module_file).resolve()
    root = path
    while (root.parent / "__init__.py").exists():  # climb to the top-level package
        root = root.parent
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(root.parent)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:8]


def _as_callable(value: str | Callable[[], str]) -> Callable[[], str]:
    return value if callable(value) else (lambda: value)


class Middleware:
    """The wrapped app: the health path answered by the kit, every answer stamped."""

    def __init__(self, app: WsgiApp, generation: Callable[[], str],
                 health: Callable[[], dict] | None, health_path: str) -> None:
        self.app = app
        self.generation = generation
        self.health = health
        self.health_path = health_path
        self.loaded_at = ""
        self.load_seconds = 0.0
        self.metrics = None  # an app_metrics.AppMetrics once wrap() read hotswap-metrics

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path == self.health_path:
            return self._answer_health(environ, start_response)
        if self.metrics is None:
            return self._stamped(environ, start_response)
        if path == self.metrics.path:
            return self.metrics.answer(environ, start_response)
        return self.metrics.counted(self._stamped, environ, start_response)

    def _stamped(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        stamp = [("X-Master-Pid", str(master_pid()))]

        def stamped(status: str, headers: list, exc_info=None):
            names = {name.lower() for name, _ in headers}
            extra = [] if "x-generation" in names else [("X-Generation", self.generation())]
            kept = [(n, v) for n, v in headers if n.lower() != "x-master-pid"]
            return start_response(status, kept + stamp + extra, exc_info)

        return self.app(environ, stamped)

    def health_document(self) -> tuple[int, dict]:
        """(HTTP status, document): the kit's fields, then the app's (which may refine
        generation); 503 with the error if the app's readiness check raises."""
        document = {"status": "ok", "master_pid": master_pid(), "worker_pid": os.getpid(),
                    "generation": self.generation(), "loaded_at": self.loaded_at,
                    "load_seconds": self.load_seconds, "kit_version": __version__}
        if release := release_id():
            document["release"] = release
        if self.health is None:
            return 200, document
        try:
            extra = self.health()
        except Exception as exc:  # the app's own check said no: the contract is a 503
            return 503, {**document, "status": "unavailable",
                         "error": f"{type(exc).__name__}: {exc}"}
        return 200, {**document, **(extra or {}), "master_pid": document["master_pid"],
                     "worker_pid": document["worker_pid"]}

    def _answer_health(self, environ: dict, start_response: Callable) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            status, document = 405, {"error": "method not allowed", "status": 405}
        else:
            status, document = self.health_document()
        body = json.dumps(document, separators=(",", ":")).encode() + b"\n"
        reason = {200: "OK", 405: "METHOD NOT ALLOWED", 503: "SERVICE UNAVAILABLE"}[status]
        start_response(f"{status} {reason}", [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"), ("X-Master-Pid", str(document.get("master_pid", ""))),
            ("X-Generation", str(document.get("generation", ""))),
        ])
        return [] if method == "HEAD" else [body]


def log(text: str) -> None:
    """To the uWSGI log (stderr), never failing: a full log disk must not fail a release."""
    if not text:
        return
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def run_smoke(app: WsgiApp, check: Smoke) -> None:
    """One request through `app`, in this process; SmokeError unless it answers as expected."""
    path, _, query = check.path.partition("?")
    errors = io.StringIO()  # what the app logs for this request (Flask: its traceback)
    environ = {
        "REQUEST_METHOD": check.method, "SCRIPT_NAME": "", "PATH_INFO": unquote(path),
        "QUERY_STRING": query, "SERVER_NAME": "hotswap-smoke", "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "hotswap-smoke",
        "HTTP_USER_AGENT": "hotswap-smoke", "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": errors, "wsgi.multithread": False, "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    answered: list[str] = []

    def start_response(status: str, _headers: list, exc_info=None):
        answered.append(status)
        return lambda _data: None

    try:
        result = app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            if hasattr(result, "close"):
                result.close()
    except Exception as exc:
        raise SmokeError(f"smoke check {check} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        log(errors.getvalue())  # into the uWSGI log, as a request's would go
    status = answered[-1] if answered else "no status"
    if status.split()[0] != str(check.status):
        # the app's own exception line says more than an error page
        cause = uwsgilog.cause_from(errors.getvalue().splitlines()) or \
            ": " + body[:120].decode(errors="replace").replace("\n", " ").strip()
        raise SmokeError(f"smoke check {check} answered {status}{cause}")


def wrap(app: WsgiApp, *, generation: str | Callable[[], str] | None = None,
         health: Callable[[], dict] | None = None, smoke: Iterable[Smoke] = (),
         started: float | None = None, health_path: str | None = None) -> Middleware:
    """Wrap `app` in the kit's middleware and run its smoke checks (SmokeError on failure).

    generation: the release id (str or callable, read per answer); default: "unknown".
    health: the app's readiness check: returns extra health fields, raises to answer 503.
    smoke: the app's own checks, run after srv.ini's `hotswap-smoke`.
    started: time.monotonic() when loading began (default: when this process began).
    health_path: default srv.ini's `hotswap-health`, else /healthz."""
    began = started if started is not None else time.monotonic() - process_age()
    path = health_path or ini_option(HEALTH_PATH_KEY) or DEFAULT_HEALTH_PATH
    wrapped = Middleware(app, _as_callable(generation or "unknown"), health, path)
    checks = [*parse_smoke(ini_option(SMOKE_KEY) or ""), *smoke]
    for check in checks:
        run_smoke(wrapped, check)
    if checks:
        log(f"hotswap: {len(checks)} smoke check(s) passed in process {os.getpid()}: "
            + ", ".join(map(str, checks)) + "\n")
    if metrics_path := ini_option(METRICS_PATH_KEY):
        wrapped.metrics = _request_metrics(metrics_path)  # after the smoke: never counted
    wrapped.load_seconds = round(time.monotonic() - began, 3)
    wrapped.loaded_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # the accepting hook (a child of a worker) reports it to systemd and in its record
    os.environ["HOTSWAP_GENERATION"] = wrapped.generation()
    return wrapped


def _request_metrics(path: str):
    """app_metrics.enable() in a uWSGI master; imported only now, so without the key no
    process loads it (or prometheus_client). Outside uWSGI (refresh's app check) nothing."""
    try:
        import uwsgi  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return None
    try:
        from . import app_metrics
        return app_metrics.enable(path, ini_option("run_dir"), ini_option(METRICS_KEEP_KEY))
    except Exception as exc:  # metrics are never a reason to fail a release
        log(f"hotswap: request metrics off: {type(exc).__name__}: {exc}\n")
        return None
