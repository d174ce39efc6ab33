"""Projects that are not srv.py, set up only through `hotswap init` (tests/test_app.py).

Two apps a user might bring: a plain WSGI function (one module) and a Flask app built by an
application factory (a package). Each release rewrites the app's source with a new VERSION,
so the default generation (a digest of the sources, hotswap/inside/wsgi.py) changes with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import Service

from bench.loadgen import LoadGenerator, summarize
from hotswap.system import procs

PLAIN_APP = '''\
"""A plain WSGI function: its table loads at import, in the uWSGI master."""
import json
from urllib.parse import parse_qs

VERSION = "@VERSION@"
TABLE = {f"k{i}": i * i for i in range(20000)}
if len(TABLE) != 20000:
    raise RuntimeError("table incomplete")  # raise on bad data: the release never serves
BROKEN_ITEM = @BROKEN@  # a release that imports fine and answers 500 on /item
# the app's own smoke check (hotswap.inside.entry reads it beside srv.ini's hotswap-smoke)
hotswap_smoke = "GET /item?k=k1 -> 200"


def application(environ, start_response):
    key = parse_qs(environ.get("QUERY_STRING", "")).get("k", [""])[0]
    if environ.get("PATH_INFO") != "/item":
        status, doc = "404 Not Found", {"error": "no such route"}
    elif BROKEN_ITEM:
        status, doc = "500 Internal Server Error", {"error": "release is broken"}
    elif key in TABLE:
        status, doc = "200 OK", {"k": key, "v": TABLE[key], "version": VERSION}
    else:
        status, doc = "404 Not Found", {"error": f"no {key!r}"}
    body = json.dumps(doc).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]
'''

FLASK_APP = '''\
"""A Flask app made by an application factory, in a package."""
from flask import Flask, jsonify

VERSION = "@VERSION@"


def create_app():
    app = Flask(__name__)
    prices = {f"p{i}": i for i in range(5000)}

    @app.get("/price/<name>")
    def price(name):
        if name not in prices:
            return jsonify(error=f"no {name}"), 404
        return jsonify(name=name, price=prices[name], version=VERSION)

    return app
'''


class InitProject(Service):
    """A project holding one app; srv.ini and the unit come from `hotswap init` only."""

    def __init__(self, root: Path, source: str, module_path: str, app: str,
                 paths: tuple[str, ...], health_path: str = "/healthz",
                 python: str = sys.executable) -> None:
        super().__init__(root, sample=False)
        self.python = python
        self.health_path = health_path
        self.source = source
        self.module_file = root / module_path
        self.module_file.parent.mkdir(parents=True, exist_ok=True)
        self.paths = paths  # what the load generator asks
        self.release_app("r1")
        done = self.init("--app", app, "--health-path", health_path)
        assert done.returncode == 0, done.stderr

    def init(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.python, "-m", "hotswap", "init", "--dir",
                               str(self.root), *args],
                              capture_output=True, text=True, timeout=60, cwd=self.root)

    def release_app(self, version: str, broken_item: bool = False, append: str = "") -> None:
        """A new release of the app's code (written beside, then renamed into place)."""
        text = self.source.replace("@VERSION@", version).replace("@BROKEN@", str(broken_item))
        tmp = self.module_file.with_suffix(".tmp")
        tmp.write_text(text + append)
        tmp.replace(self.module_file)


def plain_project(root: Path, python: str = sys.executable) -> InitProject:
    paths = ("/healthz", *(f"/item?k=k{i}" for i in range(40)))
    return InitProject(root, PLAIN_APP, "plainapp.py", "plainapp:application", paths,
                       python=python)


def flask_project(root: Path) -> InitProject:
    # a health path of its own: reload, status and probe read it from srv.ini
    paths = ("/-/ready", *(f"/price/p{i}" for i in range(40)))
    return InitProject(root, FLASK_APP, "shop/__init__.py", "shop:create_app()", paths,
                       health_path="/-/ready")


CONNECTIONS = 32  # the zero-downtime test's clients


def reload_json(project: InitProject) -> tuple[int, dict, str]:
    done = project.cli("reload", "--json")
    result = json.loads(done.stdout)
    if result.get("new_master"):
        project.seen_masters.add(result["new_master"])
    return done.returncode, result, done.stderr


def swaps_under_load(project: InitProject, reloads: int) -> None:
    """The zero-downtime test: `reloads` new releases under 32 connections, 0 failed."""
    health = project.health()
    load = LoadGenerator(str(project.socket), CONNECTIONS, project.paths,
                         max_seconds=max(240, 10 * reloads))
    with load:
        for n in range(2, reloads + 2):
            project.release_app(f"r{n}")
            code, result, stderr = reload_json(project)
            assert code == 0, (result, stderr)
            after = project.health()
            assert after["generation"] == result["new_generation"] != health["generation"]
            assert after["master_pid"] == result["new_master"] != health["master_pid"]
            assert not procs.alive(health["master_pid"]), "old master left running"
            health = after
    summary = summarize(load.records)
    assert summary["requests"] > 200, summary
    assert summary["failed"] == 0, summary
    assert len(summary["generations"]) == reloads + 1, summary
