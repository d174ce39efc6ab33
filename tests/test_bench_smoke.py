"""Smoke test of the benchmark harness (bench/): `python -m bench.bench --quick` end to end.

A tiny resource, 2 reloads, hotswap plus uWSGI's graceful reload, a few seconds of load at
32 connections. It checks that the harness works (every mode ran, every reload was timed,
every request recorded and attributed, the table and the plot were written) and that
hotswap lost nothing. It asserts no timings: those are the full bench's business
(`make bench`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RELOADS = 2
MODES = ("hotswap", "uwsgi-graceful")
TIMEOUT = 120  # seconds; a run takes ~20 s


def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bench", "--quick", "--reloads", str(RELOADS),
         "--connections", "32", "--modes", *MODES, "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the bench stops what it started on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError(f"bench still running after {TIMEOUT}s:\n{stdout[-3000:]}") from None
    assert proc.returncode == 0, f"bench failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"

    run = json.loads((out / "results.json").read_text())
    rows = {row["mode"]: row for row in json.loads((out / "summary.json").read_text())}
    assert [m["mode"] for m in run["modes"]] == list(MODES)
    assert (out / "results.md").read_text().count("\n|") >= 2 + len(MODES)
    assert (out / "latency.png").stat().st_size > 10_000

    for mode in run["modes"]:
        name = mode["mode"]
        assert "error" not in mode, f"{name}: {mode.get('error')}\n{mode.get('traceback')}"
        windows = mode["windows"]
        assert len(windows) == RELOADS and all(w["ok"] for w in windows), (name, windows)
        assert all(0 < w["end"] - w["start"] < 60 for w in windows), (name, windows)
        # every reload installed a new generation, and that generation answered
        versions = [w["version"] for w in windows]
        assert len(set(versions)) == RELOADS
        assert all(w["generation"].startswith(w["version"] + "+") for w in windows), windows
        assert mode["memory"] and all(s["rss_kb"] > 0 for s in mode["memory"])

        records = [json.loads(line) for line in (out / mode["records_file"]).open()]
        assert len(records) == mode["requests"] == rows[name]["requests"]
        assert len(records) > 1000, f"{name}: only {len(records)} requests"
        ok = [r for r in records if r["outcome"] == "ok"]
        # every 2xx answer names its generation; the load saw the first one and the last
        assert all(r["generation"] and r["master_pid"] for r in ok)
        seen = {r["generation"] for r in ok}
        assert windows[-1]["generation"] in seen
        assert rows[name]["generations_seen"] == RELOADS + 1, (name, seen)
        assert rows[name]["steady"]["n"] > 0 and rows[name]["window"]["n"] > 0

    hotswap = rows["hotswap"]
    assert hotswap["failed"] == 0, f"hotswap lost requests: {hotswap['failures']}"
    assert hotswap["reloads_ok"] == RELOADS
