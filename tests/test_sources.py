"""`hotswap watch --source`: real PostgreSQL and Redis servers on 127.0.0.1 (started and
stopped here, from Debian's packages) announce signed releases to a real watcher over a
real service; one server of each kind and one service for the module, tests in file order."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import Lines, Service, sample_paths
from releases_util import LayoutService, lookup_paths

from bench.loadgen import LoadGenerator, summarize
from hotswap.releases.message import sign
from hotswap.releases.sources import SCHEMA, TABLE
from hotswap.swap import lock
from hotswap.system import procs

psycopg = pytest.importorskip("psycopg")
redis = pytest.importorskip("redis")
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
if PG_BIN is None or not shutil.which("redis-server"):
    pytest.skip("postgresql or redis-server missing: run scripts/install-system-deps.sh as root",
                allow_module_level=True)

pytestmark = pytest.mark.slow
KEY = b"test-shared-secret-of-32-bytes-or-more"
QUIET = "0.2"
REPO = Path(__file__).resolve().parents[1]
# The publisher's commands as docs/releases.md shows them (test_the_doc_shows_these_commands),
# run here with bash: $REL, $ID, $KEY, $DB and $REDIS set by publish().
SIGN = 'msg=$(hotswap announce deploy "$REL" --id "$ID" --key "$KEY")'
PUBLISH = {
    "postgres": 'psql "$DB" -v msg="$msg" <<< "INSERT INTO hotswap_releases (body) '
                "VALUES (:'msg')\"",
    "redis": 'redis-cli -u "$REDIS" SET releases:latest "$msg" && '
             'redis-cli -u "$REDIS" PUBLISH releases "$msg"',
    "stream": "redis-cli -u \"$REDIS\" XADD rel MAXLEN '~' 1000 '*' msg \"$msg\"",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(process: subprocess.Popen, signum: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signum)
    process.wait(timeout=60)


class Postgres:
    """initdb into a temp dir and `postgres` in the foreground, as the postgres user when
    run as root (postgres refuses root); trust auth on 127.0.0.1 only."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="hotswap-pg-"))  # not under root's 0700 tmp
        self.port = free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        self.process: subprocess.Popen | None = None
        if os.getuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        done = subprocess.run([*self.user(), str(PG_BIN / "initdb"), "-D", str(self.base / "data"),
                               "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

    @staticmethod
    def user() -> list[str]:
        return (["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
                if os.getuid() == 0 else [])

    def start(self) -> None:
        self.process = subprocess.Popen(
            [*self.user(), str(PG_BIN / "postgres"), "-D", str(self.base / "data"),
             "-p", str(self.port), "-k", str(self.base), "-c", "listen_addresses=127.0.0.1",
             "-c", "fsync=off"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        assert procs.wait_until(self.answers, 60, interval=0.05), "postgres never answered"

    def answers(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        if self.process:
            stop_group(self.process, signal.SIGINT)  # fast shutdown

    def insert(self, body: str) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"INSERT INTO {TABLE} (body) VALUES (%s)", (body,))


class Redis:
    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, start_new_session=True)
        assert procs.wait_until(self.answers, 60, interval=0.05), "redis never answered"

    def answers(self) -> bool:
        try:
            return self.client().ping()
        except redis.ConnectionError:
            return False

    def client(self):
        return redis.Redis(port=self.port, socket_connect_timeout=2)

    def stop(self) -> None:
        if self.process:
            stop_group(self.process)

    def announce(self, channel: str, body: str) -> None:
        """The publisher's two steps: the latest (for a watcher that reconnects), then the news."""
        client = self.client()
        client.set(f"{channel}:latest", body)
        client.publish(channel, body)


@pytest.fixture(scope="module")
def servers():
    pg, rd = Postgres(), Redis()
    try:
        pg.start()
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(SCHEMA)
        rd.start()
        yield pg, rd
    finally:
        pg.stop()
        rd.stop()
        shutil.rmtree(pg.base, ignore_errors=True)


def write_key(service: Service) -> None:
    """ROOT/watch.key: the shared secret, mode 600 as the watcher requires."""
    (service.root / "watch.key").write_bytes(KEY)
    os.chmod(service.root / "watch.key", 0o600)


def new_service(base: Path) -> LayoutService:
    service = LayoutService(base)
    assert service.cli("deploy", str(service.source("v1"))).returncode == 0
    service.start()
    write_key(service)
    return service


@pytest.fixture(scope="module")
def live(tmp_path_factory, servers):
    service = new_service(tmp_path_factory.mktemp("sources"))
    try:
        yield service, servers
    finally:
        service.teardown()


def watch(service: Service, url: str, *extra: str, allow: Path | None = None) -> Lines:
    lines = Lines(service.cli_background(
        "watch", "--source", url, "--key", str(service.root / "watch.key"),
        "--allow", str(allow or service.src), "--quiet", QUIET, *extra))
    lines.wait_for("listening on")
    return lines


def stop(lines: Lines) -> str:
    os.kill(lines.process.pid, signal.SIGTERM)
    code, out, err = lines.finish(timeout=60)
    assert code == 0 and "Traceback" not in err, out + err
    return out


def count(lines: Lines, text: str) -> int:
    return sum(1 for line in lines.lines if text in line)


def publish(kind: str, service: LayoutService, name: str, servers) -> None:
    """Announce SRC/NAME the way docs/releases.md does, with hotswap announce and the
    servers' own command-line clients."""
    pg, rd = servers
    folder = service.src / name
    service.source(name)
    env = dict(os.environ, REL=str(folder), ID=name, KEY=str(service.root / "watch.key"),
               DB=pg.url, REDIS=f"redis://127.0.0.1:{rd.port}",
               PATH=f"{Path(service.python).parent}:{PG_BIN}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", f"set -eo pipefail; {SIGN}; {PUBLISH[kind]}"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_doc_shows_these_commands() -> None:
    page = (REPO / "docs" / "releases.md").read_text()
    for command in (SIGN, *PUBLISH.values()):
        assert f"$ {command}" in page, command


def signed(service: LayoutService, name: str) -> str:
    """A release folder SRC/NAME (made once) announced with the id NAME."""
    folder = service.src / name
    if not folder.exists():
        service.source(name)
    return sign("deploy", str(folder), name, KEY)


def test_a_row_inserted_swaps_under_load_and_bad_rows_are_refused(live):
    service, (pg, _) = live
    lines = watch(service, pg.url)
    try:
        with LoadGenerator(str(service.socket), 32, lookup_paths(service),
                           max_seconds=120) as load:
            publish("postgres", service, "pg1", live[1])
            lines.wait_for(f"deploy {service.src / 'pg1'}: ok", timeout=120)
        summary = summarize(load.records)
        assert summary["failed"] == 0, summary
        assert service.serving_name() == "pg1"
        pg.insert(signed(service, "pg1"))  # the same id again
        lines.wait_for("id 'pg1' was already taken")
        pg.insert('{"v": 1, "id": "x", "action": "deploy", "path": "/tmp/x"}')
        lines.wait_for("refused: the message is not signed")
        pg.insert(sign("deploy", str(service.source("pgother")), "pgother", b"o" * 40))
        lines.wait_for("refused: wrong signature")
        pg.insert(sign("deploy", "/etc/evil", "evil", KEY))
        lines.wait_for("outside the allowed locations")
        pg.insert(sign("deploy", str(service.src / "never-made"), "gone", KEY))
        lines.wait_for("names no release or store there")
        pg.insert("garbage")
        lines.wait_for("refused: not JSON")
        assert count(lines, ": running") == 1, lines.lines
        assert service.serving_name() == "pg1" and service.health()
    finally:
        stop(lines)


def test_rows_inserted_while_down_and_a_restarted_server_are_caught_up(live):
    service, (pg, _) = live
    pg.insert(signed(service, "pg2"))
    pg.insert(signed(service, "pg3"))  # nobody listens: the table is the source of truth
    lines = watch(service, pg.url)
    try:
        lines.wait_for(f"deploy {service.src / 'pg3'}: ok", timeout=120)
        assert count(lines, "pg2") == 0, lines.lines  # superseded unseen, never swapped
        pg.stop()
        lines.wait_for("connection lost or refused")
        pg.start()
        lines.wait_for("connected again")
        pg.insert(signed(service, "pg4"))
        lines.wait_for(f"deploy {service.src / 'pg4'}: ok", timeout=120)
        assert count(lines, ": running") == 2, lines.lines
    finally:
        stop(lines)
    again = watch(service, pg.url, "--verbose")  # its own restart: no second swap
    try:
        again.wait_for("id 'pg4' was already taken")
        assert count(again, ": running") == 0
    finally:
        stop(again)
    assert service.serving_name() == "pg4"


def test_redis_pubsub_catches_up_from_latest_after_a_restart(live):
    service, (_, rd) = live
    url = f"redis://127.0.0.1:{rd.port}/releases"
    lines = watch(service, url)
    try:
        publish("redis", service, "rd1", live[1])
        lines.wait_for(f"deploy {service.src / 'rd1'}: ok", timeout=120)
        rd.stop()
        lines.wait_for("connection lost or refused")
        rd.start()  # no persistence: what the publisher announces next is all there is
        lines.wait_for("connected again")
    finally:
        stop(lines)
    rd.announce("releases", signed(service, "rd2"))  # nobody subscribed: only :latest keeps it
    lines = watch(service, url)
    try:
        lines.wait_for(f"deploy {service.src / 'rd2'}: ok", timeout=120)
    finally:
        stop(lines)
    assert service.serving_name() == "rd2"


def test_a_stream_keeps_what_was_added_while_down_and_drops_a_poison_entry(live):
    service, (_, rd) = live
    client = rd.client()
    publish("stream", service, "st1", live[1])  # before any watcher or group
    url = f"redis-stream://127.0.0.1:{rd.port}/rel?group=host-a"
    lines = watch(service, url)
    try:
        lines.wait_for(f"deploy {service.src / 'st1'}: ok", timeout=120)
        client.xadd("rel", {"msg": "{poison"})
        client.xadd("rel", {"msg": signed(service, "st2")})
        lines.wait_for(f"deploy {service.src / 'st2'}: ok", timeout=120)
        assert count(lines, "refused: not JSON") == 1, lines.lines
        assert procs.wait_until(lambda: client.xpending("rel", "host-a")["pending"] == 0, 30)
    finally:
        stop(lines)
    assert service.serving_name() == "st2"


def test_three_instances_on_one_channel_end_on_the_announced_release(live, tmp_path_factory):
    service, (_, rd) = live
    others = [new_service(tmp_path_factory.mktemp(f"fleet{n}")) for n in (2, 3)]
    fleet = [service, *others]
    url = f"redis://127.0.0.1:{rd.port}/fleet"
    watchers = []
    try:
        watchers = [watch(host, url, allow=service.src) for host in fleet]
        rd.announce("fleet", signed(service, "fleet1"))  # one folder on "shared storage"
        for host, lines in zip(fleet, watchers, strict=True):  # each logs its own outcome
            lines.wait_for(f"deploy {service.src / 'fleet1'}: ok", timeout=120)
            assert host.serving_name() == "fleet1"
            assert count(lines, ": running") == 1, lines.lines
    finally:
        for lines in watchers:
            stop(lines)
        for other in others:
            other.teardown()


def test_a_stream_entry_pending_when_its_watcher_died_is_reread_and_not_swapped_twice(live):
    """SIGKILL to the watcher mid-deploy: the entry stays pending (never acknowledged); the
    deploy finishes in its own session; the next watcher re-reads the entry, finds its id in
    the ledger, acknowledges it and swaps nothing."""
    service, (_, rd) = live
    client = rd.client()
    url = f"redis-stream://127.0.0.1:{rd.port}/rel?group=host-a"
    lines = watch(service, url)
    deployer = None
    try:
        folder = service.gated_source("gated")
        client.xadd("rel", {"msg": sign("deploy", str(folder), "gated", KEY)})
        lines.wait_for(f"deploy {folder}: running")
        service.loading_pid()
        deployer = lock.Holder.parse((service.run_dir / "reload.lock").read_text()).pid
        os.kill(lines.process.pid, signal.SIGKILL)
        lines.process.wait(timeout=30)
        assert client.xpending("rel", "host-a")["pending"] == 1
        service.let_import_finish()
        assert procs.wait_until(lambda: not procs.alive(deployer), 120), "the deploy died"
        assert service.serving_name() == "gated"
        again = watch(service, url, "--verbose")
        try:
            again.wait_for("id 'gated' was already taken")
            assert procs.wait_until(lambda: client.xpending("rel", "host-a")["pending"] == 0, 30)
            assert count(again, ": running") == 0, again.lines
        finally:
            stop(again)
    finally:
        if deployer and procs.alive(deployer):
            procs.signal_quietly(deployer, signal.SIGKILL)
        if lines.process.poll() is None:
            stop(lines)


def test_a_signed_refresh_on_redis_switches_a_store_mode_instance_under_load(servers, tmp_path):
    """The data path: a store-mode instance (no release layout), a store built beside the
    one it serves, announced as `refresh` on pub/sub; every worker serves it, nothing fails."""
    _, rd = servers
    service = Service(tmp_path, mode="store")
    try:
        code = service.start()["generation"].split("+")[1]
        write_key(service)
        new = service.build_store("v2")
        lines = watch(service, f"redis://127.0.0.1:{rd.port}/stores", allow=service.store_dir)
        try:
            with LoadGenerator(str(service.socket), 8, sample_paths(service),
                               max_seconds=60) as load:
                rd.announce("stores", sign("refresh", str(new), "store-v2", KEY))
                lines.wait_for(f"refresh {new}: ok", timeout=60)
        finally:
            stop(lines)
        assert count(lines, ": running") == 1, lines.lines
        summary = summarize(load.records)
        assert summary["failed"] == 0 and summary["requests"] > 0, summary
        assert service.health()["generation"] == f"v2+{code}"
        assert "store v2" in service.cli("status").stdout
    finally:
        service.teardown()
