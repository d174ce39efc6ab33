"""The per-generation request metrics (hotswap/inside/app_metrics.py): the sweep's rule with a
clock and liveness handed in, then one real service (uWSGI, 32 clients, 3 reloads, a worker
SIGKILLed) whose scrapes are checked against what the load client counted."""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, Service, sample_paths
from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import LoadGenerator, summarize
from hotswap.inside import app_metrics
from hotswap.swap import probe
from hotswap.system import procs

CONNECTIONS = 32
REQUESTS = "hotswap_app_requests_total"
COUNT = "hotswap_app_request_duration_seconds_count"
SETTLE_TIMEOUT = 30.0


# -- the sweep's rule ---------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def generations(tmp_path: Path, keep: float, gone: set[str]):
    clock = Clock()
    found = app_metrics.Generations(tmp_path / "app-metrics", keep, now=clock,
                                    alive=lambda name: name not in gone)
    for name in ("10-1", "20-2"):
        (found.root / name).mkdir(parents=True)
        (found.root / name / "counter_11.db").write_bytes(b"")
    return found, clock


def test_a_gone_masters_folder_goes_only_after_a_later_scrape_and_the_keep(tmp_path: Path):
    found, clock = generations(tmp_path, keep=60, gone={"10-1"})
    (found.root / "not-ours").mkdir()
    assert found.sweep(collected_at=clock.now) == []  # first seen gone: marked, kept
    assert (found.root / "10-1" / app_metrics.GONE_MARK).exists()
    clock.now += 61
    # a scrape that began before the mark may have read counts older than the master's end
    assert found.sweep(collected_at=100.0) == []
    assert found.sweep(collected_at=clock.now) == ["10-1"]
    assert sorted(p.name for p in found.root.iterdir()) == ["20-2", "not-ours"]
    assert found.files() == [str(found.root / "20-2" / "counter_11.db")]


def test_within_the_keep_a_gone_folder_stays_in_the_scrape(tmp_path: Path):
    found, clock = generations(tmp_path, keep=60, gone={"10-1", "20-2"})
    found.sweep(collected_at=clock.now)
    clock.now += 30
    assert found.sweep(collected_at=clock.now) == []
    assert len(found.files()) == 2
    # a folder a killed sweep left half-removed is not read, and is finished
    (found.root / "10-1").rename(found.root / "10-1.removing")
    assert found.files() == [str(found.root / "20-2" / "counter_11.db")]
    found.sweep(collected_at=clock.now)
    assert not (found.root / "10-1.removing").exists()


def test_master_alive_knows_a_reused_pid():
    me = app_metrics.folder_name(os.getpid())
    assert app_metrics.master_alive(me)
    pid, ticks = me.split("-")
    assert not app_metrics.master_alive(f"{pid}-{int(ticks) + 1}")  # same pid, another process
    assert app_metrics.master_alive("not-ours")  # never swept


def test_status_classes():
    assert [app_metrics.status_class(s) for s in ("200 OK", "404 NOT FOUND", "503 X", "oops")] \
        == ["2xx", "4xx", "5xx", "other"]


@pytest.mark.parametrize("options", ["{}", '{"hotswap-metrics": "/metrics"}'])
def test_without_the_key_or_outside_uwsgi_nothing_of_it_is_imported(options: str):
    """Unset, or in refresh's app check (the ini's values, outside uWSGI): a wrapped app
    answers as before, and neither module is loaded."""
    code = ("import sys\n"
            "from hotswap.inside import wsgi\n"
            "app = wsgi.wrap(lambda e, s: s('200 OK', []) or [b'ok'])\n"
            "assert app.metrics is None\n"
            "assert 'prometheus_client' not in sys.modules, 'prometheus_client'\n"
            "assert 'hotswap.inside.app_metrics' not in sys.modules, 'app_metrics'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, HOTSWAP_INI_OPTIONS=options))
    assert done.returncode == 0, done.stderr


def test_an_app_that_imported_prometheus_client_first_still_gets_summed_counts(
        tmp_path: Path):
    """Without PROMETHEUS_MULTIPROC_DIR, prometheus_client counts in the process's heap: the
    kit switches it to the workers' files, and a count is in the scrape."""
    code = ("import os, sys, time, prometheus_client\n"
            "from prometheus_client import values\n"
            "assert not values.ValueClass._multiprocess\n"
            "from hotswap.inside import app_metrics\n"
            f"metrics = app_metrics.enable('/metrics', {str(tmp_path)!r}, None)\n"
            "assert values.ValueClass._multiprocess\n"
            "metrics.observe('500 X', [('X-Generation', 'g1')], time.perf_counter())\n"
            # a wsgi.file_wrapper file goes back as is (uWSGI sendfile()s only that), counted
            "f = open(__import__('os').devnull, 'rb')\n"
            "def app(e, s): s('200 OK', [('X-Generation', 'g1')]); return f\n"
            "assert metrics.counted(app, {}, lambda *a: None) is f\n"
            "sys.stdout.write(metrics.exposition().decode())\n")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert 'status_class="5xx"} 1.0' in done.stdout, done.stdout
    assert 'status_class="2xx"} 1.0' in done.stdout, done.stdout
    assert len(list((tmp_path / app_metrics.FOLDER).iterdir())) == 1


# -- a real service ---------------------------------------------------------------------
class Scraper:
    """What Prometheus keeps: the last value of every series it scraped, also once the series
    has left the scrape (a removed generation's folder)."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.last: dict[tuple[str, tuple], float] = {}
        self.text = ""

    def scrape(self) -> dict[tuple[str, tuple], float]:
        answer = probe.get(self.socket, "/metrics", timeout=10)
        assert answer.status == 200, answer.body[:300]
        self.text = answer.body.decode()
        now = {}
        for family in text_string_to_metric_families(self.text):
            for sample in family.samples:
                if sample.name in (REQUESTS, COUNT):
                    now[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        for key, value in now.items():
            assert value >= self.last.get(key, 0), f"{key} fell from {self.last[key]} to {value}"
        self.last.update(now)
        return now

    def total(self, name: str = REQUESTS, **match: str) -> float:
        return sum(value for (metric, labels), value in self.last.items() if metric == name
                   and all(dict(labels).get(k) == v for k, v in match.items()))

    def by_generation(self) -> dict[str, float]:
        found: dict[str, float] = collections.Counter()
        for (metric, labels), value in self.last.items():
            if metric == REQUESTS:
                found[dict(labels)["generation"]] += value
        return dict(found)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = Service(tmp_path_factory.mktemp("app-metrics"))
    # keep 0: a gone generation's folder goes at the second scrape after its master ended
    with open(svc.ini, "a") as ini:
        ini.write("hotswap-metrics = /metrics\nhotswap-metrics-keep = 0\n")
    try:
        svc.start()
        yield svc
    finally:
        svc.teardown()


def app_paths(service: Service) -> tuple[str, ...]:
    """Lookups (200) and an unknown term (404); not the health path, which is not counted."""
    return (*(p for p in sample_paths(service) if p != service.health_path),
            "/lookup?q=no-such-term")


def failed(summary: dict) -> int:
    """Requests that got no answer (the unknown term's 404 is an answer)."""
    return sum(n for kind, n in summary["outcomes"].items() if kind not in ("ok", "http_404"))


def settled(scraper: Scraper, expected: float, base: float) -> bool:
    """The last requests are counted once their answer is closed, just after the client read
    it: poll until the scrape has them."""
    return procs.wait_until(lambda: scraper.scrape() is not None
                            and scraper.total() - base == expected, SETTLE_TIMEOUT)


@pytest.mark.slow  # 3 reloads under 32 clients: ~40 s on a loaded 2-core machine
def test_counts_through_three_reloads_equal_the_clients(service: Service):
    scraper = Scraper(service.socket)
    scraper.scrape()
    base, base_404 = scraper.total(), scraper.total(status_class="4xx")
    base_by_generation = scraper.by_generation()
    load = LoadGenerator(str(service.socket), CONNECTIONS, app_paths(service), max_seconds=240)
    scrapes = 0
    with load:
        for n in range(2, 5):
            service.release(version=f"v{n}")
            reload = service.cli_background("reload")
            while reload.poll() is None or scrapes < 3 * (n - 1):
                before = len(load.records)
                scraper.scrape()
                after = len(load.records)
                counted = scraper.total() - base
                # at most one request per client answered but not yet closed, or closed
                # but not yet read by its client
                assert before - CONNECTIONS <= counted <= after + CONNECTIONS, \
                    (before, counted, after)
                scrapes += 1
            assert reload.wait() == 0, reload.stderr.read()
    summary = summarize(load.records)
    assert failed(summary) == 0, summary
    assert len(summary["generations"]) == 4, summary
    assert settled(scraper, len(load.records), base), (scraper.total() - base, summary)
    assert scraper.total(COUNT) == scraper.total()  # the histogram counted each one too
    assert scraper.total(status_class="4xx") - base_404 == summary["outcomes"]["http_404"]
    # and each generation's, as the clients attributed them by X-Generation
    clients = collections.Counter(r.generation for r in load.records)
    counted = {generation: requests - base_by_generation.get(generation, 0)
               for generation, requests in scraper.by_generation().items()}
    assert {g: n for g, n in counted.items() if n} == dict(clients)
    # the retired generations' folders are gone (swept after a scrape read their last counts)
    master = service.health()["master_pid"]
    assert procs.wait_until(lambda: scraper.scrape() is not None and folders(service) ==
                            [app_metrics.folder_name(master)], SETTLE_TIMEOUT), \
        folders(service)
    if promtool := shutil.which("promtool"):
        lint = subprocess.run([promtool, "check", "metrics"], input=scraper.text,
                              capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0, lint.stdout + lint.stderr


def folders(service: Service) -> list[str]:
    return sorted(p.name for p in (service.run_dir / app_metrics.FOLDER).iterdir())


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_no_count(service: Service):
    scraper = Scraper(service.socket)
    scraper.scrape()
    base = scraper.total()
    master = service.health()["master_pid"]
    load = LoadGenerator(str(service.socket), CONNECTIONS, app_paths(service), max_seconds=120)
    with load:
        assert procs.wait_until(lambda: len(load.records) > 2000, 60), len(load.records)
        victim = service.health()["worker_pid"]
        own = service.run_dir / app_metrics.FOLDER / app_metrics.folder_name(master)
        assert (own / f"counter_{victim}.db").exists()
        before = scraper.scrape()
        os.kill(victim, signal.SIGKILL)
        assert procs.wait_until(lambda: not procs.alive(victim), 30)
        # uWSGI respawns it; meanwhile the other workers answer every scrape
        assert procs.wait_until(lambda: len(service.status()["workers"]) == 4, 60)
        after = scraper.scrape()  # Scraper.scrape asserts that no series fell
        assert set(before) <= set(after)
        assert (own / f"counter_{victim}.db").exists()  # its counts stay in the scrape
    summary = summarize(load.records)
    answered = len(load.records) - failed(summary)
    # the killed worker's own request in flight: failed at the client, or (killed between
    # sending the answer and closing it) answered but never counted
    assert failed(summary) <= 1, summary
    assert procs.wait_until(lambda: scraper.scrape() is not None
                            and answered - 1 <= scraper.total() - base <= answered,
                            SETTLE_TIMEOUT), (scraper.total() - base, answered, summary)


def test_the_cost_bench_runs():
    """docs/operations.md quotes `python -m bench.app_metrics_cost`: it runs (figures unchecked)."""
    done = subprocess.run([sys.executable, "-m", "bench.app_metrics_cost", "--runs", "1",
                           "--calls", "200"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "with hotswap-metrics" in done.stdout
