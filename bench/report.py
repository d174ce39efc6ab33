"""Turn a bench run (results.json + raw/*.jsonl) into one Markdown table and one plot.

    python -m bench.report [--out bench/results]

Definitions (also printed under the table):
  * reload window: from the reload command until the new generation answers /healthz and
    every process of the old generation is gone (for hotswap: until `hotswap reload`
    returns, checked from outside).
  * a request is "in a reload window" when its [start, end] overlaps a window; "steady"
    requests overlap none (the first WARMUP seconds of load are left out).
  * latency percentiles are over successful (2xx) requests; failures are counted by kind.
  * throughput: 2xx answers completed per second, in steady time vs inside windows.
  * reload overhead: window wall time minus the new generation's own load_seconds
    (/healthz), i.e. what the reload costs beyond importing the app once.
  * memory: sum over all the server's processes; steady = median of samples outside
    windows, peak = max of samples inside windows.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys

WARMUP = 1.0
TARGET_P99_RATIO = 1.5
TARGET_OVERHEAD = 0.5
FOREIGN_WARNING = 0.1  # cores used by other processes before a warning is printed


def size_text(size: int) -> str:
    """A file size for a headline: a small one must not read "0 MiB" (bench --quick)."""
    if size >= 10 * 2**20:
        return f"{size / 2**20:.0f} MiB"
    if size >= 2**20:
        return f"{size / 2**20:.1f} MiB"
    return f"{size / 2**10:.0f} KiB"


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not values:
        return None
    rank = max(1, min(len(values), int(-(-q * len(values) // 100))))
    return values[rank - 1]


def _windows(mode: dict) -> list[tuple[float, float]]:
    return [(w["start"], w["end"]) for w in mode.get("windows", [])]


def _in_windows(t0: float, t1: float, windows) -> bool:
    return any(t0 <= end and t1 >= start for start, end in windows)


def load_records(out: str, mode: dict) -> list[dict]:
    path = os.path.join(out, mode.get("records_file", ""))
    if not mode.get("records_file") or not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def _lat(values: list[float]) -> dict:
    values = sorted(values)
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": values[-1] if values else None}


def _memory(mode: dict, windows) -> dict:
    steady = [s for s in mode.get("memory", []) if not _in_windows(s["t"], s["t"], windows)]
    swap = [s for s in mode.get("memory", []) if _in_windows(s["t"], s["t"], windows)]

    def med(samples, key):
        vals = [s[key] for s in samples if s[key] is not None]
        return statistics.median(vals) / 1024 if vals else None

    def peak(samples, key):
        vals = [s[key] for s in samples if s[key] is not None]
        return max(vals) / 1024 if vals else None

    foreign = [s["foreign_cores"] for s in mode.get("memory", [])
               if s.get("foreign_cores") is not None]
    return {"foreign_cores_mean": statistics.mean(foreign) if foreign else None,
            "foreign_cores_max": max(foreign, default=None),
            "steady_rss_mb": med(steady, "rss_kb"), "steady_pss_mb": med(steady, "pss_kb"),
            "peak_rss_mb": peak(swap, "rss_kb"), "peak_pss_mb": peak(swap, "pss_kb"),
            "steady_procs": statistics.median([s["processes"] for s in steady]) if steady
            else None,
            "peak_procs": max([s["processes"] for s in swap], default=None)}


def _reload_times(mode: dict) -> dict:
    ws = mode.get("windows", [])
    walls = [w["end"] - w["start"] for w in ws]
    loads = [w["load_seconds"] for w in ws if w.get("load_seconds") is not None]
    overheads = [w["end"] - w["start"] - w["load_seconds"] for w in ws
                 if w.get("load_seconds") is not None]
    return {"reloads": len(ws), "reloads_ok": sum(1 for w in ws if w["ok"]),
            "wall_mean": statistics.mean(walls) if walls else None,
            "wall_max": max(walls, default=None),
            "load_mean": statistics.mean(loads) if loads else None,
            "overhead_mean": statistics.mean(overheads) if overheads else None,
            "overhead_max": max(overheads, default=None),
            "generations": [w.get("generation", "") for w in ws],
            "details": [w["detail"] for w in ws if w.get("detail")]}


def hotswap_breakdown(mode: dict) -> dict | None:
    """Where a hotswap reload's time goes, from the CLI's own phase log (reload --json)."""
    parts = collections.defaultdict(list)
    for w in mode.get("windows", []):
        cli = w.get("extra", {}).get("cli_result")
        if not cli or not cli.get("phases"):
            continue
        at = {}
        for phase in cli["phases"]:
            at.setdefault(phase["phase"], phase["at"])
        if not {"loading", "retiring", "verifying", "done"} <= at.keys():
            continue
        wall = w["end"] - w["start"]
        parts["cli_process"].append(wall - cli["seconds"])
        parts["preflight_fork"].append(at["loading"])
        parts["new_master_up"].append(at["retiring"] - at["loading"])
        if w.get("load_seconds") is not None:
            parts["startup_beyond_load"].append(at["retiring"] - at["loading"]
                                                - w["load_seconds"])
        parts["old_drain_exit"].append(at["verifying"] - at["retiring"])
        parts["verify"].append(at["done"] - at["verifying"])
        parts["cli_internal"].append(cli["seconds"])
    if not parts:
        return None
    return {k: statistics.mean(v) for k, v in parts.items()}


def stats_loadgen(out: str, mode: dict) -> dict:
    records = load_records(out, mode)
    windows = _windows(mode)
    result = {"requests": len(records), **_reload_times(mode), **_memory(mode, windows)}
    if not records:
        return result
    t_first = records[0]["started"]
    t_last = max(r["started"] + r["latency"] for r in records)
    failures = collections.Counter(r["outcome"] for r in records if r["outcome"] != "ok")
    steady, inside = [], []
    done_steady = done_inside = 0
    for r in records:
        end = r["started"] + r["latency"]
        in_window = _in_windows(r["started"], end, windows)
        if r["outcome"] == "ok":
            if in_window:
                inside.append(r["latency"])
            elif r["started"] >= t_first + WARMUP:
                steady.append(r["latency"])
            if _in_windows(end, end, windows):
                done_inside += 1
            elif end >= t_first + WARMUP:
                done_steady += 1
    window_time = sum(min(e, t_last) - max(s, t_first) for s, e in windows if e > t_first)
    steady_time = (t_last - t_first - WARMUP) - window_time
    gens = collections.Counter(r["generation"] for r in records if r["generation"])
    result.update({
        "failures": dict(failures), "failed": sum(failures.values()),
        "steady": _lat(steady), "window": _lat(inside),
        "rps_steady": done_steady / steady_time if steady_time > 0 else None,
        "rps_window": done_inside / window_time if window_time > 0 else None,
        "load_seconds_span": t_last - t_first,
        "generations_seen": len(gens),
    })
    return result


def stats_wrk(mode: dict) -> dict:
    wrk = mode.get("wrk", {})
    windows = _windows(mode)
    result = {"requests": wrk.get("requests", 0), **_reload_times(mode), **_memory(mode,
                                                                               windows)}
    if not wrk:
        return result
    errors = {k: v for k, v in wrk["errors"].items() if v and k != "status"}
    non2xx = {f"http_{k}": v for k, v in wrk["statuses"].items() if not k.startswith("2")}
    failures = {**non2xx, **{f"socket_{k}": v for k, v in errors.items()}}
    steady_n = inside_n = 0
    steady_b = inside_b = 0
    buckets = {int(k): v for k, v in wrk["buckets_100ms"].items()}
    bad = {int(k): v for k, v in wrk["bad_buckets_100ms"].items()}
    first = min(buckets, default=0)
    for b, n in buckets.items():
        good = n - bad.get(b, 0)
        if _in_windows(b / 10, (b + 1) / 10, windows):
            inside_n += good
            inside_b += 1
        elif b >= first + WARMUP * 10:
            steady_n += good
            steady_b += 1
    lat = wrk["latency_us"]
    result.update({
        "failures": failures, "failed": sum(failures.values()),
        "overall": {"p50": lat["p50"] / 1e6, "p99": lat["p99"] / 1e6, "max": lat["max"] / 1e6},
        "rps_steady": steady_n / (steady_b / 10) if steady_b else None,
        "rps_window": inside_n / (inside_b / 10) if inside_b else None,
    })
    return result


def compute(out: str, run: dict) -> list[dict]:
    rows = []
    for mode in run["modes"]:
        stats = stats_wrk(mode) if mode.get("client") == "wrk" else stats_loadgen(out, mode)
        rows.append({"mode": mode["mode"], "title": mode.get("title", mode["mode"]),
                     "error": mode.get("error"), "breakdown": hotswap_breakdown(mode),
                     **stats})
    return rows


# -- rendering --------------------------------------------------------------------------------

def _ms(v) -> str:
    return "–" if v is None else (f"{v * 1000:.0f}" if v >= 0.1 else f"{v * 1000:.1f}")


def _s(v, digits=2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _mb(v) -> str:
    return "–" if v is None else f"{v:.0f}"


def _failures(row: dict) -> str:
    if row.get("failures") is None:
        return "–"
    if not row["failures"]:
        return "**0**"
    parts = [f"{k} {v}" for k, v in sorted(row["failures"].items(), key=lambda kv: -kv[1])]
    return f"**{row['failed']}**: " + ", ".join(parts)


def _latency_cell(lat: dict | None) -> str:
    if not lat or not lat.get("n"):
        return "–"
    return f"{_ms(lat['p50'])} / {_ms(lat['p99'])} / {_ms(lat['max'])}"


def targets(rows: list[dict]) -> list[str]:
    lines = []
    hot = next((r for r in rows if r["mode"] == "hotswap" and not r.get("error")), None)
    ngx = next((r for r in rows if r["mode"] == "hotswap-nginx" and not r.get("error")), None)
    if hot:
        ok = hot.get("failed") == 0 and hot["reloads_ok"] == hot["reloads"]
        lines.append(f"- 0 failures over all reloads (loadgen, unix socket): "
                     f"{'**met**' if ok else '**missed**'} — {hot.get('failed')} failed of "
                     f"{hot['requests']} requests, {hot['reloads_ok']}/{hot['reloads']} "
                     "reloads succeeded")
        if hot.get("steady", {}).get("p99") and hot.get("window", {}).get("p99"):
            ratio = hot["window"]["p99"] / hot["steady"]["p99"]
            lines.append(f"- p99 inside reload windows ≤ {TARGET_P99_RATIO} × steady p99: "
                         f"{'**met**' if ratio <= TARGET_P99_RATIO else '**missed**'} — "
                         f"{_ms(hot['window']['p99'])} ms vs {_ms(hot['steady']['p99'])} ms "
                         f"(× {ratio:.2f})")
        if hot.get("overhead_max") is not None:
            lines.append(f"- reload overhead ≤ {TARGET_OVERHEAD} s above the app's load time: "
                         f"{'**met**' if hot['overhead_max'] <= TARGET_OVERHEAD else '**missed**'}"
                         f" — mean {hot['overhead_mean']:.2f} s, worst {hot['overhead_max']:.2f} s"
                         f" (app load {hot['load_mean']:.2f} s)")
        b = hot.get("breakdown")
        if b:
            lines.append(
                f"  - where a hotswap reload's time goes (means, from `hotswap reload --json`): "
                f"CLI process start/exit {b['cli_process']:.2f} s; preflight + FIFO "
                f"{b['preflight_fork']:.2f} s; new master up (uWSGI re-exec, Python, Flask, "
                f"resource, fork, accepting hook) {b['new_master_up']:.2f} s, of which "
                f"{b.get('startup_beyond_load', 0):.2f} s beyond load_seconds; old master "
                f"drain + exit {b['old_drain_exit']:.2f} s; verify {b['verify']:.2f} s")
    if ngx:
        ok = ngx.get("failed") == 0 and ngx["reloads_ok"] == ngx["reloads"]
        lines.append(f"- 0 failures through nginx + wrk: {'**met**' if ok else '**missed**'} — "
                     f"{ngx.get('failed')} non-2xx/socket errors of {ngx['requests']} requests, "
                     f"{ngx['reloads_ok']}/{ngx['reloads']} reloads succeeded")
    return lines


def markdown(run: dict, rows: list[dict]) -> str:
    m = run["machine"]

    def version(tool: str) -> str:
        words = [w for w in m.get(tool, "").replace("(", " ").replace(")", " ").split()
                 if any(c.isdigit() for c in w)]
        return f"{tool} {words[0].split('/')[-1]}" if words else f"{tool} missing"

    head = (
        f"Run `{run['command']}` ({run['run_id']}, {run.get('elapsed', 0):.0f} s): "
        f"{run['reloads']} reloads per mode, {run['connections']} connections, resource "
        f"{run['terms']:,} terms ({size_text(run['resource_bytes'])}). Machine: "
        f"{m['nproc']} × {m['cpu_model']}, {m['mem_gb']} GB, Linux {m['kernel']}, "
        f"Python {m['python']}, "
        + ", ".join(version(t) for t in ("uwsgi", "gunicorn", "nginx", "wrk")) + ".\n\n")
    cols = ["mode", "requests", "failures", "steady p50 / p99 / max (ms)",
            "in reload p50 / p99 / max (ms)", "2xx/s steady → in reload",
            "reload wall s mean (max)", "app load s", "overhead s mean (max)",
            "RSS MB steady → peak", "PSS MB steady → peak"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['title']} | – | error: {r['error'][:120]} |" +
                         " – |" * (len(cols) - 3))
            continue
        if "overall" in r:  # wrk: no per-request times, so no steady/window split
            lat_steady = f"all: {_latency_cell({'n': 1, **r['overall']})}"
            lat_window = "(wrk: not split)"
        else:
            lat_steady, lat_window = _latency_cell(r.get("steady")), _latency_cell(
                r.get("window"))
        cells = [
            r["title"], f"{r['requests']:,}", _failures(r), lat_steady, lat_window,
            f"{_s(r.get('rps_steady'), 0)} → {_s(r.get('rps_window'), 0)}",
            f"{_s(r['wall_mean'])} ({_s(r['wall_max'])})"
            + ("" if r["reloads_ok"] == r["reloads"]
               else f" — {r['reloads'] - r['reloads_ok']} failed"),
            _s(r["load_mean"]),
            f"{_s(r['overhead_mean'])} ({_s(r['overhead_max'])})",
            f"{_mb(r['steady_rss_mb'])} → {_mb(r['peak_rss_mb'])}",
            f"{_mb(r['steady_pss_mb'])} → {_mb(r['peak_pss_mb'])}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "Reload window: from the reload command until the new generation answers and every "
        "process of the old one is gone. Latencies are over 2xx answers; a request counts as "
        "\"in reload\" if it overlaps a window. Overhead = window − the new generation's own "
        "load_seconds (/healthz). Memory sums every process of the server (RSS double-counts "
        "copy-on-write pages shared by a master and its workers; PSS does not); steady = "
        "median outside windows, peak = max inside windows.",
    ]
    busy = {}
    for m in run["modes"]:
        row = next(r for r in rows if r["mode"] == m["mode"])
        before, during = m.get("background_cpu") or 0, row.get("foreign_cores_mean") or 0
        if before > FOREIGN_WARNING or during > FOREIGN_WARNING:
            busy[m["mode"]] = f"{before:.2f} before the load, {during:.2f} on average during it"
    if busy:
        notes += ["", "**Warning: the machine was not idle**; cores used by processes other "
                  "than the bench and its server: "
                  + "; ".join(f"{k}: {v}" for k, v in busy.items())
                  + ". Those modes' figures are skewed."]
    elif all(r.get("foreign_cores_mean") is not None for r in rows if not r.get("error")):
        worst = max((r["foreign_cores_mean"] for r in rows if not r.get("error")), default=0)
        notes += ["", f"The machine was otherwise idle: other processes used at most {worst:.2f}"
                  " core on average during any mode (measured from /proc)."]
    tgt = targets(rows)
    if tgt:
        notes += ["", "Targets for hotswap:", *tgt]
    return head + "\n".join(lines + notes) + "\n"


def _thin(records: list[dict], limit: int = 60_000) -> list[dict]:
    """At most `limit` points for the scatter: every slow one (top 2%), a sample of the rest."""
    if len(records) <= limit:
        return records
    import random

    cut = sorted(r["latency"] for r in records)[int(len(records) * 0.98)]
    slow = [r for r in records if r["latency"] >= cut]
    rest = [r for r in records if r["latency"] < cut]
    return slow + random.Random(0).sample(rest, max(0, limit - len(slow)))


def plot(out: str, run: dict, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    modes = [m for m in run["modes"] if not m.get("error")]
    if not modes:
        return
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 2.6 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        row = next(r for r in rows if r["mode"] == mode["mode"])
        t0 = mode.get("load_started") or min((w["start"] for w in mode["windows"]), default=0)
        for w in mode.get("windows", []):
            ax.axvspan(w["start"] - t0, w["end"] - t0, color="tab:orange", alpha=0.25, lw=0)
        if mode.get("client") == "wrk":
            wrk = mode["wrk"]
            b = sorted((int(k), v) for k, v in wrk["buckets_100ms"].items())
            bad = {int(k): v for k, v in wrk["bad_buckets_100ms"].items()}
            ax.plot([k / 10 - t0 for k, _ in b], [v * 10 for _, v in b], lw=0.8,
                    color="tab:blue", label="answers/s (wrk, 100 ms bins)")
            for i, k in enumerate(sorted(bad)):
                ax.axvline(k / 10 - t0, color="red", lw=1.2,
                           label=None if i else f"non-2xx ({sum(bad.values())})")
            ax.set_ylabel("req/s")
            ax.set_ylim(bottom=0)
            title = (f"{mode['title']}: {row['requests']:,} requests, {row.get('failed', 0)} "
                     f"non-2xx/socket errors (wrk gives no per-request latency)")
        else:
            records = load_records(out, mode)
            ok = _thin([r for r in records if r["outcome"] == "ok"])
            bad_r = [r for r in records if r["outcome"] != "ok"]
            ax.scatter([r["started"] - t0 for r in ok], [r["latency"] * 1000 for r in ok],
                       s=1, alpha=0.25, color="tab:blue", rasterized=True, lw=0,
                       label="2xx latency")
            if bad_r:
                ax.scatter([r["started"] - t0 for r in bad_r],
                           [max(r["latency"] * 1000, 0.1) for r in bad_r], s=6, marker="x",
                           color="red", rasterized=True, lw=0.6,
                           label=f"failed ({len(bad_r):,})")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_ylabel("latency (ms)")
            title = (f"{mode['title']}: {row['requests']:,} requests, {row.get('failed', 0)} "
                     f"failed; p99 steady {_ms(row.get('steady', {}).get('p99'))} ms, "
                     f"in reload {_ms(row.get('window', {}).get('p99'))} ms")
        mem = [s for s in mode.get("memory", []) if s.get("pss_kb") or s.get("rss_kb")]
        if mem:
            ax2 = ax.twinx()
            key = "pss_kb" if all(s.get("pss_kb") for s in mem) else "rss_kb"
            ax2.plot([s["t"] - t0 for s in mem], [s[key] / 1024 for s in mem], color="tab:green",
                     lw=0.9, alpha=0.8, label=f"{key[:3].upper()} of all server processes")
            ax2.legend(loc="upper right", fontsize=7)
            ax2.set_ylabel(f"{key[:3].upper()} MB", color="tab:green")
            ax2.tick_params(axis="y", colors="tab:green")
            ax2.set_ylim(bottom=0)
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=7, markerscale=4)
    axes[-1, 0].set_xlabel("seconds since load started (orange: reload windows; green: "
                           "memory of all server processes)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


class MissingRawData(Exception):
    """The run's raw records are not here (they are not committed): a redraw would overwrite
    the committed table and plot with an empty run."""


def missing_records(out: str, run: dict) -> list[str]:
    return [mode["records_file"] for mode in run.get("modes", [])
            if mode.get("records_file")
            and not os.path.exists(os.path.join(out, mode["records_file"]))]


def render(out: str) -> str:
    with open(os.path.join(out, "results.json")) as handle:
        run = json.load(handle)
    if missing := missing_records(out, run):
        raise MissingRawData(f"{len(missing)} raw record file(s) missing under {out} "
                             f"(first: {missing[0]}); raw data is not committed, so only the "
                             "machine that ran the bench can redraw it: `make bench` makes a "
                             "new run. Nothing was written.")
    rows = compute(out, run)
    table = markdown(run, rows)
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(table)
    with open(os.path.join(out, "summary.json"), "w") as handle:
        json.dump(rows, handle, indent=1)
    plot(out, run, rows, os.path.join(out, "latency.png"))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render a bench run's table and plot")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    try:
        print(render(args.out))
    except (MissingRawData, OSError) as exc:
        print(f"bench.report: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
