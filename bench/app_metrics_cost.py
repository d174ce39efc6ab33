"""What the request metrics (hotswap/inside/app_metrics.py) cost a uWSGI process:
`.venv/bin/python -m bench.app_metrics_cost` (docs/operations.md#metrics quotes its output).

- the import, paid once per generation in its master (`hotswap-metrics` set): prometheus_client
  and app_metrics, each run in a fresh interpreter, the median of --runs;
- each request: the kit's middleware around a trivial WSGI app, without the key and with it
  (counter, histogram: two memory-mapped writes), the median of --runs batches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPORT = ("import time; t = time.perf_counter(); "
          "import prometheus_client, prometheus_client.multiprocess, hotswap.inside.app_metrics; "
          "print(time.perf_counter() - t)")


def import_seconds(runs: int, folder: str) -> float:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=folder)
    return statistics.median(
        float(subprocess.run([sys.executable, "-c", IMPORT], capture_output=True, text=True,
                             check=True, env=env).stdout) for _ in range(runs))


def request_seconds(middleware, calls: int) -> float:
    environ = {"PATH_INFO": "/x", "REQUEST_METHOD": "GET"}

    def start_response(status, headers, exc_info=None):
        return None

    began = time.perf_counter()
    for _ in range(calls):
        result = middleware(environ, start_response)
        for _chunk in result:
            pass
        if hasattr(result, "close"):
            result.close()
    return (time.perf_counter() - began) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        own = Path(tmp) / "app-metrics" / "1-1"
        own.mkdir(parents=True)
        print(f"import prometheus_client + app_metrics: "
              f"{import_seconds(args.runs, str(own)) * 1000:.1f} ms (median of {args.runs})")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(own)
        from hotswap.inside import app_metrics, wsgi

        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]

        plain = wsgi.Middleware(app, lambda: "g1", None, "/healthz")
        counted = wsgi.Middleware(app, lambda: "g1", None, "/healthz")
        counted.metrics = app_metrics.AppMetrics(
            "/metrics", app_metrics.Generations(own.parent, 300), 1)
        for name, middleware in (("without hotswap-metrics", plain),
                                 ("with hotswap-metrics", counted)):
            request_seconds(middleware, 1000)  # warm
            median = statistics.median(request_seconds(middleware, args.calls)
                                       for _ in range(args.runs))
            print(f"a request through the middleware, {name}: {median * 1e6:.1f} us")
        scrape = statistics.median(_timed(counted.metrics.exposition) for _ in range(args.runs))
        print(f"a scrape (1 worker's files): {scrape * 1000:.2f} ms")
    return 0


def _timed(call) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


if __name__ == "__main__":
    sys.exit(main())
