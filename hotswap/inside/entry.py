"""The uWSGI entry point of a project set up by `hotswap init`: `module = hotswap.inside.entry`.

It imports the app srv.ini names in `hotswap-app` ("package.module:callable", or
"package.module:factory()" for an application factory, called with no arguments), wraps
it in the kit's middleware (hotswap/inside/wsgi.py: health path, smoke checks, headers) and
exposes it as `application`. The user's module is not edited; it may optionally define

    hotswap_generation   a str, or a callable returning one (default: a digest of the
                         package's Python sources)
    hotswap_health       a callable returning a dict of extra health fields; raising makes
                         the health path answer 503 (the app's own readiness check)
    hotswap_smoke        smoke requests of its own ("GET /path -> 200 | ..."), beside
                         srv.ini's `hotswap-smoke`

Importing runs in the uWSGI master (no lazy-apps), before the workers fork: an exception
here, a failed smoke check included, fails the import, and `need-app` stops the release.
"""

from __future__ import annotations

import importlib
import time

_started = time.monotonic()  # load_seconds covers the app's whole import

from . import wsgi  # noqa: E402


def load(spec: str) -> wsgi.WsgiApp:
    module_name, attr, factory = wsgi.parse_target(spec)
    module = importlib.import_module(module_name)
    target = getattr(module, attr, None)
    if target is None:
        raise wsgi.EntryError(f"{wsgi.APP_KEY} = {spec!r}: {module_name} has no {attr!r}")
    app = target() if factory else target
    if not callable(app):
        raise wsgi.EntryError(f"{wsgi.APP_KEY} = {spec!r}: {attr} is no WSGI callable")
    if isinstance(app, wsgi.Middleware) or isinstance(getattr(app, "wsgi_app", None),
                                                      wsgi.Middleware):
        return app  # the app wraps itself (as srv.py does): wrap once
    return wsgi.wrap(
        app,
        generation=getattr(module, "hotswap_generation", None)
        or wsgi.source_digest(module.__file__),
        health=getattr(module, "hotswap_health", None),
        smoke=wsgi.parse_smoke(getattr(module, "hotswap_smoke", "")),
        started=_started,
    )


_spec = wsgi.ini_option(wsgi.APP_KEY)
if not _spec:
    raise wsgi.EntryError(f"srv.ini does not set {wsgi.APP_KEY} = package.module:callable")
application = load(_spec)
