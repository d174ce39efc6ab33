"""Benchmark hotswap's master re-fork against the other ways to ship a release, in one run.

    python -m bench.bench [--reloads K] [--terms N] [--connections C] [--modes ...]
                          [--quick] [--out bench/results]

For every mode (see bench/modes.py) the bench copies srv.py and the mode's config into a
private temp dir, installs release 0 of the same generated resource there, starts the
server, drives closed-loop load from bench/loadgen.py (a separate process, C connections
over the unix socket), performs K reloads (release i = the same table with
version=<run>-<mode>-<i>, so each reload is a new generation), and records every request
(start, latency, outcome, generation), every reload window and the server's memory.

Mode "hotswap-nginx" repeats the hotswap reloads with nginx in front (proxy_next_upstream
off) and wrk on loopback TCP as an independent client.

Results: bench/results/results.md (the table), bench/results/latency.png (the plot),
bench/results/results.json (everything the table is made of) and bench/results/raw/ (every
request; not committed). `python -m bench.report --out DIR` re-renders from those files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict

from bench import report
from bench.memory import MemorySampler
from bench.modes import MODES, REPO, VENV_BIN, Hotswap, ModeError, Window, wait_until
from hotswap.system import procs

NGINX_MODE = "hotswap-nginx"
ALL_MODES = [*MODES, NGINX_MODE]
DEFAULT_TERMS = 2_000_000
QUICK_TERMS = 20_000


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the resource ---------------------------------------------------------------------------

class Resource:
    """One generated table (scripts/gen_resource.py, cached by size and seed) that can be
    written out under any release version: the body, hence its checksum, stays the same,
    exactly as `gen_resource.py --terms N --seed S --version V` would write it."""

    def __init__(self, cache_dir: str, terms: int, seed: int = 1) -> None:
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f"base-terms-{terms}-seed{seed}.tsv")
        if not self._valid(path):
            log(f"generating the resource: {terms} terms (scripts/gen_resource.py)")
            subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gen_resource.py"),
                            "--terms", str(terms), "--seed", str(seed), "--version", "base",
                            "-o", path], check=True, stdout=subprocess.DEVNULL)
        with open(path, "rb") as handle:
            self.header = handle.readline().decode()
            self.body = handle.read()
        self.terms = terms
        self.size = len(self.header) + len(self.body)

    @staticmethod
    def _valid(path: str) -> bool:
        import hashlib

        try:
            with open(path, "rb") as handle:
                header = handle.readline().decode()
                body = handle.read()
        except OSError:
            return False
        return f"sha256={hashlib.sha256(body).hexdigest()}" in header

    def write(self, path: str, version: str) -> None:
        fields = [f"version={version}" if f.startswith("version=") else f
                  for f in self.header.split(" ")]
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as out:
            out.write(" ".join(fields).encode())
            out.write(self.body)
        os.replace(tmp, path)

    def pairs(self) -> list[tuple[bytes, bytes]]:
        """(term, tags) sorted by term, for the store modes (parsed once per run)."""
        if not hasattr(self, "_pairs"):
            lines = self.body.split(b"\n")
            lines.sort()  # "\t" sorts before any term character: this sorts by term
            self._pairs = [tuple(line.split(b"\t", 1)) for line in lines if line]
        return self._pairs

    def sample_terms(self, count: int = 7) -> list[str]:
        lines = self.body[:4096].decode().splitlines()[:count]
        return [line.split("\t", 1)[0] for line in lines]


# -- load -----------------------------------------------------------------------------------

def _catches_sigint(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as handle:
            caught = next(line for line in handle if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return True  # gone or unreadable: nothing to wait for
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGINT - 1)))


class LoadProcess:
    """bench/loadgen.py in a process of its own (its 32 threads then do not share a GIL with
    the harness that drives reloads and samples memory), stopped with SIGINT."""

    def __init__(self, sock: str, connections: int, paths: list[str], out: str,
                 max_seconds: float) -> None:
        self.out = out
        self.argv = [sys.executable, "-m", "bench.loadgen", "--socket", sock,
                     "--connections", str(connections), "--seconds", str(max_seconds),
                     "--max-requests", "5000000", "--out", out]
        for path in paths:
            self.argv += ["--path", path]
        self.proc: subprocess.Popen | None = None

    def start(self) -> LoadProcess:
        self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        # stop() sends SIGINT: wait until Python has installed its handler (SigCgt bit 2),
        # which a busy machine can delay by seconds, then for the try: around its wait loop
        procs.wait_until(lambda: _catches_sigint(self.proc.pid), 30)
        time.sleep(0.3)
        return self

    def stop(self) -> list[dict]:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if self.proc.returncode != 0 or not os.path.exists(self.out):
            raise ModeError(f"load client failed (exit {self.proc.returncode}): {err[-1000:]}")
        with open(self.out) as handle:
            return [json.loads(line) for line in handle]


# -- one mode --------------------------------------------------------------------------------

class Plan:
    def __init__(self, args: argparse.Namespace, run_id: str) -> None:
        self.reloads = args.reloads
        self.connections = args.connections
        self.lead = args.lead
        self.gap = args.gap
        self.tail = args.tail
        self.run_id = run_id
        self.out = args.out
        self.raw = os.path.join(args.out, "raw")
        self.keep = args.keep_workdirs

    def versions(self, mode: str) -> list[str]:
        return [f"{self.run_id}-{mode}-{i}" for i in range(self.reloads + 1)]


def _stage_releases(workdir: str, resource: Resource, versions: list[str]) -> list[str]:
    """Write every release up front (before any load), so installing one during the run
    is a rename and costs the server nothing."""
    paths = []
    for i, version in enumerate(versions):
        path = os.path.join(workdir, "data", f"release-{i}.tsv")
        resource.write(path, version)
        paths.append(path)
    return paths


def _reload_loop(mode, plan: Plan, releases: list[str], versions: list[str]) -> list[Window]:
    windows = []
    for i in range(1, plan.reloads + 1):
        os.replace(releases[i], mode.resource)
        window = mode.reload(i, versions[i])
        windows.append(window)
        status = "ok" if window.ok else f"FAILED: {window.detail}"
        log(f"  reload {i}/{plan.reloads}: {window.seconds:.2f}s "
            f"(app load {window.load_seconds}s) {status}"
            + (f" [{window.detail}]" if window.ok and window.detail else ""))
        time.sleep(plan.gap)
    return windows


BUSY_WARNING = 0.25  # cores


def _check_background(name: str) -> float:
    busy = background_cpu(1.0)
    if busy > BUSY_WARNING:
        log(f"  WARNING: {busy} cores busy with something else before {name}'s load "
            "started; its figures are skewed (run the bench on an otherwise idle machine)")
    return busy


def run_mode(name: str, plan: Plan, resource: Resource, paths: list[str]) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"hotswap-bench-{name}-")
    mode = MODES[name](workdir, log=log)
    versions = plan.versions(name)
    result: dict = {"mode": name, "title": mode.title, "workdir": workdir,
                    "connections": plan.connections, "reloads_planned": plan.reloads}
    sampler = load = None
    try:
        mode.prepare()
        releases = _stage_releases(workdir, resource, versions)
        os.replace(releases[0], mode.resource)
        if mode.srv_mode == "store":
            log(f"  building {len(versions)} stores")
            mode.stage(resource.pairs(), versions)
        t0 = time.time()
        first = mode.start(versions[0])
        result["start_seconds"] = round(time.time() - t0, 3)
        result["background_cpu"] = _check_background(name)
        result["initial_load_seconds"] = first.get("load_seconds")
        log(f"  serving {first.get('generation')} (app load {first.get('load_seconds')}s, "
            f"start {result['start_seconds']}s)")
        sampler = MemorySampler(mode.pids, sessions_fn=mode.sessions).start()
        budget = plan.lead + plan.reloads * (plan.gap + mode.reload_timeout) + plan.tail + 60
        load = LoadProcess(mode.socket, plan.connections, paths,
                           os.path.join(plan.raw, f"{name}.jsonl"), budget).start()
        result["load_started"] = time.time()
        time.sleep(plan.lead)
        windows = _reload_loop(mode, plan, releases, versions)
        time.sleep(max(0.0, plan.tail - plan.gap))
        records = load.stop()
        load = None
        result["load_stopped"] = time.time()
        samples = sampler.stop()
        sampler = None
        result["windows"] = [asdict(w) for w in windows]
        result["memory"] = [asdict(s) for s in samples]
        result["records_file"] = f"raw/{name}.jsonl"
        result["requests"] = len(records)
    except Exception as exc:  # noqa: BLE001 - one broken mode must not sink the others
        log(f"  {name} FAILED: {exc}")
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    finally:
        if load is not None:
            try:
                load.stop()
            except Exception:  # noqa: BLE001
                pass
        if sampler is not None:
            sampler.stop()
        _stop_mode(mode, name, plan, workdir, result)
    return result


def _stop_mode(mode, name: str, plan: Plan, workdir: str, result: dict) -> None:
    """Stop a mode's server (forcefully if it resists) and drop its work dir unless kept."""
    try:
        mode.stop()
    except Exception as exc:  # noqa: BLE001
        log(f"  stopping {name}: {exc}; forcing")
        mode._force_stop()
    mode.close()
    if not plan.keep and "error" not in result:
        shutil.rmtree(workdir, ignore_errors=True)


# -- hotswap behind nginx, measured by wrk ---------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tcp_ok(port: int, path: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n".encode())
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _parse_wrk(output: str) -> dict:
    for line in output.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON "):])
    raise ModeError(f"wrk printed no summary:\n{output[-2000:]}")


def run_nginx(plan: Plan, resource: Resource, paths: list[str]) -> dict:
    name = NGINX_MODE
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            return {"mode": name, "title": "hotswap behind nginx, wrk",
                    "error": f"{tool} is not installed (scripts/install-system-deps.sh)"}
    nginx_bin = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    workdir = tempfile.mkdtemp(prefix=f"hotswap-bench-{name}-")
    mode = Hotswap(workdir, log=log)
    versions = plan.versions(name)
    port = _free_port()
    prefix = os.path.join(workdir, "nginx")
    result: dict = {"mode": name, "title": "hotswap reload behind nginx (wrk on TCP)",
                    "workdir": workdir, "connections": plan.connections,
                    "reloads_planned": plan.reloads, "client": "wrk"}
    nginx = wrk = sampler = None
    try:
        mode.prepare()
        releases = _stage_releases(workdir, resource, versions)
        os.replace(releases[0], mode.resource)
        os.makedirs(prefix)
        with open(os.path.join(REPO, "bench", "configs", "nginx.conf.template")) as handle:
            conf = string.Template(handle.read()).substitute(
                user_line="user root;" if os.geteuid() == 0 else "",
                prefix=prefix, port=port, socket=mode.socket)
        conf_path = os.path.join(prefix, "nginx.conf")
        with open(conf_path, "w") as handle:
            handle.write(conf)
        first = mode.start(versions[0])
        result["initial_load_seconds"] = first.get("load_seconds")
        result["background_cpu"] = _check_background(name)
        nginx_log = open(os.path.join(prefix, "stdout.log"), "wb")  # noqa: SIM115
        nginx = subprocess.Popen([nginx_bin, "-p", prefix, "-c", conf_path, "-e",
                                  os.path.join(prefix, "error.log")], stdin=subprocess.DEVNULL,
                                 stdout=nginx_log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        nginx_log.close()
        wait_until(lambda: _tcp_ok(port, "/healthz"), 20, "nginx to proxy /healthz",
                   interval=0.1)
        log(f"  nginx on 127.0.0.1:{port} -> {mode.socket}")
        sampler = MemorySampler(mode.pids, sessions_fn=mode.sessions).start()
        duration = int(plan.lead + plan.reloads * (plan.gap + 60) + plan.tail + 30)
        wrk = subprocess.Popen(
            ["wrk", "-t", "2", "-c", str(plan.connections), "-d", f"{duration}s",
             "--timeout", "10s", "-s", os.path.join(REPO, "bench", "configs", "wrk-report.lua"),
             f"http://127.0.0.1:{port}{paths[0]}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        result["load_started"] = time.time()
        time.sleep(plan.lead)
        windows = _reload_loop(mode, plan, releases, versions)
        time.sleep(max(0.0, plan.tail - plan.gap))
        wrk.send_signal(signal.SIGINT)
        output, _ = wrk.communicate(timeout=60)
        wrk = None
        result["load_stopped"] = time.time()
        result["wrk"] = _parse_wrk(output)
        result["wrk_output"] = "\n".join(line for line in output.splitlines()
                                         if not line.startswith("WRK_JSON"))
        result["windows"] = [asdict(w) for w in windows]
        result["memory"] = [asdict(s) for s in sampler.stop()]
        sampler = None
        result["requests"] = result["wrk"]["requests"]
    except Exception as exc:  # noqa: BLE001
        log(f"  {name} FAILED: {exc}")
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    finally:
        if wrk is not None:
            wrk.kill()
            wrk.communicate()
        if sampler is not None:
            sampler.stop()
        if nginx is not None:
            if nginx.poll() is None:
                nginx.send_signal(signal.SIGQUIT)  # graceful
            try:
                nginx.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(nginx.pid, signal.SIGKILL)
                nginx.wait()
            if os.path.exists(os.path.join(prefix, "error.log")):
                with open(os.path.join(prefix, "error.log")) as handle:
                    result["nginx_errors"] = handle.read()[-3000:]
        _stop_mode(mode, name, plan, workdir, result)
    return result


# -- the run ---------------------------------------------------------------------------------

def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def background_cpu(seconds: float = 1.0) -> float:
    """Busy CPU, in cores, over `seconds` while the bench itself is idle: anything else
    running on the machine skews every figure, so it is recorded (and warned about)."""
    busy0, total0 = _cpu_times()
    time.sleep(seconds)
    busy1, total1 = _cpu_times()
    cores = os.cpu_count() or 1
    return round(cores * (busy1 - busy0) / max(1, total1 - total0), 2)


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as handle:
            mem_kb = int(handle.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for tool, argv in (("uwsgi", [os.path.join(VENV_BIN, "uwsgi"), "--version"]),
                       ("gunicorn", [os.path.join(VENV_BIN, "gunicorn"), "--version"]),
                       ("nginx", ["nginx", "-v"]), ("wrk", ["wrk", "-v"])):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            versions[tool] = (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            versions[tool] = "missing"
    return {"nproc": os.cpu_count(), "cpu_model": model, "mem_gb": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(), **versions}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reloads", type=int, help="reloads per mode (default 5; quick 2)")
    parser.add_argument("--terms", type=int, help=f"resource size (default {DEFAULT_TERMS}; "
                        f"quick {QUICK_TERMS})")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections")
    parser.add_argument("--modes", nargs="+", choices=ALL_MODES, metavar="MODE",
                        help=f"subset of: {' '.join(ALL_MODES)} (default all; quick: "
                        "hotswap uwsgi-graceful)")
    parser.add_argument("--quick", action="store_true",
                        help="small and fast: the `make test` smoke variant")
    parser.add_argument("--out", help="results folder (default bench/results; with --quick "
                        "bench/results/raw/quick, so a smoke run never overwrites the real "
                        "table)")
    parser.add_argument("--lead", type=float, help="seconds of load before the first reload")
    parser.add_argument("--gap", type=float, help="seconds of load after each reload")
    parser.add_argument("--tail", type=float, help="seconds of load after the last reload")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep-workdirs", action="store_true",
                        help="keep each mode's temp dir (they are kept anyway on failure)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.reloads = args.reloads if args.reloads is not None else (2 if quick else 5)
    args.terms = args.terms if args.terms is not None else (QUICK_TERMS if quick
                                                            else DEFAULT_TERMS)
    args.modes = args.modes or (["hotswap", "uwsgi-graceful"] if quick else ALL_MODES)
    args.lead = args.lead if args.lead is not None else (1.5 if quick else 4.0)
    args.gap = args.gap if args.gap is not None else (1.0 if quick else 3.0)
    args.tail = args.tail if args.tail is not None else (1.5 if quick else 4.0)
    if args.reloads < 1 or args.connections < 1 or args.terms < 1:
        parser.error("--reloads, --connections and --terms must be positive")
    args.out = os.path.abspath(args.out or os.path.join(
        REPO, "bench", "results", *(("raw", "quick") if quick else ())))
    return args


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def missing_extras() -> list[str]:
    """What the bench needs beyond `make run`'s install (the `bench` extra): say so before the
    run, not after it (the plot is drawn last)."""
    import importlib.util
    return [name for name in ("matplotlib", "gunicorn") if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if missing := missing_extras():
        print(f"bench: {', '.join(missing)} not installed (the bench extra): `make bench` "
              "installs it, or `make dev` for everything the tests and the bench need",
              file=sys.stderr)
        return 2
    # SIGTERM (a timeout, a CI runner) unwinds like Ctrl-C: every mode's `finally` stops the
    # servers, load clients and nginx it started.
    signal.signal(signal.SIGTERM, _interrupt)
    # A background job of a non-interactive shell starts with SIGINT ignored, and an ignored
    # signal stays ignored across exec: the load client could then not be stopped with it.
    # Handled signals are reset to their default in children, so handle it here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.time()
    run_id = time.strftime("r%Y%m%d%H%M%S")
    os.makedirs(os.path.join(args.out, "raw"), exist_ok=True)
    for name in args.modes:  # stale raw files would be mistaken for this run's
        stale = os.path.join(args.out, "raw", f"{name}.jsonl")
        if os.path.exists(stale):
            os.unlink(stale)
    plan = Plan(args, run_id)
    resource = Resource(os.path.join(args.out, "raw"), args.terms, args.seed)
    terms = resource.sample_terms()
    paths = [f"/lookup?q={t}" for t in terms] + ["/healthz"]
    run = {"run_id": run_id, "command": " ".join(["python -m bench.bench", *(
        argv if argv is not None else sys.argv[1:])]), "machine": machine(),
        "terms": args.terms, "resource_bytes": resource.size, "reloads": args.reloads,
        "connections": args.connections, "lead": args.lead, "gap": args.gap,
        "tail": args.tail, "paths": paths, "modes": []}
    log(f"modes: {' '.join(args.modes)}; {args.reloads} reloads each; {args.connections} "
        f"connections; resource {args.terms} terms ({report.size_text(resource.size)})")
    for name in args.modes:
        log(f"mode {name}")
        t0 = time.time()
        if name == NGINX_MODE:
            result = run_nginx(plan, resource, paths)
        else:
            result = run_mode(name, plan, resource, paths)
        result["elapsed"] = round(time.time() - t0, 1)
        run["modes"].append(result)
        log(f"  {name} done in {result['elapsed']}s")
    run["elapsed"] = round(time.time() - started, 1)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(run, handle, indent=1)
    table = report.render(args.out)
    print(table)
    log(f"total {run['elapsed']}s; wrote {args.out}/results.md, {args.out}/latency.png")
    return 1 if any("error" in m for m in run["modes"]) else 0


if __name__ == "__main__":
    sys.exit(main())
