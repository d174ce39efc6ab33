"""Real-process fixtures: each test gets its own copy of the service in a temp folder.

srv.ini resolves every path against its own folder (%d), so a copy of srv.py + srv.ini
beside a generated resource is a complete, isolated instance: its own socket, FIFOs,
pidfile and log. Every process a test starts is stopped by pid at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hotswap.swap import probe  # noqa: E402
from hotswap.system import procs, stats  # noqa: E402
from scripts.build_store import main as build_store  # noqa: E402
from scripts.gen_resource import write_resource  # noqa: E402

TEST_TERMS = 50_000
START_TIMEOUT = 60.0

# A release whose import blocks until the test says so: lets tests act "mid-load" without
# guessing at timings. It writes its pid (the new master's) where the test can read it, then
# blocks reading a FIFO until the test opens and closes its write end.
HANGING_PREAMBLE = '''\
import os as _os
_here = _os.path.dirname(_os.path.abspath(__file__))
with open(_os.path.join(_here, "loading.pid"), "w") as _f:
    _f.write(str(_os.getpid()))
with open(_os.path.join(_here, "release.go")) as _gate:
    _gate.read()
'''


class Service:
    """One isolated hotswap instance under a temp folder.

    mode "heap" (SRV_MODE=heap: the table in each process's heap) or "store" (the
    memory-mapped store srv.py serves by default, built from the same table)."""

    python = sys.executable  # the Python whose hotswap runs (a wheel's venv: test_package.py)

    def __init__(self, root: Path, mode: str = "heap", sample: bool = True) -> None:
        """sample=False: no srv.py copy (tests/app_util.py sets projects up with `init`)."""
        self.root = root
        self.mode = mode
        if sample:
            shutil.copy(REPO / "srv.py", root / "srv.py")
            shutil.copy(REPO / "srv.ini", root / "srv.ini")
        self.ini = root / "srv.ini"
        self.socket = root / "run" / "http.sock"
        self.run_dir = root / "run"
        self.pidfile = self.run_dir / "master.pid"
        self.supervisor: subprocess.Popen | None = None
        self.seen_masters: set[int] = set()
        self.background: list[subprocess.Popen] = []  # CLI runs a test left going
        self.health_path = "/healthz"  # srv.ini's hotswap-health
        if sample:
            self.release(version="v1")

    # -- releases -------------------------------------------------------------------
    def release(self, version: str, terms: int = TEST_TERMS) -> None:
        """Deploy a new data release (same code); in store mode also build its store and
        point data/store/current at it (what the next reload or start serves)."""
        write_resource(str(self.root / "data" / "terms.tsv"), terms, seed=7, version=version)
        if self.mode == "store":
            self.build_store(version, point=True)

    def build_store(self, version: str, point: bool = False) -> Path:
        """Build data/store/terms-VERSION.lmdb from data/terms.tsv; returns its path."""
        args = [str(self.root / "data" / "terms.tsv"), "-o", str(self.store_dir),
                "--version", version, "--if-missing"]
        assert build_store([*args, "--point"] if point else args) == 0
        return self.store_dir / f"terms-{version}.lmdb"

    @property
    def store_dir(self) -> Path:
        return self.root / "data" / "store"

    def release_code(self, source: str) -> None:
        (self.root / "srv.py").write_text(source)

    def restore_code(self) -> None:
        shutil.copy(REPO / "srv.py", self.root / "srv.py")

    def release_hanging_import(self) -> None:
        for name in ("loading.pid", "release.go"):
            (self.root / name).unlink(missing_ok=True)
        os.mkfifo(self.root / "release.go")
        self.release_code(HANGING_PREAMBLE + (REPO / "srv.py").read_text().replace(
            "from __future__ import annotations\n", ""))

    def loading_pid(self, timeout: float = 30.0) -> int:
        path = self.root / "loading.pid"
        text = procs.wait_until(lambda: path.exists() and path.read_text().strip(), timeout)
        assert text, "the hanging release never started loading"
        return int(text)

    def let_import_finish(self) -> None:
        gate = self.root / "release.go"

        def open_gate() -> bool:
            try:
                os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))  # EOF for the reader
                return True
            except OSError:  # ENXIO: the import has not reached the gate yet
                return False

        assert procs.wait_until(open_gate, 30), "the hanging import never reached its gate"

    # -- processes ------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 180.0, env: dict | None = None):
        """Run `hotswap --ini ... ARGS` to completion; returns CompletedProcess."""
        return subprocess.run(
            [self.python, "-m", "hotswap", "--ini", str(self.ini), *args],
            capture_output=True, text=True, timeout=timeout, cwd=self.root,
            env=dict(os.environ, **(env or {})),
        )

    def cli_background(self, *args: str) -> subprocess.Popen:
        # Unbuffered: a test acts on each phase line as the CLI prints it.
        process = subprocess.Popen(
            [self.python, "-m", "hotswap", "--ini", str(self.ini), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.root,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.background.append(process)
        return process

    def handover(self) -> dict:
        """The hand-over record as the hook wrote it ({} if none)."""
        try:
            return json.loads((self.run_dir / "handover.json").read_text())
        except (OSError, ValueError):
            return {}

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json", timeout=60).stdout)

    def all_workers_accepting(self) -> bool:
        document = stats.read(self.run_dir / "stats.sock")
        workers = stats.workers(document or {})
        return bool(workers) and all(w["accepting"] for w in workers)

    def start(self, test_routes: bool = True) -> dict:
        env = dict(os.environ, SRV_MODE=self.mode)
        if test_routes:
            env["SRV_TEST_ROUTES"] = "1"
        self.supervisor = subprocess.Popen(
            [self.python, "-m", "hotswap", "--ini", str(self.ini), "start", "--supervise"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=self.root,
            env=env, start_new_session=True,
        )
        return self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict:
        """Ready = the accepting hook has run and /healthz answers from that master."""
        def ready():
            master = procs.read_pidfile(self.pidfile)
            handover = self.run_dir / "handover.json"
            health = probe.healthz(self.socket, timeout=2.0, path=self.health_path) \
                if handover.exists() else None
            return probe.from_master(health, master)

        health = procs.wait_until(ready, timeout, interval=0.05)
        assert health, f"service did not become ready; log:\n{self.log_tail()}"
        self.seen_masters.add(health["master_pid"])
        return health

    def health(self) -> dict:
        health = probe.healthz(self.socket, timeout=5.0, path=self.health_path)
        assert health, f"service does not answer {self.health_path}"
        self.seen_masters.add(health["master_pid"])
        return health

    def master(self) -> int | None:
        return procs.read_pidfile(self.pidfile)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.root / "log" / "uwsgi.log").read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def all_pids(self) -> list[int]:
        """Every process of this instance we know of: supervisor, masters, their children."""
        roots = set(self.seen_masters) | {p.pid for p in self.background}
        if self.supervisor:
            roots.add(self.supervisor.pid)
        if (master := self.master()) is not None:
            roots.add(master)
        found = []
        for pid in roots:
            if procs.alive(pid):
                found.append(pid)
                found.extend(procs.descendants(pid))
        return sorted(set(found))

    def teardown(self) -> None:
        for process in self.background:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=30)
        if procs.alive(self.master()):
            self.cli("stop", "--timeout", "20", timeout=60)
        # A master SIGKILLed after its worker may have respawned that worker meanwhile, and a
        # killed process takes a moment to die on a busy machine: kill, wait, look again.
        for _ in range(3):
            doomed = self.all_pids()
            for pid in doomed:
                procs.signal_quietly(pid, signal.SIGKILL)
            procs.wait_gone(doomed, 10)
        if self.supervisor:
            try:
                self.supervisor.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.supervisor.kill()
                self.supervisor.wait(timeout=10)
            if self.supervisor.stderr:
                self.supervisor.stderr.close()
        left = [p for p in self.all_pids() if procs.alive(p)]
        assert not left, f"processes left behind: {left}"


class Lines:
    """A background process's stdout, line by line, as it prints it."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        found = procs.wait_until(
            lambda: next((line for line in self.lines if text in line), None), timeout,
            interval=0.002)
        assert found, f"{text!r} never printed; got {self.lines}"
        return found

    def finish(self, timeout: float = 120.0) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once the process exits."""
        code = self.process.wait(timeout=timeout)
        self.thread.join(timeout=10)
        return code, "".join(self.lines), self.process.stderr.read()


class SlowRequest:
    """GET /sleep in a thread; returns once a worker is busy with it (the request is
    in flight), so the test can then reload or stop underneath it."""

    def __init__(self, service: Service, seconds: float) -> None:
        self.answer: probe.Answer | None = None
        self.thread = threading.Thread(target=self._run, args=(service, seconds))
        self.thread.start()
        # Busy on three polls in a row: a worker still finishing an earlier probe (start's
        # /healthz) shows "busy" for a moment too, and would be mistaken for this request.
        streak = [0]

        def in_flight() -> bool:
            streak[0] = streak[0] + 1 if busy_workers(service) else 0
            return streak[0] >= 3

        assert procs.wait_until(in_flight, 10), "request never started"

    def _run(self, service: Service, seconds: float) -> None:
        self.answer = probe.get(service.socket, f"/sleep?seconds={seconds}", timeout=30)

    def result(self) -> probe.Answer:
        self.thread.join(timeout=30)
        assert self.answer is not None, "the slow request got no answer"
        return self.answer


def busy_workers(service: Service) -> int:
    document = stats.read(service.run_dir / "stats.sock")
    return sum(1 for w in stats.workers(document or {}) if w["status"] == "busy")


@pytest.fixture
def service(tmp_path: Path):
    svc = Service(tmp_path)
    try:
        yield svc
    finally:
        svc.teardown()


def sample_paths(svc: Service, count: int = 50) -> tuple[str, ...]:
    """/healthz plus lookups of real terms from the service's resource."""
    paths = ["/healthz"]
    with open(svc.root / "data" / "terms.tsv") as handle:
        next(handle)
        for _, line in zip(range(count), handle, strict=False):
            paths.append(f"/lookup?q={line.split(chr(9))[0]}")
    return tuple(paths)


# The longest files first: under `make test` (two xdist workers, one file each at a time) the
# fleet's Ansible runs overlap the rest instead of running alone at the end.
LONGEST_FIRST = ("test_fleet", "test_fleet_demo", "test_systemd", "test_watch_systemd",
                 "test_faults")


def pytest_collection_modifyitems(config, items) -> None:
    def rank(item) -> int:
        stem = item.path.stem
        return LONGEST_FIRST.index(stem) if stem in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
