"""The swap metrics (hotswap/swap/metrics.py): rendering and counting through a fake host,
then one real reload pair whose textfile a test reads."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO, sample_paths
from fakehost import NEW, OLD, FakeHost

from bench.loadgen import LoadGenerator, summarize
from hotswap.config import Config
from hotswap.config import load as config_load
from hotswap.errors import ExitCode
from hotswap.protocol.record import Handover, State
from hotswap.swap import metrics
from hotswap.swap.lock import reload_lock
from hotswap.system import memory

SAMPLE = re.compile(r'^(?P<name>[a-z_]+)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')


def samples(text: str) -> dict[tuple[str, str], float]:
    """{(name, 'k="v",...'): value} of a text exposition; every line a sample or a comment."""
    found = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ ", line), line
            continue
        match = SAMPLE.match(line)
        assert match, line
        found[(match["name"], match["labels"] or "")] = float(match["value"])
    return found


def config(tmp_path: Path, metrics_file: Path | None = None) -> Config:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    return Config(ini=tmp_path / "srv.ini", uwsgi=Path("/nonexistent"), run_dir=run,
                  fifo_live=run / "0.fifo", fifo_standby=run / "1.fifo",
                  pidfile=run / "master.pid", stats_socket=run / "stats.sock",
                  log_file=tmp_path / "uwsgi.log", metrics_file=metrics_file)


def test_outcome_labels():
    assert metrics.outcome(True, 0, "SIGINT", refused=False) == "ok"  # committed first
    assert metrics.outcome(False, ExitCode.NO_ROOM, None, refused=True) == "refused"
    assert metrics.outcome(False, ExitCode.RELOAD_FAILED, "SIGTERM", False) == "interrupted"
    assert metrics.outcome(False, ExitCode.TIMEOUT, None, refused=False) == "timeout"
    assert metrics.outcome(False, ExitCode.RELOAD_FAILED, None, refused=False) == "failed"


def test_before_any_swap_only_what_is_known():
    text = metrics.render(metrics.SwapMetrics(), metrics.serving(FakeHost()))
    found = samples(text)
    for result in metrics.RESULTS:  # present at 0: rate() needs the series from the start
        assert found[("hotswap_reloads_total", f'result="{result}"')] == 0
        assert found[("hotswap_refreshes_total", f'result="{result}"')] == 0
    assert not any(name.startswith("hotswap_last_") for name, _ in found), text
    info = 'generation="v1",master_pid="100",release="",store=""'
    assert found[("hotswap_generation_info", info)] == 1
    assert found[("hotswap_memory_swap_headroom_bytes", "")] == \
        (1000 - 130) * memory.MIB  # 100 MiB + 30 % margin needed, 1000 MiB available


def test_counts_survive_runs_and_last_outcome_follows(tmp_path: Path):
    cfg, host = config(tmp_path), FakeHost()
    assert metrics.count(cfg, host, "reloads", "ok", 2.5, pause_seconds=0.043) is None
    good = samples(metrics.metrics_file(cfg).read_text())
    # a later CLI run reads the record back: counters keep counting
    metrics.count(cfg, host, "reloads", "failed", 1.25)
    metrics.count(cfg, host, "refreshes", "refused", 0.5)
    found = samples(metrics.current(cfg, host))
    assert found[("hotswap_reloads_total", 'result="ok"')] == 1
    assert found[("hotswap_reloads_total", 'result="failed"')] == 1
    assert found[("hotswap_last_reload_successful", "")] == 0
    assert found[("hotswap_last_reload_duration_seconds", "")] == 1.25
    # when the last one that succeeded ended, and the pause of the last committed hand-over
    assert found[("hotswap_last_reload_success_timestamp_seconds", "")] == \
        good[("hotswap_last_reload_success_timestamp_seconds", "")]
    assert found[("hotswap_last_reload_handover_pause_seconds", "")] == 0.043
    assert found[("hotswap_refreshes_total", 'result="refused"')] == 1
    assert found[("hotswap_last_refresh_successful", "")] == 0
    assert ("hotswap_last_refresh_success_timestamp_seconds", "") not in found


def test_serving_generation_follows_the_host(tmp_path: Path):
    cfg, host = config(tmp_path, metrics_file=tmp_path / "textfile" / "x.prom"), FakeHost()
    (tmp_path / "textfile").mkdir()
    host.alive_pids.add(NEW)
    host.record = Handover(master_pid=NEW, state=State.DONE)  # the hand-over committed
    host.alive_pids.discard(OLD)
    metrics.count(cfg, host, "reloads", "ok", 1.0)
    found = samples(cfg.metrics_file.read_text())
    assert [labels for name, labels in found if name == "hotswap_generation_info"] == \
        [f'generation="v2",master_pid="{NEW}",release="",store=""']


def test_the_ini_names_the_file(tmp_path: Path):
    ini = (REPO / "srv.ini").read_text()
    assert metrics.metrics_file(config_load(REPO / "srv.ini")) == REPO / "run" / "hotswap.prom"
    (tmp_path / "srv.ini").write_text(ini.replace(
        "; hotswap-metrics-file = %(run_dir)/hotswap.prom", "hotswap-metrics-file = prom/x.prom"))
    assert metrics.metrics_file(config_load(tmp_path / "srv.ini")) == tmp_path / "prom/x.prom"


def test_label_values_are_escaped():
    text = metrics.render(metrics.SwapMetrics(), metrics.Serving(
        generation='a"b\\c\nd', master_pid=7))
    assert 'generation="a\\"b\\\\c\\nd"' in text


def test_an_unreadable_record_restarts_the_counts(tmp_path: Path):
    cfg = config(tmp_path)
    (cfg.run_dir / metrics.RECORD_NAME).write_text("{half")
    assert metrics.SwapMetrics.read(cfg.run_dir) == metrics.SwapMetrics()


def test_rewrite_skips_while_a_swap_holds_the_lock(tmp_path: Path):
    cfg, host = config(tmp_path), FakeHost()
    with reload_lock(cfg, "start another"):
        assert "hotswap_generation_info" in metrics.rewrite(cfg, host)  # rendered, not written
        assert not metrics.metrics_file(cfg).exists()
    metrics.rewrite(cfg, host)
    assert "hotswap_generation_info" in metrics.metrics_file(cfg).read_text()


def test_an_unwritable_textfile_is_a_warning_not_a_failure(tmp_path: Path):
    cfg = config(tmp_path, metrics_file=tmp_path / "missing-dir" / "hotswap.prom")
    warning = metrics.count(cfg, FakeHost(), "reloads", "ok", 1.0)
    assert warning and "could not write the metrics to" in warning and "missing-dir" in warning


def test_real_reloads_write_the_textfile(service):
    """A good reload, then a broken one: the file says so each time, the serving generation's
    info follows the swap only, and `hotswap metrics` prints the same file."""
    before = service.start()
    textfile = service.run_dir / "hotswap.prom"
    started = service.cli("metrics", "--write")  # a start swaps nothing: ExecStartPost's job
    assert started.returncode == 0 and started.stdout == textfile.read_text()
    first = (f'generation="{before["generation"]}",master_pid="{before["master_pid"]}",'
             f'release="",store="v1"')
    assert samples(started.stdout)[("hotswap_generation_info", first)] == 1
    with LoadGenerator(str(service.socket), 8, sample_paths(service)) as load:
        service.release(version="v2")
        assert service.cli("reload").returncode == 0
        good = samples(textfile.read_text())
        served = service.health()
        service.release_code("raise ImportError('release 42 is broken')\n")
        assert service.cli("reload").returncode == 1
    assert summarize(load.records)["failed"] == 0
    assert good[("hotswap_last_reload_successful", "")] == 1
    assert good[("hotswap_reloads_total", 'result="ok"')] == 1
    assert good[("hotswap_last_reload_handover_pause_seconds", "")] >= 0
    assert served["master_pid"] != before["master_pid"]
    info = (f'generation="{served["generation"]}",master_pid="{served["master_pid"]}",'
            f'release="",store="v2"')
    assert good[("hotswap_generation_info", info)] == 1
    assert good[("hotswap_generation_load_seconds", "")] == served["load_seconds"]
    printed = service.cli("metrics")
    assert printed.returncode == 0
    broken = samples(printed.stdout)
    assert printed.stdout == textfile.read_text()
    assert broken[("hotswap_last_reload_successful", "")] == 0
    assert broken[("hotswap_reloads_total", 'result="ok"')] == 1
    assert broken[("hotswap_reloads_total", 'result="failed"')] == 1
    assert broken[("hotswap_last_reload_success_timestamp_seconds", "")] == \
        good[("hotswap_last_reload_success_timestamp_seconds", "")]
    assert broken[("hotswap_generation_info", info)] == 1  # the old one still serves
