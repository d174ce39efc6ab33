"""A real Prometheus scraping a real node_exporter's textfile collector, which reads the swap
metrics the kit writes (hotswap/swap/metrics.py), through the shipped deploy/prometheus/
config; and promtool on the shipped alert rules."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, TEST_TERMS, Service

from hotswap.swap import probe
from hotswap.system import procs
from scripts.gen_resource import write_resource

SHIPPED = REPO / "deploy" / "prometheus"
PROMETHEUS, NODE_EXPORTER, PROMTOOL = (shutil.which(name) for name in (
    "prometheus", "prometheus-node-exporter", "promtool"))
pytestmark = pytest.mark.skipif(
    not (PROMETHEUS and NODE_EXPORTER and PROMTOOL),
    reason="prometheus, prometheus-node-exporter or promtool is not installed "
    "(scripts/install-system-deps.sh)")
UP_TIMEOUT = 60.0
SCRAPED_TIMEOUT = 30.0  # a scrape every second, then an evaluation


def free_port() -> int:
    from test_nginx import free_port as port  # the one way the tests pick a free port
    return port()


@contextlib.contextmanager
def running(args: list[str], log: Path, ready):
    """A process in its own group, stopped by that group at the end; `ready` polled first."""
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        assert procs.wait_until(lambda: process.poll() is None and ready(), UP_TIMEOUT), \
            f"{args[0]} did not come up: {log.read_text()[-2000:]}"
        yield process
    finally:
        procs.kill_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            procs.kill_group(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.read()
    except OSError:
        return None


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict]:
        body = get(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        return json.loads(body)["data"]["result"] if body else []

    def value(self, expr: str) -> float | None:
        found = self.query(expr)
        return float(found[0]["value"][1]) if len(found) == 1 else None

    def wait_value(self, expr: str, expected: float) -> None:
        assert procs.wait_until(lambda: self.value(expr) == expected, SCRAPED_TIMEOUT), \
            f"{expr} is {self.value(expr)}, not {expected}"

    def alerts(self) -> dict[str, str]:
        """{alertname: state} of the alerts the rules hold active now."""
        body = get(f"{self.base}/api/v1/alerts")
        return {alert["labels"]["alertname"]: alert["state"]
                for alert in (json.loads(body)["data"]["alerts"] if body else [])}

    def generations(self) -> list[str]:
        return [series["metric"]["generation"] for series in
                self.query("hotswap_generation_info")]


@contextlib.contextmanager
def scraped(service: Service, tmp: Path):
    """node_exporter serving the run dir's *.prom, Prometheus scraping it every second with
    the shipped config and rules."""
    exporter_port, prometheus_port = free_port(), free_port()
    config = (SHIPPED / "prometheus.yml").read_text()
    config = config.replace("scrape_interval: 15s", "scrape_interval: 1s").replace(
        "evaluation_interval: 15s", "evaluation_interval: 1s").replace(
        '"localhost:9100"', f'"127.0.0.1:{exporter_port}"').replace(
        '"localhost:80"', f'"127.0.0.1:{service.app_port}"')  # the app's request metrics
    (tmp / "prometheus.yml").write_text(config)
    shutil.copy(SHIPPED / "hotswap-rules.yml", tmp / "hotswap-rules.yml")
    exporter = [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{exporter_port}",
                "--collector.disable-defaults", "--collector.textfile",
                f"--collector.textfile.directory={service.run_dir}"]
    prometheus = [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                  f"--storage.tsdb.path={tmp / 'tsdb'}",
                  f"--web.listen-address=127.0.0.1:{prometheus_port}"]
    api = Prometheus(prometheus_port)
    with running(exporter, tmp / "node-exporter.log",
                 lambda: get(f"http://127.0.0.1:{exporter_port}/metrics") is not None), \
            running(prometheus, tmp / "prometheus.log",
                    lambda: get(f"{api.base}/-/ready") is not None):
        yield api


@pytest.mark.slow  # three reloads and two servers: ~45 s on a loaded 2-core machine
def test_prometheus_sees_each_swap_and_the_serving_generation(tmp_path: Path):
    """A good reload, a broken one, a good one and a refresh (store mode), as scraped."""
    tmp = tmp_path / "prometheus"
    tmp.mkdir()
    (tmp_path / "service").mkdir()
    service = Service(tmp_path / "service", mode="store")
    # the request metrics on a TCP socket besides the unix one: Prometheus scrapes TCP only
    service.app_port = free_port()
    with open(service.ini, "a") as ini:
        ini.write(f"http-socket = 127.0.0.1:{service.app_port}\nhotswap-metrics = /metrics\n")
    try:
        through_swaps(service, tmp)
    finally:
        service.teardown()


def through_swaps(service: Service, tmp: Path) -> None:
    first = service.start()
    service.release(version="v2")
    assert service.cli("reload").returncode == 0
    second = service.health()
    with scraped(service, tmp) as prometheus:
        prometheus.wait_value("hotswap_last_reload_successful", 1)
        assert prometheus.generations() == [second["generation"]]
        app_requests = 'sum(hotswap_app_requests_total{job="hotswap-app",status_class="4xx"})'
        unknown_terms(service, 5)
        prometheus.wait_value(app_requests, 5)
        service.release(version="v3")
        service.release_code("raise ImportError('release 43 is broken')\n")
        assert service.cli("reload").returncode == 1
        prometheus.wait_value("hotswap_last_reload_successful", 0)
        prometheus.wait_value('hotswap_reloads_total{result="failed"}', 1)
        assert prometheus.generations() == [second["generation"]]  # rolled back: no change
        # the shipped rules are loaded: the page is pending (its `for: 10m` never elapses here)
        assert procs.wait_until(lambda: prometheus.alerts().get("HotswapLastReloadFailed")
                                == "pending", SCRAPED_TIMEOUT), prometheus.alerts()
        service.restore_code()
        assert service.cli("reload").returncode == 0
        third = service.health()
        prometheus.wait_value("hotswap_last_reload_successful", 1)
        assert procs.wait_until(lambda: prometheus.generations() == [third["generation"]],
                                SCRAPED_TIMEOUT), prometheus.generations()
        prometheus.wait_value('hotswap_reloads_total{result="ok"}', 2)
        # the request metrics, summed over the generations: the retired one's 5 are kept
        unknown_terms(service, 3)
        prometheus.wait_value(app_requests, 8)
        assert prometheus.value(f'sum(hotswap_app_requests_total{{generation='
                                f'"{third["generation"]}"}})') == 3
        assert prometheus.value("hotswap_memory_swap_headroom_bytes") is not None
        # a refresh: the same master, a new store, so a new generation's info series
        write_resource(str(service.root / "data" / "terms.tsv"), TEST_TERMS, seed=7,
                       version="v4")
        refreshed = service.cli("refresh", str(service.build_store("v4")))
        assert refreshed.returncode == 0, refreshed.stdout + refreshed.stderr
        fourth = service.health()
        prometheus.wait_value('hotswap_refreshes_total{result="ok"}', 1)
        prometheus.wait_value("hotswap_last_refresh_successful", 1)
        assert procs.wait_until(lambda: prometheus.generations() == [fourth["generation"]],
                                SCRAPED_TIMEOUT), prometheus.generations()
        series = prometheus.query("hotswap_generation_info")[0]["metric"]
        assert (series["master_pid"], series["store"]) == (str(third["master_pid"]), "v4")
        assert procs.wait_until(lambda: "HotswapLastReloadFailed" not in prometheus.alerts(),
                                SCRAPED_TIMEOUT), prometheus.alerts()
    assert len({first["generation"], second["generation"], third["generation"],
                fourth["generation"]}) == 4
    lint = subprocess.run([PROMTOOL, "check", "metrics"], capture_output=True, text=True,
                          input=(service.run_dir / "hotswap.prom").read_text())
    assert lint.returncode == 0, lint.stdout + lint.stderr


def unknown_terms(service: Service, count: int) -> None:
    """`count` lookups the app answers 404: requests the metrics count by status class."""
    for _ in range(count):
        assert probe.get(service.socket, "/lookup?q=no-such-term").status == 404


def test_promtool_tests_the_shipped_rules():
    done = subprocess.run([PROMTOOL, "test", "rules", "hotswap-rules.test.yml"], cwd=SHIPPED,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    checked = subprocess.run([PROMTOOL, "check", "config", "prometheus.yml"], cwd=SHIPPED,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
