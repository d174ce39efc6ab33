"""The `hotswap` command: a thin click layer over config, reload, instance and probe."""

from __future__ import annotations

# First, before the heavy imports below: a SIGINT/SIGTERM landing while they run is noted
# and answered like one landing later (system/early.py), not a silent death of exit -2.
from .system import early

early.install()

import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import __version__, config
from .config import DEFAULT_GRACE, DEFAULT_KEEP, here
from .errors import MEANING, ExitCode, HotswapError
from .system import memory

if TYPE_CHECKING:  # each command imports what it runs in its body: `--help` starts fast
    import threading
    from collections.abc import Callable

    from .releases import release as rel
    from .releases import watch as watcher
    from .swap.reload import Phase

# `announce`'s choices, here so that its --help needs no release machinery
# (tests/test_cli_start.py holds them equal to hotswap.releases.message.ACTIONS)
ANNOUNCE_ACTIONS = ("deploy", "refresh")

# probe speaks the monitoring-plugin convention, not the rest of the CLI's codes.
PROBE_OK, PROBE_WARNING, PROBE_CRITICAL, PROBE_UNKNOWN = 0, 1, 2, 3

EXIT_CODES_HELP = "\b\nExit codes (start, reload, stop, status, recover):\n" + "".join(
    f"  {int(code)}  {meaning}\n" for code, meaning in MEANING.items()
) + "probe: 0 OK, 1 unexpected HTTP status, 2 no answer, 3 unknown (bad config)\n"


def fail(error: HotswapError) -> None:
    click.echo(f"hotswap: {error.message}", err=True)
    sys.exit(int(error.code))


class Group(click.Group):
    """The one place operator errors become one line and an exit code, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HotswapError as error:
            fail(error)
        except PermissionError as exc:
            fail(HotswapError(
                f"permission denied: {exc.filename or exc} (run as the service's user?)",
                ExitCode.CONFIG,
            ))
        except OSError as exc:
            # e.g. the run dir is a file: the system's words, with the path, in one line
            where = f": {exc.filename}" if exc.filename else ""
            fail(HotswapError(f"{exc.strerror or exc}{where}", ExitCode.CONFIG))


class Context:
    def __init__(self, ini: str) -> None:
        self.ini = ini
        self._cfg: config.Config | None = None

    @property
    def cfg(self) -> config.Config:
        if self._cfg is None:
            root = Path(self.ini).absolute().parent
            if (root / "releases").is_dir():  # before uWSGI reads the ini through `current`
                from .releases import release as rel

                rel.Layout(root).check_current()
            self._cfg = config.load(self.ini)
        return self._cfg


pass_context = click.make_pass_decorator(Context)


@click.group(cls=Group, epilog=EXIT_CODES_HELP)
@click.option(
    "--ini", envvar="HOTSWAP_INI", default="srv.ini", show_default=True,
    help="uWSGI config that names every path (env HOTSWAP_INI).",
)
@click.version_option(version=__version__, prog_name="hotswap")
@click.pass_context
def main(ctx: click.Context, ini: str) -> None:
    """Zero-downtime release swaps for a uWSGI service (master re-fork)."""
    if ctx.invoked_subcommand != "reload":  # reload hands early signals to its machine
        early.replay()
    ctx.obj = Context(ini)


@main.command()
@click.option(
    "--exec/--supervise", "exec_mode", default=None,
    help="Replace this process with uWSGI (default under systemd) or stay in the "
    "foreground across swaps as a subreaper (default in a terminal and as a container's "
    "PID 1).",
)
@click.option("--grace", type=click.FloatRange(min=0.0), envvar="HOTSWAP_GRACE",
              default=DEFAULT_GRACE, show_default=True,
              help="Seconds from SIGTERM/Ctrl-C for in-flight requests to finish; past it what "
              "still runs is killed and start exits 5 (env HOTSWAP_GRACE; keep it under "
              "Kubernetes' terminationGracePeriodSeconds).")
@pass_context
def start(ctx: Context, exec_mode: bool | None, grace: float) -> None:
    """Run the service in the foreground (what systemd's ExecStart runs, and a container's
    entrypoint)."""
    from .service import checks
    from .service import instance as inst
    from .service.supervisor import Supervisor, refuse_exec_as_pid1
    from .system import files

    cfg = ctx.cfg
    if exec_mode is None:
        exec_mode = "NOTIFY_SOCKET" in os.environ
    if exec_mode:
        refuse_exec_as_pid1()
    checks.refuse_unsafe(cfg)
    lock_fd, removed = inst.prepare_start(cfg)
    for path in removed:
        click.echo(here(f"hotswap: removed stale {path}"), err=True)
    # the run dir as the CLI resolved it: the store's worker reports go there (live_store.py)
    env = dict(os.environ, HOTSWAP_PYTHON=sys.executable, **{files.RUN_DIR_ENV: str(cfg.run_dir)})
    if "NOTIFY_SOCKET" in env:
        # The accepting hook notifies systemd, when worker 1 really accepts; uWSGI's own
        # READY=1 (master up, app maybe not) must not reach it.
        env["HOTSWAP_NOTIFY_SOCKET"] = env.pop("NOTIFY_SOCKET")
    argv = [str(cfg.uwsgi), "--ini", str(cfg.ini)]
    if exec_mode is None:
        exec_mode = "HOTSWAP_NOTIFY_SOCKET" in env
    click.echo(here(f"hotswap: starting uWSGI on {cfg.socket} (log: {cfg.log_file})"),
               err=True)
    if exec_mode:
        os.execve(argv[0], argv, env)
    sys.exit(Supervisor(cfg, argv, env, lock_fd, grace).run())


class Margin(click.ParamType):
    """--memory-margin: a finite percentage >= 0 (inf or nan would make every estimate
    meaningless); refused as one line, exit 2, like every other bad input."""

    name = "percent"

    def convert(self, value, param, ctx) -> float:
        try:
            margin = float(value)
        except (TypeError, ValueError):
            margin = math.nan
        if not math.isfinite(margin) or margin < 0:
            raise HotswapError(f"--memory-margin (or HOTSWAP_MEMORY_MARGIN) must be a finite "
                               f"percentage >= 0, not {value!r}", ExitCode.CONFIG)
        return margin


# One definition for every command that swaps (reload, deploy, rollback, watch).
memory_options = [
    click.option("--force", is_flag=True, help="Swap even if the serving generation does not "
                 "answer on its health path (e.g. to replace a broken release), or if a second "
                 "generation does not seem to fit in memory (one that does not is killed by "
                 "the OOM killer while loading, and rolled back)."),
    click.option("--memory-margin", type=Margin(), envvar="HOTSWAP_MEMORY_MARGIN",
                 default=memory.DEFAULT_MARGIN_PERCENT, show_default=True,
                 help="Percent added to the serving generation's memory when checking that a "
                 "second one fits (env HOTSWAP_MEMORY_MARGIN); exit 7 if it does not."),
]


def with_memory_options(func):
    for option in reversed(memory_options):
        func = option(func)
    return func


@main.command(name="reload", epilog=EXIT_CODES_HELP)
@click.option("--timeout", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
              help="Seconds for the new release to load and commit its hand-over (import "
              "included); past it, the swap is rolled back. A hand-over already under way "
              "gets 10 s more; --drain and a 10 s check come after the commit.")
@click.option("--drain", "drain_timeout", type=click.FloatRange(min=0.0), default=90.0,
              show_default=True, help="Seconds to wait for the old generation's in-flight "
              "requests once the new one serves (past it, reload succeeds with a warning).")
@with_memory_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_context
def reload_cmd(ctx: Context, timeout: float, drain_timeout: float, force: bool,
               memory_margin: float, as_json: bool) -> None:
    """Swap in a new generation; return when it serves and the old one is gone."""
    import json

    from .swap.reload import reload, write_last_reload
    from .system import notify

    def show(phase: Phase, at: float, detail: str) -> None:
        if not as_json:
            click.echo(here(f"  [{at:7.2f}s] {phase.value:<12} {detail}"))

    result = reload(ctx.cfg, timeout, drain_timeout, show, force=force,
                    memory_margin=memory_margin)
    early.settled()  # what is printed below is what happened, whatever signal lands now
    try:
        write_last_reload(ctx.cfg, result)
    except OSError as exc:  # a full run dir must not hide the outcome behind exit 2
        result.warnings.append(f"could not record the result in {ctx.cfg.last_reload_file}: "
                               f"{exc.strerror or exc}")
    if result.rolled_back:
        # Under systemd (ExecReload), keep the unit's status line true: the old generation
        # still serves, and the swap failed. Only STATUS=: the main pid has not changed.
        notify.notify(
            f"STATUS=Serving generation {result.old_generation} (master {result.old_master}); "
            f"last reload FAILED: {result.message}"[:400],
            barrier=False,
        )
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
    elif result.ok:
        click.echo(f"reload ok in {result.seconds:.2f}s: {result.message}")
    else:
        click.echo(
            here(f"hotswap: reload FAILED after {result.seconds:.2f}s: {result.message}"),
            err=True,
        )
        if result.log_tail:
            click.echo("--- uWSGI log since the reload began (tail) ---", err=True)
            for line in result.log_tail:
                click.echo(here(f"  {line}"), err=True)
    if not as_json:
        for warning in result.warnings:
            click.echo(here(f"hotswap: warning: {warning}"), err=True)
    sys.exit(result.exit_code)


@main.command(name="refresh", epilog=EXIT_CODES_HELP)
@click.argument("store_path", metavar="STORE")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds for validation, and again for every worker to switch.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_context
def refresh_cmd(ctx: Context, store_path: str, timeout: float, as_json: bool) -> None:
    """Switch every worker to the data store STORE, without new processes (store mode).

    Exit 1: STORE failed validation or the app's smoke checks, or SIGINT/SIGTERM came before
    the commit point (the old store still serves); 2: no such file, or the service is not in
    store mode; 5: a worker did not switch in time (switched back)."""
    import json

    from .releases import refresh as data_refresh

    def show(phase: str, at: float, detail: str) -> None:
        if not as_json:
            click.echo(f"  [{at:7.2f}s] {phase:<12} {detail}")

    result = data_refresh.refresh(ctx.cfg, store_path, timeout, show)
    data_refresh.record(ctx.cfg, result)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
    elif result.ok:
        for w in result.workers:
            click.echo(f"worker pid {w.pid:<8} {w.old_version} -> {w.new_version}  "
                       f"{w.after_signal_ms:.1f} ms after the signal")
        click.echo(f"refresh ok in {result.seconds:.2f}s: {result.message} (validation "
                   f"{result.validate_seconds:.2f}s, switch {result.switch_seconds * 1000:.1f} ms)")
    else:
        click.echo(f"hotswap: refresh FAILED after {result.seconds:.2f}s: {result.message}",
                   err=True)
    sys.exit(result.exit_code)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@pass_context
def status(ctx: Context, as_json: bool) -> None:
    """Master, generation, workers, FIFOs, socket and the last reload's result."""
    import json

    from .releases import release as rel
    from .service import instance as inst

    report = inst.status(ctx.cfg)
    if (ctx.cfg.ini.parent / "releases").is_dir():  # a release layout (docs/releases.md)
        layout = rel.Layout(ctx.cfg.ini.parent)
        report["release"] = {"current": layout.current_id(),
                             "serving": rel.serving(ctx.cfg, layout) if report["running"]
                             else None}
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        click.echo(here(_format_status(report)))
    if not report["running"]:
        sys.exit(ExitCode.NOT_RUNNING)
    sys.exit(ExitCode.INCONSISTENT if report["problems"] else ExitCode.OK)


@main.command(name="metrics")
@click.option("--write", is_flag=True, help="Rewrite the file first from what serves now "
              "(after a start, which swaps nothing; skipped while a swap runs).")
@pass_context
def metrics_cmd(ctx: Context, write: bool) -> None:
    """Print the swap metrics in Prometheus' text format: the textfile the last reload,
    refresh, deploy or rollback wrote (hotswap-metrics-file, default run/hotswap.prom)."""
    from .swap import metrics as swap_metrics

    click.echo((swap_metrics.rewrite if write else swap_metrics.current)(ctx.cfg), nl=False)


def _format_status(report: dict) -> str:
    lines = []
    if report["running"]:
        health = report["health"] or {}
        state = "swapping " if report.get("swapping") else "running  "
        lines.append(f"{state}   master {report['master_pid']}, generation "
                     f"{report['generation'] or '? (no answer on the health path)'}"
                     + (_swapping(report["loading_master_pids"]) if report.get("swapping")
                        else ""))
        if health:
            lines.append(f"loaded      {health.get('loaded_at')} in {health.get('load_seconds')}s")
    else:
        lines.append("stopped     no master serves")
    if report["parked_master_pid"] and not report.get("swapping"):
        lines.append(f"parked      master {report['parked_master_pid']} on the standby FIFO "
                     "(retiring, or left by an interrupted swap: `hotswap recover`)")
    for pid in report["loading_master_pids"]:
        lines.append(f"loading     master {pid} (a release being imported)")
    if report.get("memory"):
        lines.append(f"memory      {_format_memory(report['memory'])}")
    for worker in report["workers"]:
        store = f"  store {worker['store']}" if worker.get("store") else ""
        if worker["id"] is None:  # listed from /proc: the stats socket did not answer
            lines.append(f"worker ?    pid {worker['pid']:<8} (no stats)")
            continue
        lines.append(f"worker {worker['id']:<4} pid {worker['pid']:<8} {worker['status']:<8} "
                     f"{worker['requests']} requests{store}")
    for name, info in report["fifos"].items():
        lines.append(f"fifo {name:<7} {info['state']:<10} {info['path']}")
    if report.get("release"):
        lines.append(f"release     {report['release']['serving'] or '?'} serves; current -> "
                     f"{report['release']['current']}")
    protocol = " (uwsgi protocol)" if report.get("socket_protocol") == "uwsgi" else ""
    lines.append(f"socket       {report['socket_state']:<10} {report['socket']}{protocol}")
    lines.append(f"log         {report['log_file']}")
    if report["reload_in_progress"]:
        lines.append(f"reload      in progress (pid {report['reload_in_progress']})")
    for problem in report["problems"]:
        lines.append(f"PROBLEM     {problem}")
    for notice in report["notices"]:
        lines.append(f"notice      {notice}")
    last = report["last_reload"]
    if last:
        outcome = "ok" if last["ok"] else f"FAILED (exit {last['exit_code']})"
        when = f" at {last['finished_at']}" if last.get("finished_at") else ""
        lines.append(f"last reload {outcome}{when} in {last['seconds']}s: {last['message']}")
    return "\n".join(lines)


def _swapping(loading: list[int]) -> str:
    if not loading:
        return ", serves while a reload forks the new master"
    return f", serves while new master {', '.join(map(str, loading))} loads"


def _format_memory(room: dict) -> str:
    """One line: what a second generation needs, and the headroom left after it."""
    needs = memory.human(room["required"])
    if room["headroom"] is None:
        return f"a reload needs ~{needs}; available unknown"
    verdict = "fits" if room["fits"] else "does NOT fit (reload exits 7; --force)"
    headroom = memory.human(abs(room["headroom"]))
    return (f"a reload needs ~{needs}, {memory.human(room['available'])} available: "
            f"{verdict}, {headroom} {'spare' if room['fits'] else 'short'}")


@main.command()
@pass_context
def check(ctx: Context) -> None:
    """Say what start and reload would refuse in the ini, and what it sets that the kit
    supports, without starting anything; exit 2 if anything is refused."""
    from .service import checks

    findings = checks.review(ctx.cfg)
    for finding in findings:
        click.echo(here(f"{finding.verdict:<10} {finding.message}"))
    refused = sum(finding.verdict == checks.REFUSED for finding in findings)
    if refused:
        raise HotswapError(f"{refused} refusal(s) in {ctx.cfg.ini}: fix each line marked "
                           "refused, then `hotswap check` again", ExitCode.CONFIG)


@main.command(name="probe")
@click.option("--path", default=None, help="Path to GET (default: the ini's health path, "
              "hotswap-health, else /healthz).")
@click.option("--timeout", type=click.FloatRange(min=0.01), default=5.0, show_default=True)
@click.option("--expect-status", type=click.IntRange(100, 599), default=200, show_default=True)
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Socket to probe over HTTP: a unix path or host:port (default: the ini's "
              "probed socket, in its protocol).")
@pass_context
def probe_cmd(ctx: Context, path: str | None, timeout: float, expect_status: int,
              socket_path: str | None) -> None:
    """GET PATH on the service's socket; exit 0 OK, 1 wrong status, 2 no answer, 3 unknown."""
    from .swap import probe

    if path is not None and not path.startswith("/"):
        click.echo(f"hotswap probe: UNKNOWN - path must start with '/': {path!r}", err=True)
        sys.exit(PROBE_UNKNOWN)
    try:
        target = socket_path or ctx.cfg.socket
        path = path or ctx.cfg.health_path
    except HotswapError as error:
        click.echo(f"hotswap probe: UNKNOWN - {error.message}", err=True)
        sys.exit(PROBE_UNKNOWN)
    try:
        answer = probe.get(target, path, timeout)
    except OSError as exc:
        click.echo(f"CRITICAL - GET {path} on {target}: {exc.strerror or exc}", err=True)
        sys.exit(PROBE_CRITICAL)
    body = answer.body.decode(errors="replace").strip().replace("\n", " ")
    summary = f"GET {path} -> {answer.status} in {answer.seconds * 1000:.1f} ms: {body[:300]}"
    if answer.status != expect_status:
        click.echo(f"WARNING - {summary} (expected {expect_status})", err=True)
        sys.exit(PROBE_WARNING)
    click.echo(f"OK - {summary}")


@main.command()
@click.option("--timeout", type=click.FloatRange(min=0.1), default=90.0, show_default=True,
              help="Seconds to wait for in-flight requests to finish.")
@pass_context
def stop(ctx: Context, timeout: float) -> None:
    """Stop gracefully: in-flight requests finish, then the master exits; files are cleaned."""
    from .service import instance as inst
    from .swap import drift

    cfg = ctx.cfg
    activated = drift.socket_activated(cfg)  # read before stop clears the run dir
    masters = inst.stop(cfg, timeout)
    if activated:
        click.echo(f"hotswap: {cfg.socket.address} is held by systemd (socket-activated): "
                   "connections queue in its backlog until the next start, none refused",
                   err=True)
    else:
        click.echo(f"hotswap: {cfg.socket.address} was the instance's own (no socket unit "
                   "held it): connections still queued in its backlog were reset, and new "
                   "ones are refused until `hotswap start`; deploy/hotswap.socket avoids that",
                   err=True)
    click.echo(f"stopped master {', '.join(map(str, masters))}")


@main.command()
@pass_context
def recover(ctx: Context) -> None:
    """Repair what an interrupted swap left (`reload` does it too, before it forks)."""
    from .service import instance as inst

    click.echo(inst.recover(ctx.cfg))


@main.command()
@click.option("--app", "app", metavar="MODULE:CALLABLE",
              help="The WSGI app to serve: package.module:callable, or "
              "package.module:factory() for an application factory.")
@click.option("--from", "their_ini", type=click.Path(dir_okay=False, path_type=Path),
              help="Your existing uwsgi.ini: keep its app and tuning, add the kit's contract, "
              "write NAME.hotswap.ini beside it (never over it).")
@click.option("--dir", "project", default=".", show_default=True,
              type=click.Path(file_okay=False), help="The project folder.")
@click.option("--user", help="The service user of the systemd unit (default: you).")
@click.option("--health-path", default="/healthz", show_default=True,
              help="The path the kit's middleware answers (hotswap-health in srv.ini).")
@click.option("--force", is_flag=True, help="Overwrite an existing srv.ini / hotswap.service.")
@click.option("--socket", "socket_unit", flag_value="unix",
              help="Also write hotswap.socket: systemd holds run/http.sock (a restart refuses "
              "nothing).")
@click.option("--socket-tcp", "socket_unit", metavar="HOST:PORT",
              help="The same on a TCP address (srv.ini's http-socket becomes HOST:PORT).")
def init(app: str | None, their_ini: Path | None, project: str, user: str | None,
         health_path: str, force: bool, socket_unit: str | None) -> None:
    """Write srv.ini (the kit's settings, serving APP) and hotswap.service into a project."""
    from .service import scaffold

    if their_ini is not None:
        _adopt(their_ini, force)
        return
    if not app:
        raise HotswapError("init needs --app MODULE:CALLABLE, or --from YOUR.ini",
                           ExitCode.CONFIG)
    written = scaffold.init(Path(project), app, user, force, health_path, socket=socket_unit)
    for path in written.paths:
        click.echo(here(f"wrote {path}"))
    for warning in written.warnings:
        click.echo(here(f"hotswap: warning: {warning}"), err=True)
    ini = here(str(written.paths[0]))
    click.echo(f"next: hotswap --ini {ini} start   (then `reload` for each new release)")


def _adopt(their_ini: Path, force: bool) -> None:
    from .service import adopt

    adopted = adopt.adopt(their_ini, force)
    for line in adopted.changes:
        click.echo(here(f"changed  {line}"))
    for line in adopted.refused:
        click.echo(here(f"refused  {line}"))
    click.echo(here(f"wrote {adopted.path}; next: hotswap --ini {adopted.path} check"))


# -- releases (docs/releases.md) --------------------------------------------------------------
def _show_phase(as_json: bool):
    """The timeline, for as long as someone reads it: a reader gone (a killed watcher's pipe)
    must not stop a swap halfway; the deploy's history line still says how it ended."""
    gone = []

    def show(phase: Phase, at: float, detail: str) -> None:
        if as_json or gone:
            return
        try:
            click.echo(f"  [{at:7.2f}s] {phase.value:<12} {detail}")
        except OSError:
            gone.append(True)
    return show


def _report(result: rel.DeployResult, as_json: bool) -> None:
    import json

    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
    elif result.ok:
        click.echo(f"{result.action} ok in {result.seconds:.2f}s: {result.message}")
        if result.pruned:
            click.echo(f"pruned {', '.join(result.pruned)}")
    else:
        click.echo(f"hotswap: {result.action} FAILED after {result.seconds:.2f}s: "
                   f"{result.message}", err=True)
        for line in (result.reload or {}).get("log_tail", []):
            click.echo(f"  {line}", err=True)
    sys.exit(result.exit_code)


swap_options = [
    click.option("--timeout", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
                 help="The reload's --timeout."),
    click.option("--drain", type=click.FloatRange(min=0.0), default=90.0, show_default=True,
                 help="The reload's --drain."),
    *memory_options,
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
]


def with_swap_options(func):
    for option in reversed(swap_options):
        func = option(func)
    return func


@main.command(name="init-releases")
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="FIFOs, sockets, pidfile (default ROOT/run; /run/hotswap under systemd).")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The uWSGI log (default ROOT/log).")
def init_releases_cmd(root: Path, run_dir: Path | None, log_dir: Path | None) -> None:
    """Create a release layout in ROOT: releases/, state/ and the entry ini hotswap.ini."""
    from .releases import release as rel

    ini = rel.init(root, run_dir, log_dir)
    click.echo(f"release layout in {ini.parent}: deploy with `hotswap --ini {ini} deploy PATH`")


@main.command(name="deploy", epilog=EXIT_CODES_HELP)
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--keep", type=click.IntRange(min=1), default=DEFAULT_KEEP, show_default=True,
              envvar="HOTSWAP_KEEP_RELEASES",
              help="Releases to keep after a success (current and serving always kept).")
@click.option("--check-import/--no-check-import", default=False, show_default=True,
              help="Import the release's app in a child process before the swap.")
@click.option("--if-changed", is_flag=True,
              help="Do nothing (exit 0) if the serving release holds the same files.")
@with_swap_options
@pass_context
def deploy_cmd(ctx: Context, source: Path, keep: int, check_import: bool, if_changed: bool,
               timeout: float, drain: float, force: bool, memory_margin: float,
               as_json: bool) -> None:
    """Ship SOURCE (a folder or a tarball) as a new release: copy, check, flip, reload.

    Exit 1: refused or rolled back (current names the old release, which serves)."""
    from .releases import release as rel

    result = rel.deploy(Path(ctx.ini), source.absolute(), timeout, drain, keep, check_import,
                        _show_phase(as_json),
                        rel.SwapOptions(timeout, drain, force, memory_margin),
                        if_changed=if_changed)
    _report(result, as_json)


@main.command(name="rollback", epilog=EXIT_CODES_HELP)
@click.option("--to", "to", metavar="ID", help="This release (an id from `releases`), not "
              "the one before `current`.")
@with_swap_options
@pass_context
def rollback_cmd(ctx: Context, to: str | None, timeout: float, drain: float, force: bool,
                 memory_margin: float, as_json: bool) -> None:
    """Make the release before `current` (or release --to) live again (same safety as deploy)."""
    from .releases import release as rel

    _report(rel.rollback(ctx.cfg, timeout, drain, _show_phase(as_json),
                         rel.SwapOptions(timeout, drain, force, memory_margin), to=to), as_json)


@main.command(name="releases")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@pass_context
def releases_cmd(ctx: Context, as_json: bool) -> None:
    """List releases, oldest first: C = `current` names it, S = it serves (/healthz)."""
    import json

    from .releases import release as rel

    rows = rel.listing(Path(ctx.ini))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for row in rows:
        last = row["last_action"]
        outcome = (f"  {last['action']} {'ok' if last['ok'] else 'FAILED'} {last['at']}"
                   if last else "")
        marks = ("C" if row["current"] else " ") + ("S" if row["serving"] else " ")
        click.echo(f"{marks} {row['id']}{outcome}")


@main.command(name="watch")
@click.argument("drop", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--quiet", type=click.FloatRange(min=0.0), default=2.0, show_default=True,
              help="Seconds without a change in DROP before acting on what landed.")
@click.option("--keep", type=click.IntRange(min=1), default=DEFAULT_KEEP, show_default=True,
              envvar="HOTSWAP_KEEP_RELEASES", help="Passed to each deploy.")
@click.option("--follow-current/--no-follow-current", default=True, show_default=True,
              help="Reload when `current` is flipped by someone else to a release that does "
              "not serve.")
@click.option("-v", "--verbose", is_flag=True, help="Also log each change seen in DROP.")
@click.option("--source", metavar="URL", envvar="HOTSWAP_WATCH_SOURCE",
              help="Act on signed announcements instead of DROP: postgres://USER@HOST:PORT/DB, "
              "redis://HOST:PORT/CHANNEL or redis-stream://HOST:PORT/STREAM[?group=G].")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path),
              envvar="HOTSWAP_WATCH_KEY", help="With --source: the shared secret file that "
              "signs announcements (mode 600).")
@click.option("--allow", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="With --source: a location announced releases may lie under (repeatable).")
@with_memory_options
@pass_context
def watch_cmd(ctx: Context, drop: Path | None, quiet: float, keep: int, follow_current: bool,
              verbose: bool, source: str | None, key: Path | None, allow: tuple[Path, ...],
              force: bool, memory_margin: float) -> None:
    """Deploy or refresh what lands in DROP (default ROOT/drop), or what a signed message on
    --source announces, one action at a time; reload when `current` is flipped to a release
    that does not serve."""
    import signal
    import threading

    from .releases import release as rel
    from .releases import watch as watcher

    # a DROP of stores only (a mounted volume, say) needs no release layout; its default does
    if source and drop:
        raise HotswapError("watch: give DROP or --source, not both", ExitCode.CONFIG)
    if source and (key is None or not allow):
        raise HotswapError("watch --source needs --key FILE (the shared secret) and at least "
                           "one --allow DIR (where announced releases may lie)", ExitCode.CONFIG)
    layout = rel.Layout(ctx.cfg.ini.parent) if drop or source else rel.layout_of(ctx.cfg)
    drop = (drop or layout.root / "drop").absolute()
    if not source:
        drop.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame) -> None:  # only noted: the loop stops at its next turn
        received.append(signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)

    def log(line: str) -> None:
        click.echo(f"hotswap watch: {line}")

    swap_args = ["--memory-margin", repr(memory_margin), *(["--force"] if force else [])]
    runner = watcher.CliRunner(ctx.cfg, ["--keep", str(keep)], follow_current, swap_args)
    if source:
        watch_source(source, key, allow, runner, quiet, log, verbose, stop, layout)
        log(f"stopped ({', '.join(received) or 'watch ended'})")
        return
    loop = watcher.Watcher(watcher.Planner(drop, quiet), runner, log, verbose=verbose,
                           link=layout.current, scan=lambda: watcher.DataLink.unmounted(drop))
    tick_ms = int(min(500, max(50, quiet * 250)))
    loop.run(watcher.inotify_batches(drop, stop, tick_ms), stop)
    log(f"stopped ({', '.join(received) or 'watch ended'})")


def watch_source(url: str, key: Path, allow: tuple[Path, ...], runner: watcher.CliRunner,
                 quiet: float, log: Callable[[str], None], verbose: bool, stop: threading.Event,
                 layout: rel.Layout) -> None:
    """`watch --source`: the announcements' loop over the same runner as DROP's."""
    from .releases import announced, message, sources

    verifier = message.Verifier(message.load_secret(key), tuple(p.absolute() for p in allow))
    feed = sources.open_source(url)
    ledger = message.Ledger(layout.root / "state" / "announcements.jsonl")
    loop = announced.MessageLoop(verifier, announced.AnnouncedRunner(runner, ledger), quiet,
                                 log, verbose=verbose, link=layout.current)
    tick = min(0.5, max(0.05, quiet / 4))
    loop.run(sources.deliveries(feed, stop, tick, log), stop, name=feed.name)


@main.command(name="announce")
@click.argument("action", type=click.Choice(ANNOUNCE_ACTIONS))
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--id", "ident", required=True, help="The announcement's id (each host acts on "
              "an id at most once).")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), required=True,
              envvar="HOTSWAP_WATCH_KEY", help="The shared secret file (mode 600).")
def announce_cmd(action: str, path: Path, ident: str, key: Path) -> None:
    """Print the signed message that announces PATH to `watch --source` (the publisher's
    half: INSERT it, PUBLISH it or XADD it; docs/releases.md)."""
    from .releases import message

    click.echo(message.sign(action, str(path.absolute()), ident, message.load_secret(key)))
