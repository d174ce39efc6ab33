"""`make fleet-demo`: roll releases over a fleet of local hotswap instances with Ansible.

Each "host" is an inventory host with `ansible_connection: local` and its own release layout
(`hotswap init-releases`: ROOT/hotswap.ini, ROOT/current -> releases/<id>, served by
`hotswap start`), all on this machine. Under load on every host, the demo runs
deploy/ansible/rolling-release.yml three times:

1. release v2 in batches [1, "50%", "100%"]: every host swaps to it;
2. the same release again: nothing swaps (idempotent);
3. release v3, whose import fails on host2 (it needs a file that host lacks): the rollout stops
   after host2's batch, host2 is back on v2, the hosts after it were never touched.

Then it prints, per run, batch and host, the wall time, the kit's own reload time and
Ansible's overhead, stops every instance and prints the failed-request count per host
(expected: 0).

    .venv/bin/python -m scripts.fleet_demo [--hosts 4] [--terms 200000] [--workdir DIR]

Exit status: 0 every step did what it should; 1 a step did not; 2 bad usage.
The helpers here (releases, inventory, running the playbook) are shared with
tests/test_fleet.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.loadgen import LoadGenerator, summarize  # noqa: E402
from hotswap.swap import probe  # noqa: E402
from hotswap.system import procs  # noqa: E402
from scripts.build_store import main as build_store  # noqa: E402
from scripts.gen_resource import write_resource  # noqa: E402

ANSIBLE_DIR = REPO / "deploy" / "ansible"
PLAYBOOK = ANSIBLE_DIR / "rolling-release.yml"
BIN = Path(sys.executable).parent
# The file release v3 needs on each host, in the host's layout root (outside the release,
# which is the same on every host); the demo leaves it off host2.
NEEDED_FILE = "tagger.conf"
BROKEN_PREAMBLE = f'''\
import os as _os
# srv.py is ROOT/releases/<id>/srv.py: the host's own file is ROOT/{NEEDED_FILE}
_root = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
if not _os.path.exists(_os.path.join(_root, "{NEEDED_FILE}")):
    raise RuntimeError("this release needs {NEEDED_FILE} on this host")
'''


def make_release(folder: Path, version: str, terms: int, needs_host_file: bool = False,
                 store: bool = True) -> Path:
    """A release folder as `hotswap deploy` takes it: srv.ini, srv.py, data/terms.tsv and
    (store=True, what srv.py serves by default) data/store/ built from that table."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "srv.ini", folder / "srv.ini")
    source = (REPO / "srv.py").read_text()
    if needs_host_file:
        source = BROKEN_PREAMBLE + source.replace("from __future__ import annotations\n", "")
    (folder / "srv.py").write_text(source)
    table = folder / "data" / "terms.tsv"
    write_resource(str(table), terms, seed=7, version=version)
    if store:
        assert build_store([str(table), "-o", str(folder / "data" / "store"), "--point",
                            "--if-missing"]) == 0
    return folder


def write_inventory(path: Path, hosts: dict[str, Path], host_vars: dict | None = None,
                    **group_vars: object) -> Path:
    """An inventory of local hosts: name -> that host's srv.ini (JSON is valid YAML).
    host_vars: name -> more variables for that host (e.g. an SSH connection instead)."""
    inventory = {"all": {"children": {"hotswap": {
        "vars": {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "hotswap_bin": str(BIN / "hotswap"),
            **group_vars,
        },
        "hosts": {name: {"hotswap_ini": str(ini), **(host_vars or {}).get(name, {})}
                  for name, ini in hosts.items()},
    }}}}
    path.write_text(json.dumps(inventory, indent=2) + "\n")
    return path


def ansible_env(workdir: Path) -> dict[str, str]:
    """ansible-playbook's environment: this repo's config, its state kept under workdir."""
    return dict(
        os.environ,
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_HOME=str(workdir / ".ansible"),
        ANSIBLE_LOCAL_TEMP=str(workdir / ".ansible" / "tmp"),
        ANSIBLE_NOCOLOR="1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )


def playbook_argv(inventory: Path, release_dir: Path | str | None, **extra: object) -> list[str]:
    extra_vars = dict(extra)
    if release_dir is not None:
        extra_vars["release_dir"] = str(release_dir)
    return [str(BIN / "ansible-playbook"), "-i", str(inventory), str(PLAYBOOK),
            "-e", json.dumps(extra_vars)]


def run_playbook(inventory: Path, release_dir: Path | str | None, workdir: Path,
                 echo: bool = False, timeout: float = 600, **extra: object):
    """Run the rollout; returns (CompletedProcess, wall seconds). stdout holds the play."""
    started = time.monotonic()
    done = subprocess.run(
        playbook_argv(inventory, release_dir, **extra), cwd=workdir, env=ansible_env(workdir),
        stdout=None if echo else subprocess.PIPE, stderr=subprocess.STDOUT if not echo else None,
        text=True, timeout=timeout,
    )
    return done, time.monotonic() - started


# -- the demo's own instances (the tests use tests/releases_util.py's LayoutService) --------

def kit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "hotswap"), *args], capture_output=True, text=True,
                          timeout=timeout)


class Host:
    """A release layout on this machine: ROOT/hotswap.ini, the first release deployed."""

    def __init__(self, root: Path, first_release: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.ini = root / "hotswap.ini"
        self.socket = root / "run" / "http.sock"
        self.supervisor: subprocess.Popen | None = None
        for args in (("init-releases", str(root)),
                     ("--ini", str(self.ini), "deploy", str(first_release))):
            done = kit(*args)
            if done.returncode != 0:
                raise RuntimeError(f"hotswap {' '.join(args)}: {done.stderr.strip()}")

    def start(self) -> None:
        log = open(self.root / "start.log", "w")  # noqa: SIM115 - the child keeps it
        self.supervisor = subprocess.Popen(
            [str(BIN / "hotswap"), "--ini", str(self.ini), "start", "--supervise"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True,
        )
        log.close()

    def ready(self) -> bool:
        master = procs.read_pidfile(self.root / "run" / "master.pid")
        health = probe.healthz(self.socket, timeout=2.0)
        return bool(master and health and health["master_pid"] == master
                    and (self.root / "run" / "handover.json").exists())

    def generation(self) -> str | None:
        health = probe.healthz(self.socket, timeout=5.0)
        return health["generation"] if health else None

    def stop(self) -> None:
        if self.supervisor is None:
            return
        kit("--ini", str(self.ini), "stop", "--timeout", "20", timeout=60)
        try:
            self.supervisor.wait(timeout=20)
        except subprocess.TimeoutExpired:
            procs.kill_group(self.supervisor.pid, signal.SIGKILL)
            self.supervisor.wait(timeout=10)


TABLE_HEAD = ("| run | playbook wall s | batch | batch wall s | host | kit: reload s "
              "| kit: deploy command s | Ansible overhead s |\n|---|---|---|---|---|---|---|---|")


def timing_table(timings: list[tuple[str, float, Path]]) -> str:
    """One row per host of every batch: the batch's wall time (the play's clock), the kit's
    reload (`reload.seconds` of deploy's JSON) and its whole deploy command (the command
    task's delta: the hotswap process, staging, check, swap), and Ansible's overhead = the
    batch's wall time less that host's deploy command."""
    lines = [TABLE_HEAD]
    for title, wall, report in timings:
        try:
            hosts = json.loads(report.read_text())["hosts"]
        except (OSError, ValueError):
            hosts = []
        reached = [h for h in hosts if h["batch"]]
        for host in reached:
            batch, batch_wall = ", ".join(host["batch"]), host["batch_seconds"]
            command = host["deploy_command_seconds"]
            overhead = (f"{float(batch_wall) - float(command):.2f}"
                        if batch_wall is not None and command is not None else "")
            reload = ("no swap" if host["reload_seconds"] is None else
                      f"{host['reload_seconds']}{' (failed)' if host['failed'] else ''}")
            lines.append(f"| {title} | {wall:.1f} | [{batch}] | {batch_wall} | {host['host']} "
                         f"| {reload} | {command} | {overhead} |")
        if not reached:
            lines.append(f"| {title} | {wall:.1f} | (no report) | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=4, help="local instances (default 4)")
    parser.add_argument("--terms", type=int, default=200_000,
                        help="size of each release's table (default 200000)")
    parser.add_argument("--connections", type=int, default=2,
                        help="load connections per host during the rollouts (default 2)")
    parser.add_argument("--batches", default='[1, "50%", "100%"]',
                        help="the play's serial, as JSON (default [1, \"50%%\", \"100%%\"])")
    parser.add_argument("--workdir", help="keep everything here (default: a temp folder, "
                        "removed at the end)")
    args = parser.parse_args(argv)
    if args.hosts < 3:
        parser.error("--hosts must be at least 3 (host2 breaks, some host must come after it)")
    try:
        batches = json.loads(args.batches)
    except ValueError:
        parser.error(f"--batches is not JSON: {args.batches}")
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        if workdir.exists() and any(workdir.iterdir()):
            parser.error(f"--workdir {workdir} exists and is not empty")
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="hotswap-fleet-"))

    names = [f"host{i}" for i in range(1, args.hosts + 1)]
    releases = workdir / "releases"
    v1 = make_release(releases / "v1", "v1", args.terms)
    hosts = {name: Host(workdir / "hosts" / name, v1) for name in names}
    ok = True
    loads: dict[str, LoadGenerator] = {}
    try:
        for host in hosts.values():
            host.start()
        for name, host in hosts.items():
            if not procs.wait_until(host.ready, 120, interval=0.1):
                print(f"fleet-demo: {name} did not come up; see {host.root}/log", file=sys.stderr)
                return 1
        for name, host in hosts.items():
            if name != "host2":
                (host.root / NEEDED_FILE).write_text("ok\n")
        v2 = make_release(releases / "v2", "v2", args.terms)
        v3 = make_release(releases / "v3", "v3", args.terms, needs_host_file=True)
        inventory = write_inventory(workdir / "inventory.yml",
                                    {name: host.ini for name, host in hosts.items()})
        print(f"fleet-demo: {args.hosts} hosts under {workdir}/hosts, each v1, "
              f"{args.connections} load connections each\n", flush=True)
        loads = {name: LoadGenerator(str(host.socket), args.connections, ("/healthz",),
                                     max_seconds=600).start() for name, host in hosts.items()}
        steps = [("release v2", v2, 0), ("release v2 again (idempotent)", v2, 0),
                 ("release v3, broken on host2", v3, 2)]
        timings = []
        for number, (title, release, expected) in enumerate(steps, start=1):
            print(f"==== {title}: ansible-playbook rolling-release.yml "
                  f"-e release_dir={release}", flush=True)
            report = workdir / f"report-{number}.json"
            done, wall = run_playbook(inventory, release, workdir, echo=True,
                                      rollout_batches=batches, rollout_report=str(report))
            verdict = "as expected" if done.returncode == expected else "UNEXPECTED"
            print(f"==== {title}: exit {done.returncode} ({verdict}) in {wall:.1f} s wall\n",
                  flush=True)
            ok = ok and done.returncode == expected
            timings.append((title, wall, report))
        print(timing_table(timings))
        # after the third run: host1 swapped to v3, host2 refused it and serves v2
        expected = {"host1": "v3+", "host2": "v2+"}
        for name, host in hosts.items():
            generation = host.generation() or "nothing"
            print(f"fleet-demo: {name} serves {generation}")
            if not generation.startswith(expected.get(name, "")):
                print(f"fleet-demo: {name} should serve {expected[name]}...", file=sys.stderr)
                ok = False
    finally:
        for name, load in loads.items():
            summary = summarize(load.stop())
            print(f"fleet-demo: {name}: {summary['requests']} requests, "
                  f"{summary['failed']} failed {summary['outcomes']}")
            ok = ok and summary["failed"] == 0
        for host in hosts.values():
            host.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print("fleet-demo: " + ("ok" if ok else "FAILED: see above"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
