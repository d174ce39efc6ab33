"""A service in the release layout (hotswap init-releases ROOT), shared by test_releases and
test_watch.

ROOT/hotswap.ini, ROOT/current -> releases/<id>, ROOT/run, ROOT/log; release sources are
built under SRC (srv.py, srv.ini, data/terms.tsv) and shipped with `hotswap deploy` or by
dropping them into ROOT/drop.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from conftest import REPO, Service

from scripts.gen_resource import write_resource

# Small tables: these tests measure swaps, not imports (the first terms of a table are the same
# whatever its size, so lookups of the v1 table's terms hit in every release)
TERMS = 5_000

# Blocks the release's import until the test opens ROOT/gate (see conftest.HANGING_PREAMBLE);
# absolute paths, since the release is copied to a folder whose name the test learns later.
GATED_PREAMBLE = '''\
with open({pid!r}, "w") as _f:
    import os as _os
    _f.write(str(_os.getpid()))
with open({gate!r}) as _gate:
    _gate.read()
'''


class LayoutService(Service):
    """Service's process handling (start, cli, health, teardown) over a release layout."""

    def __init__(self, base: Path) -> None:  # noqa: D107 - Service.__init__ copies a clone
        self.mode = "heap"
        self.health_path = "/healthz"
        self.src = base / "src"
        self.root = base / "app"
        self.ini = self.root / "hotswap.ini"
        self.run_dir = self.root / "run"
        self.socket = self.run_dir / "http.sock"
        self.pidfile = self.run_dir / "master.pid"
        self.supervisor = None
        self.seen_masters: set[int] = set()
        self.background = []
        self.root.mkdir()
        self.resource = base / "terms-v1.tsv"
        write_resource(str(self.resource), TERMS, seed=7, version="v1")
        done = self.cli("init-releases", str(self.root))
        assert done.returncode == 0, done.stderr

    def source(self, name: str, code: str | None = None) -> Path:
        """A release folder SRC/NAME: the repo's srv.ini, srv.py (or `code` before it) and
        a table whose version is NAME (so /healthz's generation starts with NAME+)."""
        folder = self.src / name
        (folder / "data").mkdir(parents=True)
        shutil.copy(REPO / "srv.ini", folder / "srv.ini")
        app = (REPO / "srv.py").read_text()
        if code:  # code first: the __future__ import must then go (annotations stay strings)
            app = code + app.replace("from __future__ import annotations\n", "")
        (folder / "srv.py").write_text(app)
        write_resource(str(folder / "data" / "terms.tsv"), TERMS, seed=7, version=name)
        return folder

    def broken_source(self, name: str) -> Path:
        return self.source(name, "import hotswap_no_such_module  # noqa\n")

    def gated_source(self, name: str) -> Path:
        for path in (self.root / "loading.pid", self.root / "release.go"):
            path.unlink(missing_ok=True)
        os.mkfifo(self.root / "release.go")
        preamble = GATED_PREAMBLE.format(pid=str(self.root / "loading.pid"),
                                         gate=str(self.root / "release.go"))
        return self.source(name, preamble)

    def current(self) -> str:
        return Path(os.readlink(self.root / "current")).name

    def releases(self) -> list[dict]:
        done = self.cli("releases", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def serving_name(self) -> str:
        """The source name of the release that answers (its table's version)."""
        return self.health()["generation"].split("+")[0]


def lookup_paths(service: LayoutService, count: int = 50) -> tuple[str, ...]:
    paths = ["/healthz"]
    with open(service.resource) as handle:
        next(handle)
        for _, line in zip(range(count), handle, strict=False):
            paths.append(f"/lookup?q={line.split(chr(9))[0]}")
    return tuple(paths)
