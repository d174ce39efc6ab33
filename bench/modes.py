"""The reload strategies the bench compares, one small class each.

Every mode runs the same srv.py from a private work dir (copied there by prepare(), with its
own config beside it, so `%d` in the ini files resolves to that dir), serves on
<workdir>/run/http.sock, and implements:

    start(version)   launch, return once that resource version answers /healthz
    reload(version)  swap to the release already placed at data/terms.tsv; returns a Window
                     (from the reload command until the new generation answers and every
                     process of the old one is gone)
    stop()           stop everything it started, by pid / process group
    pids()           the live processes of the server, for memory sampling

Every server runs in a session of its own (start_new_session), which is how pids() finds
masters that re-fork or re-exec and get re-parented.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import memory
from hotswap.protocol import fifo, store
from hotswap.swap import probe
from hotswap.system import procs, stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "bench", "configs")
VENV_BIN = os.path.dirname(sys.executable)
POLL = 0.02  # seconds between probes while waiting for a generation to answer


class ModeError(RuntimeError):
    pass


@dataclass
class Window:
    """One reload, as seen from outside."""

    index: int
    start: float  # time.time() when the reload command was issued
    end: float  # time.time() when the new generation answered and the old one was gone
    ok: bool
    version: str  # the resource version this reload installed
    generation: str = ""  # the X-Generation that answered afterwards
    load_seconds: float | None = None  # the new generation's own import time (/healthz)
    detail: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.end - self.start


# -- probing: hotswap's own helpers, so the bench measures with the same instruments -------

health = probe.healthz  # (socket path, timeout) -> the /healthz document or None
alive = procs.alive
children = procs.children


def wait_until(predicate, timeout: float, what: str, interval: float = POLL):
    value = procs.wait_until(predicate, timeout, interval)
    if not value:
        raise ModeError(f"timed out after {timeout:.0f}s waiting for {what}")
    return value


def wait_version(sock_path: str, version: str, timeout: float) -> dict:
    """Poll /healthz until the given resource version answers; return that document."""

    def answered():
        doc = health(sock_path, timeout=min(5.0, timeout))
        return doc if doc and doc.get("resource_version") == version else None

    return wait_until(answered, timeout, f"resource version {version} to answer")


def wait_gone(pids, timeout: float, what: str) -> None:
    wait_until(lambda: not any(alive(p) for p in pids), timeout, what)


def _write_fifo(path: str, command: bytes, timeout: float = 5.0) -> None:
    try:
        fifo.send(Path(path), command.decode(), settle=timeout)
    except fifo.NoReader as exc:
        raise ModeError(f"cannot write to master FIFO {path}: {exc.strerror}") from exc


def uwsgi_stats(path: str, timeout: float = 5.0) -> dict | None:
    return stats.read(Path(path), timeout)


def _read_pid(path: str) -> int:
    return procs.read_pidfile(path) or 0


# -- modes ---------------------------------------------------------------------------------

class Mode:
    name = "base"
    title = "base"
    config: str | None = None  # file under bench/configs copied into the work dir
    srv_mode = "heap"  # SRV_MODE for srv.py: the heap rows are the baseline
    start_timeout = 120.0
    reload_timeout = float(os.environ.get("BENCH_RELOAD_TIMEOUT", 180))

    def __init__(self, workdir: str, log=print) -> None:
        self.workdir = workdir
        self.log = log
        self.socket = os.path.join(workdir, "run", "http.sock")
        self.resource = os.path.join(workdir, "data", "terms.tsv")
        self.procs: list[subprocess.Popen] = []  # every session leader we launched
        self.started_health: dict | None = None
        self._logs: list = []

    # files
    def prepare(self) -> None:
        for sub in ("run", "log", "data"):
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        shutil.copy2(os.path.join(REPO, "srv.py"), os.path.join(self.workdir, "srv.py"))
        if self.config:
            shutil.copy2(os.path.join(CONFIGS, self.config), self.workdir)

    def _launch(self, argv: list[str], logname: str, env: dict | None = None) -> subprocess.Popen:
        out = open(os.path.join(self.workdir, "log", logname), "ab")  # noqa: SIM115
        self._logs.append(out)
        proc = subprocess.Popen(
            argv, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "SRV_MODE": self.srv_mode, **(env or {})},
        )
        self.procs.append(proc)
        return proc

    def sessions(self) -> list[int]:
        return [p.pid for p in self.procs]

    def pids(self) -> list[int]:
        return memory.server_pids(sessions=self.sessions())

    def _reap(self) -> None:
        for proc in self.procs:
            proc.poll()

    def start(self, version: str) -> dict:
        raise NotImplementedError

    def stage(self, pairs, versions: list[str]) -> None:
        """Before any load: build what a release needs beyond data/terms.tsv (store modes)."""

    def reload(self, index: int, version: str) -> Window:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _force_stop(self, timeout: float = 30.0) -> None:
        """Last resort: TERM, then KILL, our own process groups and whatever is left of the
        server (by pid), then reap."""
        deadline = time.monotonic() + timeout
        for sig in (signal.SIGTERM, signal.SIGKILL):
            leftovers = self.pids()
            if not leftovers:
                break
            self.log(f"  [{self.name}] sending {sig.name} to {leftovers}")
            for proc in self.procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        pass
            for pid in leftovers:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            while self.pids() and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.1)
        self._reap()

    def close(self) -> None:
        self._reap()
        for handle in self._logs:
            handle.close()
        self._logs.clear()


class _UwsgiMode(Mode):
    """A plain uWSGI master with one master FIFO (bench/configs/uwsgi-*.ini)."""

    fifo_command = b"r"

    @property
    def ini(self) -> str:
        return os.path.join(self.workdir, self.config)

    @property
    def fifo(self) -> str:
        return os.path.join(self.workdir, "run", "0.fifo")

    def _spawn(self) -> subprocess.Popen:
        for stale in (self.fifo, self.socket, self.stats_socket):
            if os.path.exists(stale):
                os.unlink(stale)
        return self._launch([os.path.join(VENV_BIN, "uwsgi"), "--ini", self.ini], "stdout.log")

    def start(self, version: str) -> dict:
        self._spawn()
        self.started_health = wait_version(self.socket, version, self.start_timeout)
        self.wait_ready(set(), self.start_timeout)
        return self.started_health

    def master_pid(self) -> int:
        return self.procs[-1].pid

    @property
    def stats_socket(self) -> str:
        return os.path.join(self.workdir, "run", "stats.sock")

    def wait_ready(self, old_workers: set[int], timeout: float) -> None:
        """Until all `processes` workers are new ones that accept (the stats socket): with
        lazy-apps a worker is forked before it imports the app, and a chain reload is not
        over until its last new worker is ready."""

        def ready() -> bool:
            doc = uwsgi_stats(self.stats_socket)
            if not doc or len(doc.get("workers", [])) != self.processes:
                return False
            return all(w["pid"] > 0 and w["pid"] not in old_workers and w.get("accepting")
                       for w in doc["workers"])

        wait_until(ready, timeout, "every worker of the new generation to accept")

    processes = 4  # as in the bench's ini files (and srv.ini)

    def reload(self, index: int, version: str) -> Window:
        master = self.master_pid()
        old_workers = children(master)
        start = time.time()
        ok, detail, doc = True, "", {}
        try:
            _write_fifo(self.fifo, self.fifo_command)
            doc = wait_version(self.socket, version, self.reload_timeout)
            wait_gone(old_workers, self.reload_timeout, "the old workers to exit")
            self.wait_ready(set(old_workers), self.reload_timeout)
        except ModeError as exc:
            ok, detail = False, str(exc)
        end = time.time()
        return Window(index, start, end, ok and alive(master), version,
                      doc.get("generation", ""), doc.get("load_seconds"), detail,
                      {"master_pid": master, "old_workers": old_workers})

    def stop(self) -> None:
        leaders = [p for p in self.procs if p.poll() is None]
        try:
            _write_fifo(self.fifo, b"q", timeout=2.0)
            wait_until(lambda: not self.pids(), 60, "uWSGI to stop", interval=0.05)
        except ModeError as exc:
            self.log(f"  [{self.name}] graceful stop failed ({exc}); forcing")
            self._force_stop()
        for proc in leaders:
            proc.wait(timeout=10)


class UwsgiGraceful(_UwsgiMode):
    name = "uwsgi-graceful"
    title = "uWSGI graceful reload (r)"
    config = "uwsgi-plain.ini"
    fifo_command = b"r"


class UwsgiChain(_UwsgiMode):
    name = "uwsgi-chain"
    title = "uWSGI chain reload (c, lazy-apps)"
    config = "uwsgi-chain.ini"
    fifo_command = b"c"


class FullRestart(_UwsgiMode):
    name = "full-restart"
    title = "full restart (stop, start)"
    config = "uwsgi-plain.ini"

    def reload(self, index: int, version: str) -> Window:
        start = time.time()
        ok, detail, doc = True, "", {}
        try:
            self.stop()
            self._spawn()
            doc = wait_version(self.socket, version, self.reload_timeout)
            self.wait_ready(set(), self.reload_timeout)
        except (ModeError, subprocess.TimeoutExpired) as exc:
            ok, detail = False, str(exc)
        end = time.time()
        return Window(index, start, end, ok, version, doc.get("generation", ""),
                      doc.get("load_seconds"), detail)


class GunicornReexec(Mode):
    name = "gunicorn-reexec"
    title = "gunicorn re-exec (USR2, TERM old, --preload)"
    config = "gunicorn.conf.py"

    @property
    def pidfile(self) -> str:
        return os.path.join(self.workdir, "run", "master.pid")

    def start(self, version: str) -> dict:
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self._launch([os.path.join(VENV_BIN, "gunicorn"), "-c",
                      os.path.join(self.workdir, self.config), "srv:app"], "stdout.log")
        self.started_health = wait_version(self.socket, version, self.start_timeout)
        master = int(self.started_health["master_pid"])
        wait_until(lambda: len(children(master)) >= self.workers, self.start_timeout,
                   "gunicorn's workers")
        return self.started_health

    workers = 4  # as in bench/configs/gunicorn.conf.py

    def master_pid(self) -> int:
        return _read_pid(self.pidfile) or self.procs[-1].pid

    def reload(self, index: int, version: str) -> Window:
        before = health(self.socket) or {}
        old_master = int(before.get("master_pid") or self.master_pid())
        old_workers = children(old_master)
        start = time.time()
        ok, detail, doc, new_master = True, "", {}, 0
        try:
            os.kill(old_master, signal.SIGUSR2)
            doc = wait_version(self.socket, version, self.reload_timeout)
            new_master = int(doc.get("master_pid", 0))
            os.kill(old_master, signal.SIGTERM)
            wait_gone([old_master, *old_workers], self.reload_timeout,
                      "the old gunicorn master and workers to exit")
            wait_until(lambda: len(children(new_master)) >= self.workers, self.reload_timeout,
                       "the new master's workers")
        except (ModeError, OSError) as exc:
            ok, detail = False, str(exc)
        end = time.time()
        self._reap()  # the first old master is our child: a zombie parent blocks promotion
        if ok:
            # Not part of the window: gunicorn notices that its parent is gone (its loop wakes
            # about once a second) and renames master.pid.2 to master.pid. Until then it
            # ignores USR2 ("Parent exists"), so the next reload has to wait for it.
            try:
                wait_until(lambda: _read_pid(self.pidfile) == new_master, 30,
                           "the new gunicorn master to be promoted")
            except ModeError as exc:
                detail = str(exc)
        return Window(index, start, end, ok, version, doc.get("generation", ""),
                      doc.get("load_seconds"), detail,
                      {"old_master": old_master, "new_master": new_master,
                       "promoted_after": round(time.time() - end, 3)})

    def stop(self) -> None:
        master = int((health(self.socket) or {}).get("master_pid") or self.master_pid())
        try:
            if alive(master):
                os.kill(master, signal.SIGTERM)
            wait_until(lambda: not self.pids(), 60, "gunicorn to stop", interval=0.05)
        except (ModeError, OSError) as exc:
            self.log(f"  [{self.name}] graceful stop failed ({exc}); forcing")
            self._force_stop()
        self._reap()


class Hotswap(Mode):
    """The project's own CLI: `hotswap start` (a foreground supervisor), `hotswap reload`
    (synchronous), `hotswap stop`."""

    name = "hotswap"
    title = "hotswap reload (master re-fork)"
    config = None  # uses a copy of the repository's own srv.ini

    def prepare(self) -> None:
        super().prepare()
        shutil.copy2(os.path.join(REPO, "srv.ini"), os.path.join(self.workdir, "srv.ini"))

    @property
    def ini(self) -> str:
        return os.path.join(self.workdir, "srv.ini")

    def cli(self, *args: str) -> list[str]:
        return [os.path.join(VENV_BIN, "hotswap"), "--ini", self.ini, *args]

    def start(self, version: str) -> dict:
        self.supervisor = self._launch(self.cli("start", "--supervise"), "hotswap-start.log")
        try:
            self.started_health = wait_version(self.socket, version, self.start_timeout)
        except ModeError:
            if self.supervisor.poll() is not None:
                raise ModeError(f"`hotswap start` exited with {self.supervisor.returncode}; "
                                f"see {self.workdir}/log/hotswap-start.log") from None
            raise
        return self.started_health

    def reload(self, index: int, version: str) -> Window:
        before = health(self.socket) or {}
        old_master = int(before.get("master_pid", 0))
        old_procs = [old_master, *children(old_master)] if old_master else []
        start = time.time()
        try:
            # the CLI's own --timeout (it rolls back) fires before ours (we would only kill it)
            proc = subprocess.run(
                self.cli("reload", "--json", "--timeout", str(self.reload_timeout - 30)),
                cwd=self.workdir, capture_output=True, text=True, timeout=self.reload_timeout)
        except subprocess.TimeoutExpired as exc:
            return Window(index, start, time.time(), False, version, "", None,
                          f"`hotswap reload` still running after {self.reload_timeout:.0f}s; "
                          f"killed. stderr: {(exc.stderr or b'')[-500:]!r}")
        returned = time.time()
        ok = proc.returncode == 0
        detail = "" if ok else (
            f"hotswap reload exit {proc.returncode}: {(proc.stderr or proc.stdout)[-500:]}")
        # Check the CLI's promise from outside: the new generation answers and the old
        # master (and its workers) are gone by the time it returns.
        doc = health(self.socket) or {}
        lingering = [p for p in old_procs if alive(p)]
        extra = {"cli_exit": proc.returncode, "old_master": old_master,
                 "lingering_at_return": lingering, "cli_seconds": round(returned - start, 3)}
        try:
            cli = json.loads(proc.stdout)
            extra["cli_result"] = {k: cli.get(k) for k in (
                "seconds", "finished_at", "old_master", "new_master", "new_generation", "phases",
                "message")}
        except ValueError:
            extra["cli_stdout"] = proc.stdout[-2000:]
        end = returned
        if ok and doc.get("resource_version") != version:
            detail = f"CLI returned 0 but /healthz serves {doc.get('resource_version')!r}"
            try:
                doc = wait_version(self.socket, version, self.reload_timeout)
            except ModeError as exc:
                ok, detail = False, f"{detail}; {exc}"
            end = time.time()
        if not ok and not doc:
            # the CLI's promise on failure: the old generation still serves
            detail += "; nothing answered /healthz within 5 s after the failed reload"
        if lingering and ok:  # after a failed reload the old generation is meant to stay
            detail = (detail + "; " if detail else "") + \
                f"old processes {lingering} still alive when the CLI returned"
            try:
                wait_gone(lingering, self.reload_timeout, "the old generation to exit")
            except ModeError as exc:
                ok, detail = False, f"{detail}; {exc}"
            end = max(end, time.time())
            extra["gone_after_return"] = round(time.time() - returned, 3)
        self._reap()
        return Window(index, start, end, ok, version, doc.get("generation", ""),
                      doc.get("load_seconds"), detail, extra)

    def stop(self) -> None:
        try:
            subprocess.run(self.cli("stop"), cwd=self.workdir, capture_output=True,
                           timeout=90)
            wait_until(lambda: not self.pids(), 60, "hotswap to stop", interval=0.05)
            self.supervisor.wait(timeout=10)
        except (ModeError, subprocess.TimeoutExpired) as exc:
            self.log(f"  [{self.name}] `hotswap stop` did not stop everything ({exc}); "
                     "forcing")
            self._force_stop()


class HotswapStore(Hotswap):
    """`hotswap reload` with srv.py in store mode: each release is its own store file,
    built before the load starts; a reload points data/store/current at it first."""

    name = "hotswap-store"
    title = "hotswap reload, store mode (LMDB)"
    srv_mode = "store"

    def store_path(self, version: str) -> str:
        return os.path.join(self.workdir, "data", "store", store.store_file_name(version))

    def stage(self, pairs, versions: list[str]) -> None:
        for version in versions:
            store.build(pairs, self.store_path(version), version)
        store.point(os.path.join(self.workdir, "data", "store", "current"),
                    self.store_path(versions[0]))

    def reload(self, index: int, version: str) -> Window:
        store.point(os.path.join(self.workdir, "data", "store", "current"),
                    self.store_path(version))
        return super().reload(index, version)


class HotswapRefresh(HotswapStore):
    """`hotswap refresh STORE`: a data-only release, the same processes."""

    name = "hotswap-refresh"
    title = "hotswap refresh, store mode (no new processes)"

    def reload(self, index: int, version: str) -> Window:
        start = time.time()
        proc = subprocess.run(self.cli("refresh", self.store_path(version), "--json"),
                              cwd=self.workdir, capture_output=True, text=True,
                              timeout=self.reload_timeout)
        end = time.time()
        doc = health(self.socket) or {}
        try:
            cli = json.loads(proc.stdout)
        except ValueError:
            cli = {"stdout": proc.stdout[-2000:]}
        ok = proc.returncode == 0 and doc.get("resource_version") == version
        detail = "" if ok else f"refresh exit {proc.returncode}: {proc.stderr[-500:]}"
        # "load" of a refresh = its validation pass; the rest is the switch and the CLI
        return Window(index, start, end, ok, version, doc.get("generation", ""),
                      cli.get("validate_seconds"), detail,
                      {"cli_exit": proc.returncode, "cli_result": cli,
                       "cli_seconds": round(end - start, 3)})


class ActivatedRestart(Hotswap):
    """`hotswap stop` then `hotswap start` on a socket held outside uWSGI, as systemd's
    hotswap.socket holds it: the bench binds it once and passes it to each start with
    LISTEN_FDS (scripts/socket-activate.py), so connections made between the stop and the
    start wait in its backlog (docs/operations.md, socket activation)."""

    name = "restart-activated"
    title = "restart, socket-activated"

    def prepare(self) -> None:
        super().prepare()
        with open(self.ini) as ini:
            text = ini.read()
        # uWSGI adopts a passed socket with the ini's protocol (default: uwsgi)
        with open(self.ini, "w") as ini:
            ini.write(text.replace("[uwsgi]\n", "[uwsgi]\nprotocol = http\n", 1))
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.socket)
        self.listener.listen(1024)

    def _launch_activated(self) -> subprocess.Popen:
        fd = self.listener.fileno()
        out = open(os.path.join(self.workdir, "log", "hotswap-start.log"), "ab")  # noqa: SIM115
        self._logs.append(out)
        proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "scripts", "socket-activate.py"), str(fd),
             *self.cli("start", "--exec")],
            cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, pass_fds=(fd,),
            env={**os.environ, "SRV_MODE": self.srv_mode})
        self.procs.append(proc)
        return proc

    def start(self, version: str) -> dict:
        self.supervisor = self._launch_activated()
        self.started_health = wait_version(self.socket, version, self.start_timeout)
        return self.started_health

    def reload(self, index: int, version: str) -> Window:
        start = time.time()
        ok, detail, doc = True, "", {}
        try:
            Hotswap.stop(self)
            doc = self.start(version)
        except (ModeError, subprocess.TimeoutExpired) as exc:
            ok, detail = False, str(exc)
        return Window(index, start, time.time(), ok, version, doc.get("generation", ""),
                      doc.get("load_seconds"), detail)

    def close(self) -> None:
        super().close()
        self.listener.close()


MODES: dict[str, type[Mode]] = {
    cls.name: cls for cls in (Hotswap, HotswapStore, HotswapRefresh, UwsgiGraceful, UwsgiChain,
                              GunicornReexec, FullRestart, ActivatedRestart)
}
