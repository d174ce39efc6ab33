"""Per-generation request metrics, summed over every worker (docs/operations.md#metrics).

Opt-in: `hotswap-metrics = /metrics` in the ini. Only then does wsgi.wrap() import this
module, and this module prometheus_client (the `metrics` extra): without the key nothing of
it loads in any process.

prometheus_client's multiprocess mode: each worker writes its counts into its own
memory-mapped files (`counter_<pid>.db`, `histogram_<pid>.db`) in PROMETHEUS_MULTIPROC_DIR,
and a scrape, answered by any worker, sums every file it finds. Across a re-fork the kit
gives each master (each generation) a folder of its own, `<run_dir>/app-metrics/<pid>-<start
ticks>/`, set as PROMETHEUS_MULTIPROC_DIR before prometheus_client is imported, so its
workers inherit it. A scrape reads every folder, so both generations of a swap are in it,
whichever answers. The rules that keep every count exactly once:

- a count lives in one file only: the worker that counted it wrote it there. A worker that
  dies (SIGKILL, a respawn, a rollback) leaves its file, and the scrape still sums it: a
  counter never drops while its generation's folder exists. (mark_process_dead only drops
  `live*` gauges; there are none here.)
- the series carry `master_pid` as well as `generation`: two masters of the same release
  (a reload of unchanged code) are two series, so removing one folder ends a series instead
  of lowering a sum, which Prometheus would misread as a counter reset.
- a folder is removed only after its master is gone AND a scrape that began after that was
  seen has read it: the sweep (after each scrape) marks a gone master's folder with the
  time, and removes it at a later sweep, at least `hotswap-metrics-keep` seconds later
  (default 300: longer than any scraper's interval), and never by a scrape that began before
  the mark. Its series then end at their final values.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ..system import files, procs
from .wsgi import log as _log  # never failing: a full log disk must not fail a request

FOLDER = "app-metrics"  # under the ini's run_dir
GONE_MARK = "gone"  # in a gone master's folder: the clock when a sweep first saw it gone
DEFAULT_KEEP_SECONDS = 300.0
# each worker's files, allocated up front: a memory-mapped page that a full disk (a small
# /run tmpfs) cannot back is a SIGBUS that kills the worker, a failed allocation only a
# worker without metrics. prometheus_client's own initial size.
PREALLOCATE_BYTES = 1 << 16
KINDS = ("counter", "histogram")
LABELS = ("generation", "master_pid")


def clock() -> float:
    """Seconds on CLOCK_BOOTTIME: one clock for every process of the machine, never stepped."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def folder_name(pid: int) -> str:
    return f"{pid}-{procs.start_ticks(pid)}"


def master_alive(name: str) -> bool:
    """Whether the master a folder is named after still runs (the same process: pid and
    start time; a zombie counts as gone)."""
    pid, _, ticks = name.partition("-")
    if not pid.isdigit() or not ticks.isdigit():
        return True  # not a folder of ours: never touched
    return procs.alive(int(pid)) and procs.start_ticks(int(pid)) == int(ticks)


def status_class(status: str) -> str:
    """'404 NOT FOUND' -> '4xx'."""
    code = status.split(" ", 1)[0]
    return f"{code[0]}xx" if len(code) == 3 and code.isdigit() else "other"


class Generations:
    """The root folder: one subfolder per master, and the sweep that removes the gone ones."""

    def __init__(self, root: Path, keep: float, now: Callable[[], float] = clock,
                 alive: Callable[[str], bool] = master_alive) -> None:
        self.root = root
        self.keep = keep
        self.now = now
        self.alive = alive

    def make_own(self, pid: int) -> Path:
        own = self.root / folder_name(pid)
        own.mkdir(parents=True, exist_ok=True)
        return own

    def files(self) -> list[str]:
        """Every worker's file, but those of a folder being removed."""
        return sorted(str(path) for path in self.root.glob("*/*.db")
                      if not path.parent.name.endswith(".removing"))

    def sweep(self, collected_at: float) -> list[str]:
        """Mark gone masters' folders; remove those marked before `collected_at` (when the
        scrape that just ran began) and at least `keep` ago. Returns the removed names."""
        removed = []
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or folder.name.endswith(".removing") \
                    or self.alive(folder.name):
                continue
            seen = _read_mark(folder / GONE_MARK)
            if seen is None:
                files.atomic_write(folder / GONE_MARK, f"{self.now()!r}\n")
            elif seen < collected_at and self.now() - seen >= self.keep:
                # rename first: a concurrent scrape globs either the whole folder or none
                doomed = folder.with_name(folder.name + ".removing")
                try:
                    folder.rename(doomed)
                except OSError:
                    continue  # another worker's sweep got there first
                shutil.rmtree(doomed, ignore_errors=True)
                removed.append(folder.name)
        for leftover in self.root.glob("*.removing"):  # a sweep killed mid-rmtree
            shutil.rmtree(leftover, ignore_errors=True)
        return removed


def _read_mark(path: Path) -> float | None:
    try:
        return float(path.read_text())
    except (OSError, ValueError):
        return None


class _Merged:
    """What generate_latest() collects from: the samples of every folder's files."""

    def __init__(self, metrics: Iterable) -> None:
        self.metrics = list(metrics)

    def collect(self) -> Iterable:
        return self.metrics


class AppMetrics:
    """The counters a worker writes, the scrape any worker answers."""

    def __init__(self, path: str, generations: Generations, master_pid: int) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector
        from prometheus_client.registry import CollectorRegistry

        self.path = path
        self.generations = generations
        self.master_pid = str(master_pid)
        self.content_type = CONTENT_TYPE_LATEST
        self._merge = MultiProcessCollector.merge
        self._render = generate_latest
        registry = CollectorRegistry()  # not the global one: the app's metrics stay its own
        self.requests = Counter(
            "hotswap_app_requests", "Requests the app answered, by status class",
            (*LABELS, "status_class"), registry=registry)
        self.latency = Histogram(
            "hotswap_app_request_duration_seconds",
            "From the request reaching the app until its answer was sent", LABELS,
            registry=registry)
        self.prepared_pid = 0
        self.broken = False

    # -- a worker counting ------------------------------------------------------------
    def counted(self, app: Callable, environ: dict, start_response: Callable) -> Iterable:
        """`app`'s answer, counted once its body is sent (or the app raised)."""
        began = time.perf_counter()
        seen: list = []

        def capture(status: str, headers: list, exc_info=None):
            seen[:] = [status, headers]
            return start_response(status, headers, exc_info)

        try:
            result = app(environ, capture)
        except BaseException:
            self.observe(seen[0] if seen else "500", seen[1] if seen else [], began)
            raise
        if hasattr(result, "fileno"):
            # wsgi.file_wrapper's file, which uWSGI sends with sendfile() only if it is
            # returned as is: counted now, its latency up to the start of the answer
            self.observe(seen[0] if seen else "500", seen[1] if seen else [], began)
            return result
        return _Closing(result, lambda: self.observe(
            seen[0] if seen else "500", seen[1] if seen else [], began))

    def observe(self, status: str, headers: list, began: float) -> None:
        if self.broken:
            return
        try:
            self._prepare()
            generation = next((v for n, v in headers if n.lower() == "x-generation"), "")
            self.requests.labels(generation, self.master_pid, status_class(status)).inc()
            self.latency.labels(generation, self.master_pid).observe(
                time.perf_counter() - began)
        except Exception as exc:  # never a failed request for a metric: log, stop counting
            self.broken = True
            _log(f"hotswap: request metrics off in worker {os.getpid()}: "
                 f"{type(exc).__name__}: {exc}\n")

    def _prepare(self) -> None:
        """Allocate this worker's files before prometheus_client maps them."""
        pid = os.getpid()
        if self.prepared_pid == pid:
            return
        folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        for kind in KINDS:
            path = os.path.join(folder, f"{kind}_{pid}.db")
            if os.path.exists(path):
                continue  # a reused pid's file: prometheus_client counts on from it
            # allocated beside, then renamed in: a scrape never reads a file still empty
            with files.beside(path) as tmp:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.posix_fallocate(fd, 0, PREALLOCATE_BYTES)
                finally:
                    os.close(fd)
                os.rename(tmp, path)
        self.prepared_pid = pid

    # -- a scrape -----------------------------------------------------------------------
    def exposition(self) -> bytes:
        """Every folder's samples in the text format; then the sweep."""
        for _ in range(3):
            collected_at = self.generations.now()
            try:
                merged = self._merge(self.generations.files(), accumulate=True)
                break
            except FileNotFoundError:
                continue  # a folder removed between the glob and the read: glob again
        else:
            raise FileNotFoundError("the metrics folders kept changing under the scrape")
        body = self._render(_Merged(merged))
        try:
            self.generations.sweep(collected_at)
        except OSError as exc:
            _log(f"hotswap: could not sweep {self.generations.root}: {exc}\n")
        return body

    def answer(self, environ: dict, start_response: Callable) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            status, body, kind = "405 METHOD NOT ALLOWED", b"method not allowed\n", \
                "text/plain"
        else:
            try:
                status, body, kind = "200 OK", self.exposition(), self.content_type
            except Exception as exc:
                status, kind = "500 INTERNAL SERVER ERROR", "text/plain"
                body = f"hotswap: metrics unavailable: {type(exc).__name__}: {exc}\n".encode()
        start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store")])
        return [] if method == "HEAD" else [body]


class _Closing:
    """The app's body, passed through; `done` runs once, when the server closes it."""

    def __init__(self, result: Iterable[bytes], done: Callable[[], None]) -> None:
        self.result = result
        self.done = done

    def __iter__(self):
        return iter(self.result)

    def close(self) -> None:
        try:
            if hasattr(self.result, "close"):
                self.result.close()
        finally:
            self.done()


def enable(path: str, run_dir: str | None, keep: str | None) -> AppMetrics | None:
    """In a uWSGI master at import: this generation's folder, PROMETHEUS_MULTIPROC_DIR set to
    it, prometheus_client imported. None (and one line in the log) when it cannot be."""
    try:
        keep_seconds = DEFAULT_KEEP_SECONDS if keep in (None, "") else float(keep)
    except ValueError:
        _log(f"hotswap: hotswap-metrics-keep = {keep!r} is no number of seconds; "
             f"keeping {DEFAULT_KEEP_SECONDS:.0f}\n")
        keep_seconds = DEFAULT_KEEP_SECONDS
    if not run_dir:
        _log("hotswap: hotswap-metrics is set but the ini has no run_dir: request metrics "
             "off\n")
        return None
    generations = Generations(Path(run_dir) / FOLDER, keep_seconds)
    try:
        own = generations.make_own(os.getpid())
    except OSError as exc:
        _log(f"hotswap: request metrics off: cannot make {generations.root}: {exc}\n")
        return None
    # before the import, which picks the multiprocess mode from it; read again at each
    # worker's first count (a re-forked master inherits the old generation's value)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(own)
    try:
        from prometheus_client import values
        if not values.ValueClass._multiprocess:
            # the app imported prometheus_client before it wrapped itself: from now on (the
            # kit's series, the app's created in the workers) every value is a worker's file
            values.ValueClass = values.MultiProcessValue()
        return AppMetrics(path, generations, os.getpid())
    except ImportError:
        _log(f"hotswap: hotswap-metrics = {path} is set but prometheus_client is not "
             "installed (pip install 'hotswap[metrics]'): request metrics off\n")
        return None
