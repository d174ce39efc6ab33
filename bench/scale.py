"""`make bench-scale`: heap vs store across resource sizes and worker counts, and the
per-worker alternatives to a re-fork, in one table and one plot.

For every (app, terms, workers) it starts an isolated `hotswap start` instance, then:
1. load: 32 connections of lookups for --load-seconds: throughput and p99 over HTTP;
2. rest: total PSS of all the instance's processes after that load (copy-on-write erosion
   included);
3. code reload: `hotswap reload` with the same data; wall time and peak PSS;
4. data release, under the same load: heap -> `hotswap reload` of a new table; store ->
   `hotswap refresh` of a new store; ttl -> a new table on disk, until every worker reports
   it; signal -> a new table and the switch signal, until every worker reports it. Time,
   peak PSS, PSS after, the worst latency in the window (the stall), and the CPU seconds the
   server's processes spent in it.

Apps: heap and store are srv.py (SRV_MODE); ttl and signal are bench/configs/srv_perworker.py.

    .venv/bin/python -m bench.scale                                  # the full matrix (long)
    .venv/bin/python -m bench.scale --terms 200000 1000000 --workers 2 4 --apps heap store
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import memory
from bench.bench import LoadProcess, Resource, log
from hotswap.inside.live_store import SWITCH_FILE
from hotswap.protocol import store
from hotswap.swap import probe
from hotswap.system import procs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
APPS = ("heap", "store", "ttl", "signal")


@dataclass
class Row:
    app: str
    terms: int
    workers: int
    store_mb: float = 0.0
    table_mb: float = 0.0
    rps: float = 0.0
    p99_ms: float = 0.0
    pss_rest_mb: float = 0.0
    reload_s: float = 0.0
    pss_reload_peak_mb: float = 0.0
    release_s: float = 0.0
    pss_release_peak_mb: float = 0.0
    pss_after_release_mb: float = 0.0
    release_stall_ms: float = 0.0
    release_cpu_s: float = 0.0
    failed: int = 0
    error: str = ""


class Instance:
    """One `hotswap start` in a temp dir, with W workers and one app."""

    def __init__(self, app: str, workers: int, resource: Resource) -> None:
        self.app, self.resource = app, resource
        self.dir = tempfile.mkdtemp(prefix=f"hotswap-scale-{app}-")
        for sub in ("data", "run", "log"):
            os.makedirs(os.path.join(self.dir, sub))
        source = "srv.py" if app in ("heap", "store") else "bench/configs/srv_perworker.py"
        shutil.copy(os.path.join(REPO, source), os.path.join(self.dir, "srv.py"))
        ini = Path(REPO, "srv.ini").read_text()
        ini = re.sub(r"^processes = \d+", f"processes = {workers}", ini, flags=re.M)
        Path(self.dir, "srv.ini").write_text(ini)
        self.ini = os.path.join(self.dir, "srv.ini")
        self.socket = os.path.join(self.dir, "run", "http.sock")
        self.env = dict(os.environ, SRV_MODE="store" if app == "store" else "heap",
                        SRV_ALT=app, SRV_TTL="5")
        self.proc: subprocess.Popen | None = None

    def release(self, version: str) -> str:
        """Put data version `version` in place; returns the store path (store app)."""
        self.resource.write(os.path.join(self.dir, "data", "terms.tsv"), version)
        if self.app != "store":
            return ""
        path = os.path.join(self.dir, "data", "store", store.store_file_name(version))
        store.build(self.resource.pairs(), path, version)
        return path

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(BIN, "hotswap"), "--ini", self.ini, *args],
                              capture_output=True, text=True, env=self.env, timeout=600)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "hotswap"), "--ini", self.ini, "start", "--supervise"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        if not procs.wait_until(lambda: probe.healthz(self.socket, 2.0), 600, interval=0.1):
            raise RuntimeError(f"{self.app} did not start; see {self.dir}/log")

    def pids(self) -> list[int]:
        return memory.server_pids(sessions=[self.proc.pid]) if self.proc else []

    def pss_mb(self) -> float:
        return (memory.measure(self.pids()).pss_kb or 0) / 1024

    def worker_versions(self) -> set[str]:
        workers = [p for p in self.pids() if "worker" in procs.cmdline(p)]
        reports = store.read_reports(os.path.join(self.dir, "run"), workers)
        return {r.version for r in reports.values()} if len(reports) == len(workers) else set()

    def stop(self) -> None:
        self.cli("stop", "--timeout", "60")
        for pid in self.pids():
            procs.signal_quietly(pid, 9)
        if self.proc:
            self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


class CpuMeter:
    """CPU seconds the instance's processes spend while it runs, sampled 10x/s so processes
    that exit (the old generation of a reload) still count up to their last sample."""

    def __init__(self, pids_fn) -> None:
        self.pids_fn = pids_fn
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        table = memory.cpu_table()
        for pid in self.pids_fn():
            if pid in table:
                self.first.setdefault(pid, table[pid][3])
                self.last[pid] = table[pid][3]

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def __enter__(self) -> CpuMeter:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    @property
    def seconds(self) -> float:
        return sum(self.last[p] - self.first[p] for p in self.last) / memory.CLOCK_TICKS


def peak_pss(instance: Instance, action) -> tuple[object, float]:
    """Run action() while sampling PSS 5x/s; return its result and the peak PSS (MB)."""
    sampler = memory.MemorySampler(instance.pids).start()
    try:
        result = action()
    finally:
        samples = sampler.stop()
    return result, max((s.pss_kb or 0) for s in samples) / 1024 if samples else 0.0


def measure(app: str, terms: int, workers: int, resource: Resource, paths: list[str],
            args: argparse.Namespace) -> Row:
    row = Row(app, terms, workers, table_mb=round(resource.size / 2**20, 1))
    inst = Instance(app, workers, resource)
    raw = os.path.join(args.out, "raw")
    try:
        first = inst.release("v0")
        if first:
            store.point(os.path.join(inst.dir, "data", "store", "current"), first)
            row.store_mb = round(os.path.getsize(first) / 2**20, 1)
        new_store = inst.release("v1") if app == "store" else ""
        inst.start()
        load = LoadProcess(inst.socket, 32, paths, os.path.join(raw, "scale-load.jsonl"),
                           args.load_seconds + 30).start()
        time.sleep(args.load_seconds)
        records = [r for r in load.stop() if r["outcome"] == "ok"]
        span = max(r["started"] for r in records) - min(r["started"] for r in records)
        row.rps = round(len(records) / span) if span else 0
        row.p99_ms = round(statistics.quantiles([r["latency"] for r in records], n=100)[98]
                           * 1000, 2)
        row.pss_rest_mb = round(inst.pss_mb(), 1)
        t0 = time.monotonic()
        done, row.pss_reload_peak_mb = peak_pss(inst, lambda: inst.cli("reload"))
        row.reload_s = round(time.monotonic() - t0, 2)
        if done.returncode != 0:
            raise RuntimeError(f"reload failed: {done.stderr.strip()[-300:]}")
        release(inst, app, new_store, row, paths, raw)
    except Exception as exc:  # noqa: BLE001 - one failed configuration must not sink the run
        row.error = f"{type(exc).__name__}: {exc}"[:300]
        log(f"  {app} {terms} x{workers}: {row.error}")
    finally:
        inst.stop()
    return row


def release(inst: Instance, app: str, new_store: str, row: Row, paths: list[str],
            raw: str) -> None:
    """The data release, under load: time, PSS peak and after, stall, server CPU."""
    if app != "store":
        inst.release("v1")  # in place before the clock starts (ttl: picked up at expiry)
    load = LoadProcess(inst.socket, 32, paths, os.path.join(raw, "scale-release.jsonl"),
                       600).start()
    time.sleep(1.0)
    t0, wall0 = time.monotonic(), time.time()
    meter = CpuMeter(inst.pids).__enter__()

    def act() -> None:
        if app == "store":
            done = inst.cli("refresh", new_store)
        elif app == "heap":
            done = inst.cli("reload")
        else:
            if app == "signal":
                with open(os.path.join(inst.dir, "run", SWITCH_FILE), "w") as handle:
                    handle.write(str(time.time()))
            if not procs.wait_until(lambda: inst.worker_versions() == {"v1"}, 120):
                raise RuntimeError("workers did not all load v1 within 120 s")
            return
        if done.returncode != 0:
            raise RuntimeError(f"release failed: {done.stderr.strip()[-300:]}")

    try:
        _, row.pss_release_peak_mb = peak_pss(inst, act)
    finally:
        row.release_s = round(time.monotonic() - t0, 3)
        wall1 = time.time()
        meter.__exit__()
        row.release_cpu_s = round(meter.seconds, 2)
        time.sleep(1.0)
        records = load.stop()
    row.pss_after_release_mb = round(inst.pss_mb(), 1)
    row.pss_release_peak_mb = round(row.pss_release_peak_mb, 1)
    row.pss_reload_peak_mb = round(row.pss_reload_peak_mb, 1)
    inside = [r for r in records if r["started"] <= wall1 and
              r["started"] + r["latency"] >= wall0]
    row.release_stall_ms = round(max((r["latency"] for r in inside), default=0) * 1000, 1)
    row.failed = sum(1 for r in records if r["outcome"] != "ok")


def render(rows: list[Row], out: str, command: str) -> str:
    head = ("| app | terms | W | table / store MB | lookups/s | p99 ms | PSS rest MB | "
            "reload s | PSS reload peak | data release s | PSS release peak → after | "
            "release stall ms | release CPU s | failed |")
    lines = [f"Command: `{command}`. 2 shared cores: noisy figures.", "", head,
             "|" + "---|" * 14]
    for r in rows:
        if r.error:
            lines.append(f"| {r.app} | {r.terms:,} | {r.workers} | {r.error} |" + " |" * 10)
            continue
        size = f"{r.table_mb} / {r.store_mb}" if r.store_mb else f"{r.table_mb}"
        lines.append(
            f"| {r.app} | {r.terms:,} | {r.workers} | {size} | {r.rps:,.0f} | {r.p99_ms} | "
            f"{r.pss_rest_mb} | {r.reload_s} | {r.pss_reload_peak_mb} | {r.release_s} | "
            f"{r.pss_release_peak_mb} → {r.pss_after_release_mb} | {r.release_stall_ms} | "
            f"{r.release_cpu_s} | {r.failed} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "scale.md"), "w") as handle:
        handle.write(table)
    plot(rows, os.path.join(out, "scale.png"))
    return table


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for app in APPS:
        mine = [r for r in rows if r.app == app and not r.error]
        for workers in sorted({r.workers for r in mine}):
            pts = sorted((r.terms, r) for r in mine if r.workers == workers)
            if not pts:
                continue
            xs = [t / 1e6 for t, _ in pts]
            label = f"{app} W={workers}"
            axes[0].plot(xs, [r.pss_rest_mb for _, r in pts], marker="o", label=label)
            axes[1].plot(xs, [r.pss_release_peak_mb for _, r in pts], marker="o", label=label)
            axes[2].plot(xs, [r.release_stall_ms for _, r in pts], marker="o", label=label)
    titles = ("total PSS at rest (MB)", "peak PSS during a data release (MB)",
              "worst latency during a data release (ms)")
    for axis, title in zip(axes, titles, strict=True):
        axis.set_title(title)
        axis.set_xlabel("million terms")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--terms", type=int, nargs="+", default=[2_000_000, 8_000_000,
                                                                   32_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--apps", nargs="+", choices=APPS, default=list(APPS))
    parser.add_argument("--load-seconds", type=float, default=5.0)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = parser.parse_args(argv)
    os.makedirs(os.path.join(args.out, "raw"), exist_ok=True)
    command = "python -m bench.scale " + " ".join(sys.argv[1:] if argv is None else argv)
    rows: list[Row] = []
    for terms in args.terms:
        resource = Resource(os.path.join(args.out, "raw"), terms)
        paths = [f"/lookup?q={t}" for t in resource.sample_terms(50)]
        for app in args.apps:
            for workers in args.workers:
                log(f"{app}: {terms:,} terms, {workers} workers")
                rows.append(measure(app, terms, workers, resource, paths, args))
                log(f"  {asdict(rows[-1])}")
        del resource
    with open(os.path.join(args.out, "scale.json"), "w") as handle:
        json.dump({"command": command, "rows": [asdict(r) for r in rows]}, handle, indent=1)
    print(render(rows, args.out, command))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
