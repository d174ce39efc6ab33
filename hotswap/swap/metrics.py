"""Every swap's outcome, for Prometheus: a node_exporter textfile (docs/operations.md#metrics).

After each reload, refresh, deploy and rollback the command that swapped (holding the reload
lock) counts its outcome into a record in the run dir (`metrics.json`: the counters must
survive across CLI runs), asks what serves now (the health path, the memory headroom for a
second generation), and renders the whole in Prometheus' text exposition format to the file
the ini names (`hotswap-metrics-file`, default `<run_dir>/hotswap.prom`), by temp + rename:
node_exporter's textfile collector never reads half a file. Writing it never fails a swap.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..errors import ExitCode
from ..system import files, memory
from .host import Host, RealHost
from .lock import unless_swapping

RECORD_NAME = "metrics.json"
# every result label is always exported, 0 included: rate() and increase() need the series
RESULTS = ("ok", "failed", "refused", "timeout", "interrupted")
HEALTH_TIMEOUT = 2.0


def outcome(ok: bool, exit_code: int, interrupted: str | None, refused: bool) -> str:
    """The `result` label of one swap."""
    if ok:
        return "ok"
    if refused:
        return "refused"  # refused before anything changed
    if interrupted:
        return "interrupted"
    return "timeout" if exit_code == ExitCode.TIMEOUT else "failed"


@dataclass(frozen=True)
class Last:
    """One kind of swap (reload or refresh): its counters and its last outcome."""

    counts: dict[str, int] = field(default_factory=dict)
    successful: bool | None = None  # None: never ran
    success_at: float | None = None  # epoch of the last ok one
    seconds: float | None = None  # the last one's duration, whatever its outcome
    # reload: the last committed hand-over's pause; refresh: the last successful one's
    # switch, from the signal until every worker reported the new store
    pause_seconds: float | None = None

    def counted(self, result: str, seconds: float | None, now: float,
                pause_seconds: float | None = None) -> Last:
        """This record with one more swap of `result`; what it did not measure is kept."""
        counts = {**self.counts, result: self.counts.get(result, 0) + 1}
        ok = result == "ok"
        return Last(counts, ok, now if ok else self.success_at,
                    seconds if seconds is not None else self.seconds,
                    pause_seconds if pause_seconds is not None else self.pause_seconds)


@dataclass(frozen=True)
class Serving:
    """What serves when the metrics are written: the health path's answer and memory."""

    generation: str = ""
    master_pid: int | None = None
    release: str = ""
    store: str = ""
    load_seconds: float | None = None
    headroom_bytes: int | None = None  # available - required for a second generation
    required_bytes: int | None = None
    available_bytes: int | None = None


@dataclass(frozen=True)
class SwapMetrics:
    """The record `<run_dir>/metrics.json`: read, counted into and written under the lock."""

    reloads: Last = Last()
    refreshes: Last = Last()

    @classmethod
    def read(cls, run_dir: Path) -> SwapMetrics:
        try:
            document = json.loads((run_dir / RECORD_NAME).read_text())
            return cls(Last(**document["reloads"]), Last(**document["refreshes"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()  # none yet, or unreadable: counting restarts (a counter reset)

    def write(self, run_dir: Path) -> None:
        files.atomic_write(run_dir / RECORD_NAME, json.dumps(dataclasses.asdict(self)),
                           owner_of=run_dir)


def serving(host: Host, margin_percent: float = memory.DEFAULT_MARGIN_PERCENT) -> Serving:
    """Ask the serving generation (None fields: it did not answer)."""
    health = host.healthz(HEALTH_TIMEOUT) or {}
    master = health.get("master_pid") or host.masters().live
    room = None
    if master:
        try:
            room = host.memory_room(master, margin_percent)
        except OSError:
            pass  # exited meanwhile: no headroom to tell
    store = health.get("resource_version") or os.path.basename(health.get("store_path") or "")
    return Serving(str(health.get("generation") or ""), master, str(health.get("release") or ""),
                   str(store), health.get("load_seconds"),
                   room.headroom if room else None, room.required if room else None,
                   room.available if room else None)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(lines: list[str], name: str, kind: str, help_text: str,
            samples: list[tuple[dict[str, str], float | None]]) -> None:
    samples = [(labels, value) for labels, value in samples if value is not None]
    if not samples:
        return  # unknown: no sample rather than a made-up 0
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{key}="{_escape(val)}"' for key, val in labels.items())
        lines.append(f"{name}{{{text}}} {float(value)!r}" if text else f"{name} {float(value)!r}")


def _swaps(lines: list[str], kind: str, plural: str, last: Last, pause_help: str,
           pause_name: str) -> None:
    _family(lines, f"hotswap_{plural}_total", "counter", f"{plural.capitalize()} by result.",
            [({"result": result}, last.counts.get(result, 0)) for result in RESULTS])
    flag = None if last.successful is None else int(last.successful)
    _family(lines, f"hotswap_last_{kind}_successful", "gauge",
            f"1 if the last {kind} succeeded, 0 if not.", [({}, flag)])
    _family(lines, f"hotswap_last_{kind}_success_timestamp_seconds", "gauge",
            f"When the last successful {kind} ended, in seconds since the epoch.",
            [({}, last.success_at)])
    _family(lines, f"hotswap_last_{kind}_duration_seconds", "gauge",
            f"How long the last {kind} took, whatever its outcome.", [({}, last.seconds)])
    _family(lines, f"hotswap_last_{kind}_{pause_name}_seconds", "gauge", pause_help,
            [({}, last.pause_seconds)])


def render(state: SwapMetrics, now: Serving) -> str:
    """The text exposition format (version 0.0.4) of the record and what serves."""
    lines: list[str] = []
    _swaps(lines, "reload", "reloads", state.reloads, "Nobody accepted for this long during "
           "the last committed hand-over (the old workers paused, the new not yet accepting).",
           "handover_pause")
    _swaps(lines, "refresh", "refreshes", state.refreshes, "From the signal until every "
           "worker of the last successful refresh reported the new store.", "switch")
    if now.generation or now.master_pid:
        _family(lines, "hotswap_generation_info", "gauge", "The serving generation (value 1).",
                [({"generation": now.generation, "master_pid": str(now.master_pid or ""),
                   "release": now.release, "store": now.store}, 1)])
    _family(lines, "hotswap_generation_load_seconds", "gauge",
            "How long the serving generation took to import and load.",
            [({}, now.load_seconds)])
    _family(lines, "hotswap_memory_swap_headroom_bytes", "gauge", "Memory available minus "
            "what a second generation needs (negative: a reload is refused, exit 7).",
            [({}, now.headroom_bytes)])
    _family(lines, "hotswap_memory_swap_required_bytes", "gauge", "What a second generation "
            "needs: the serving one's memory plus the margin.", [({}, now.required_bytes)])
    _family(lines, "hotswap_memory_swap_available_bytes", "gauge", "The memory available to "
            "a second generation (MemAvailable, or under the cgroup's limit if lower).",
            [({}, now.available_bytes)])
    return "\n".join(lines) + "\n"


def metrics_file(cfg: Config) -> Path:
    return cfg.metrics_file or cfg.run_dir / "hotswap.prom"


def count(cfg: Config, host: Host, kind: str, result: str, seconds: float | None,
          pause_seconds: float | None = None) -> str | None:
    """Count one swap (the caller holds the reload lock) and rewrite the textfile; a warning
    when either cannot be written (a full run dir must not fail the swap), else None."""
    state = SwapMetrics.read(cfg.run_dir)
    last = getattr(state, kind).counted(result, seconds, time.time(), pause_seconds)
    state = dataclasses.replace(state, **{kind: last})
    path = metrics_file(cfg)
    try:
        state.write(cfg.run_dir)
        files.atomic_write(path, render(state, serving(host)), owner_of=cfg.run_dir)
    except OSError as exc:
        return f"could not write the metrics to {path}: {exc.strerror or exc}"
    return None


def rewrite(cfg: Config, host: Host | None = None) -> str:
    """`hotswap metrics --write`: the file afresh from the record and what serves now (after
    a start or a restart, which swap nothing: ExecStartPost=, or a timer). Skipped while a
    swap runs, which writes it itself; the counters are re-read under the lock, so a swap
    that ended meanwhile is never written back out of date."""
    now = serving(host or RealHost(cfg))
    with unless_swapping(cfg) as free:
        if free:
            files.atomic_write(metrics_file(cfg), render(SwapMetrics.read(cfg.run_dir), now),
                               owner_of=cfg.run_dir)
    return current(cfg, host)


def current(cfg: Config, host: Host | None = None) -> str:
    """`hotswap metrics`: the file the last swap wrote; before any, rendered from now."""
    try:
        return metrics_file(cfg).read_text()
    except FileNotFoundError:
        return render(SwapMetrics.read(cfg.run_dir), serving(host or RealHost(cfg)))
