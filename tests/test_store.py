"""The memory-mapped store: format and validation alone (fast), then store-mode instances
under load (slow): refreshes and reloads lose nothing and never mix versions, bad stores are
refused by both, and the store's pages are shared by the workers."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Service, sample_paths

from bench.loadgen import LoadGenerator, summarize
from hotswap.protocol import store
from hotswap.swap import probe
from hotswap.system import procs
from scripts.build_store import read_table
from scripts.gen_resource import write_resource

CONNECTIONS = 32


def make_store(path: Path, version: str, entries: int = 1000) -> store.StoreInfo:
    pairs = sorted((f"t{i:06d}".encode(), f"noun,{version}".encode()) for i in range(entries))
    store.build(pairs, path, version)
    return store.validate(path)


def flip_byte(path: Path) -> None:
    """Damage one byte of content: the one after a comma (only values hold commas) past the
    middle of the file. (A byte in a page's unused slack changes no content, and passes.)"""
    data = bytearray(path.read_bytes())
    at = data.index(b",", len(data) // 2) + 1
    data[at] ^= 0x20
    path.write_bytes(bytes(data))


# -- the format, alone -------------------------------------------------------------------

def test_build_then_validate_round_trip(tmp_path: Path):
    info = make_store(tmp_path / "terms-v1.lmdb", "v1", 2500)
    assert (info.version, info.entries) == ("v1", 2500)
    assert info.path == str(tmp_path / "terms-v1.lmdb")
    assert not list(tmp_path.glob("*.tmp.*")) and not list(tmp_path.glob("*-lock"))
    # the digest is that of `key \n value \n` in key order, whatever the batch size
    pairs = sorted((f"t{i:06d}".encode(), b"noun,v1") for i in range(2500))
    flat = b"".join(k + b"\n" + v + b"\n" for k, v in pairs)
    assert info.sha256 == hashlib.sha256(flat).hexdigest()


def test_a_store_is_never_rewritten_and_needs_sorted_unique_keys(tmp_path: Path):
    make_store(tmp_path / "s.lmdb", "v1")
    with pytest.raises(FileExistsError):
        make_store(tmp_path / "s.lmdb", "v2")
    with pytest.raises(ValueError, match="sorted"):
        store.build([(b"b", b"x"), (b"a", b"y")], tmp_path / "u.lmdb", "v1")
    assert not (tmp_path / "u.lmdb").exists() and not list(tmp_path.glob("*.tmp.*"))
    with pytest.raises(ValueError, match="version"):
        store.build([], tmp_path / "w.lmdb", "bad version")


@pytest.mark.parametrize("damage, message", [
    (flip_byte, "checksum mismatch|corrupt|metadata"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
    (lambda p: p.unlink(), "no store"),
    (lambda p: p.write_bytes(b"x" * 10000), "not an LMDB store|truncated"),
])
def test_validation_refuses_damaged_stores(tmp_path: Path, damage, message):
    path = tmp_path / "terms-v1.lmdb"
    make_store(path, "v1", 5000)
    damage(path)
    with pytest.raises(store.StoreError, match=message):
        store.validate(path)


def test_the_validator_child_speaks_one_line(tmp_path: Path):
    path = tmp_path / "s.lmdb"
    make_store(path, "v1", 5000)
    ok = subprocess.run([sys.executable, "-m", "hotswap.protocol.store", "validate", str(path)],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and json.loads(ok.stdout)["version"] == "v1"
    flip_byte(path)
    bad = subprocess.run([sys.executable, "-m", "hotswap.protocol.store", "validate", str(path)],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1


def test_point_switches_the_symlink_atomically(tmp_path: Path):
    make_store(tmp_path / "terms-v1.lmdb", "v1")
    make_store(tmp_path / "terms-v2.lmdb", "v2")
    store.point(tmp_path / "current", tmp_path / "terms-v1.lmdb")
    assert os.readlink(tmp_path / "current") == "terms-v1.lmdb"
    store.point(tmp_path / "current", tmp_path / "terms-v2.lmdb")
    assert store.validate(tmp_path / "current").version == "v2"


def test_builder_reads_the_generated_table(tmp_path: Path):
    table = tmp_path / "terms.tsv"
    write_resource(str(table), 3000, seed=1, version="v9")
    header, pairs = read_table(str(table))
    assert header["version"] == "v9" and len(pairs) == 3000
    assert [k for k, _ in pairs] == sorted(k for k, _ in pairs)


@pytest.fixture
def srv_store_module(tmp_path: Path, monkeypatch):
    make_store(tmp_path / "terms-v1.lmdb", "v1")
    store.point(tmp_path / "current", tmp_path / "terms-v1.lmdb")
    monkeypatch.setenv("SRV_MODE", "store")
    monkeypatch.setenv("SRV_STORE", str(tmp_path / "current"))
    sys.modules.pop("srv", None)
    yield lambda: importlib.import_module("srv")
    sys.modules.pop("srv", None)


def test_srv_serves_from_the_store(srv_store_module):
    client = srv_store_module().app.test_client()
    health = client.get("/healthz").get_json()
    assert health["mode"] == "store" and health["terms"] == 1000
    assert health["generation"].startswith("v1+") and "warm_seconds" in health
    found = client.get("/lookup?q=t000007")
    assert found.get_json()["tags"] == ["noun", "v1"]
    assert found.headers["X-Generation"] == health["generation"]
    assert client.get("/lookup?q=nosuch").status_code == 404


def test_srv_import_fails_on_a_corrupt_store(srv_store_module, tmp_path: Path):
    flip_byte(tmp_path / "terms-v1.lmdb")
    with pytest.raises(RuntimeError, match="checksum mismatch|corrupt|metadata"):
        srv_store_module()


# -- store-mode instances under load -----------------------------------------------------

def version_store(service: Service, version: str) -> Path:
    """A store with the same terms as data/terms.tsv, each tagged with `version`: an answer
    then shows which version it was read from, in its header and in its body."""
    path = service.store_dir / store.store_file_name(version)
    _, pairs = read_table(str(service.root / "data" / "terms.tsv"))
    store.build(((k, v + b"," + version.encode()) for k, v in pairs), path, version)
    return path


class MixChecker:
    """Lookups on their own connections that keep header, body and time of each answer."""

    def __init__(self, service: Service, terms: list[str], threads: int = 4) -> None:
        self.socket, self.terms = str(service.socket), terms
        self.answers: list[tuple[float, float, str, str, list[str]]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, index: int) -> None:
        n = index
        while not self._stop.is_set():
            term = self.terms[n % len(self.terms)]
            n += 1
            started = time.time()
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(10)
                    sock.connect(self.socket)
                    sock.sendall(f"GET /lookup?q={term} HTTP/1.0\r\n\r\n".encode())
                    raw = b"".join(iter(lambda s=sock: s.recv(65536), b""))
            except OSError as exc:
                self.errors.append(repr(exc))
                continue
            head, _, body = raw.partition(b"\r\n\r\n")
            header = next((line.split(":", 1)[1].strip() for line in
                           head.decode("latin-1").split("\r\n")
                           if line.lower().startswith("x-generation:")), "")
            try:
                doc = json.loads(body)
                self.answers.append((started, time.time(), header, doc["generation"],
                                     doc["tags"]))
            except (ValueError, KeyError):
                self.errors.append(head.decode("latin-1")[:80])

    def __enter__(self) -> MixChecker:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def lookup_terms(service: Service, count: int = 50) -> list[str]:
    return [p.split("=", 1)[1] for p in sample_paths(service, count) if "=" in p]


@pytest.mark.slow
def test_refreshes_and_reloads_under_load_never_mix_versions(tmp_path: Path):
    service = Service(tmp_path, mode="store")
    try:
        health = service.start()
        code = health["generation"].split("+")[1]
        # version -> [first moment it may answer, last moment it may answer]
        live = {"v1": [0.0, float("inf")]}
        load = LoadGenerator(str(service.socket), CONNECTIONS, sample_paths(service),
                             max_seconds=240)
        with load, MixChecker(service, lookup_terms(service)) as mix:
            for n in range(2, 7):
                new, old = f"v{n}", f"v{n - 1}"
                path = version_store(service, new)
                live[new] = [time.time(), float("inf")]
                done = service.cli("refresh", str(path), "--json")
                assert done.returncode == 0, done.stdout + done.stderr
                result = json.loads(done.stdout)
                live[old][1] = time.time()
                assert result["new_version"] == new and result["workers"]
                assert all(w["new_version"] == new for w in result["workers"])
                assert service.health()["generation"] == f"{new}+{code}"
                # the old store is unmapped: no process of the instance maps it any more
                old_file = str(service.store_dir / store.store_file_name(old))
                assert not [p for p in service.all_pids() if old_file in maps(p)]
                reload = service.cli("reload")
                assert reload.returncode == 0, reload.stdout + reload.stderr
                after = service.wait_ready()
                assert after["generation"] == f"{new}+{code}"
                assert f"store {new}" in service.cli("status").stdout
        summary = summarize(load.records)
    finally:
        service.teardown()
    assert summary["requests"] > 500, summary
    assert summary["failed"] == 0, summary
    assert not mix.errors, mix.errors[:5]
    assert len(mix.answers) > 100
    for started, ended, header, body_generation, tags in mix.answers:
        version = header.split("+")[0]
        assert header == body_generation, (header, body_generation)
        # v1 is the untagged store the instance started with; each later one tags its answers
        assert tags[-1] == version if version != "v1" else tags[-1] not in live, (header, tags)
        first, last = live[version]
        assert started <= last and ended >= first, (version, started, ended, live[version])
    for record in (r for r in load.records if r.generation):
        version = record.generation.split("+")[0]
        first, last = live[version]
        assert record.started <= last and record.started + record.latency >= first


def maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


@pytest.mark.slow
def test_bad_stores_are_refused_by_refresh_and_reload(tmp_path: Path):
    service = Service(tmp_path, mode="store")
    try:
        before = service.start()
        with LoadGenerator(str(service.socket), CONNECTIONS, sample_paths(service)) as load:
            corrupt = version_store(service, "v2")
            flip_byte(corrupt)
            done = service.cli("refresh", str(corrupt))
            assert done.returncode == 1, done.stdout + done.stderr
            assert done.stderr.count("\n") == 1 and "store refused" in done.stderr
            assert "Traceback" not in done.stderr
            missing = service.cli("refresh", str(tmp_path / "nope.lmdb"))
            assert missing.returncode == 2 and missing.stderr.startswith("hotswap: no store")
            assert service.health()["generation"] == before["generation"]
            # a reload whose pointer names a corrupt store: the new master fails its import
            good = os.readlink(service.store_dir / "current")
            store.point(service.store_dir / "current", corrupt)
            done = service.cli("reload")
            assert done.returncode == 1, done.stdout + done.stderr
            assert "checksum mismatch" in done.stderr.splitlines()[0]
            health = service.health()
            assert (health["master_pid"], health["generation"]) == (
                before["master_pid"], before["generation"])
            store.point(service.store_dir / "current", service.store_dir / good)
            fixed = version_store(service, "v3")
            assert service.cli("refresh", str(fixed)).returncode == 0
        assert summarize(load.records)["failed"] == 0
        assert service.health()["generation"].startswith("v3+")
    finally:
        service.teardown()


@pytest.mark.slow
def test_refresh_refuses_while_a_reload_runs_and_on_a_heap_instance(tmp_path: Path):
    for name in ("store", "heap"):
        (tmp_path / name).mkdir()
    service = Service(tmp_path / "store", mode="store")
    heap = Service(tmp_path / "heap", mode="heap")
    try:
        service.start()
        path = version_store(service, "v2")
        service.release_hanging_import()
        reload = service.cli_background("reload")
        service.loading_pid()
        busy = service.cli("refresh", str(path))
        assert busy.returncode == 4 and "reload is in progress" in busy.stderr
        service.let_import_finish()
        out, err = reload.communicate(timeout=60)
        assert reload.returncode == 0, out + err
        service.seen_masters.add(service.master())
        heap.start()
        refused = heap.cli("refresh", str(path))
        assert refused.returncode == 2 and "not in store mode" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    finally:
        service.teardown()
        heap.teardown()


def smaps_rollup(pid: int) -> dict[str, int]:
    """kB figures of /proc/PID/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    return fields


def private_kb(pid: int) -> int:
    rollup = smaps_rollup(pid)
    return rollup["Private_Clean"] + rollup["Private_Dirty"]


def store_mapping_private_kb(pid: int, path: str) -> int:
    """Private kB of the mapping of `path` in /proc/PID/smaps."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split()[0] and len(line.split()) >= 5:
            inside = line.endswith(path)
        elif inside and line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total


def on_every_worker(service: Service, path: str, workers: set[int], check) -> None:
    """GET path from 8 connections at once until each worker has answered it once."""
    seen: set[int] = set()
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if seen >= workers:
                    return
            answer = probe.get(service.socket, path, timeout=60).json()
            check(answer)
            with lock:
                seen.add(answer["worker_pid"])

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert seen >= workers, (seen, workers)


@pytest.mark.slow
def test_the_store_is_shared_by_the_workers(tmp_path: Path):
    terms = 1_000_000
    service = Service(tmp_path, mode="store")
    try:
        service.release("v2", terms=terms)  # a new version: v1 is built already
        health = service.start()
        path = health["store_path"]
        store_kb = os.path.getsize(path) // 1024
        workers = set(procs.children(health["master_pid"]))
        # first requests cost every worker some heap (Flask, json): pay them before measuring
        on_every_worker(service, "/scan?limit=100", workers, lambda a: None)
        before = {pid: private_kb(pid) for pid in workers}
        on_every_worker(service, "/scan", workers,
                        lambda a: a["scanned"] == terms or pytest.fail(str(a)))
        grown = {pid: private_kb(pid) - before[pid] for pid in workers}
        in_store = {pid: store_mapping_private_kb(pid, path) for pid in workers}
        # Each worker read the whole store (its RSS holds it), yet its private memory grew
        # by far less than the store: the pages are the page cache's, shared by all.
        for pid in workers:
            assert smaps_rollup(pid)["Rss"] > store_kb, pid
        assert max(grown.values()) < store_kb * 0.1, (grown, store_kb)
        assert max(in_store.values()) < store_kb * 0.02, (in_store, store_kb)
    finally:
        service.teardown()
