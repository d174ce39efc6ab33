"""The figures of docs/memory.md: the preflight's estimate against what a swap really took,
then what an operator sees when a second generation does not fit (refusal, --force).

    cd tests && ../.venv/bin/python memory_demo.py /tmp/memory-demo [TERMS]

Runs the service of tests/test_memory.py (heap mode, in a memory cgroup of its own) under 32
clients; needs a writable memory cgroup, as that module does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import test_memory
from conftest import sample_paths
from test_memory import CgroupService, MemoryCgroup

from bench.loadgen import LoadGenerator, summarize
from hotswap.system import memory, procs


def mib(size: int) -> str:
    return f"{size / memory.MIB:.0f} MiB"


def memory_line(svc: CgroupService) -> str:
    return next(line for line in svc.cli("status").stdout.splitlines()
                if line.startswith("memory"))


def main(root: Path, terms: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    test_memory.TERMS = terms
    group = MemoryCgroup()
    svc = CgroupService(root, group)

    def counter(name: str) -> int:
        return int((group.path / name).read_text())

    try:
        svc.start()
        with LoadGenerator(str(svc.socket), 32, sample_paths(svc), max_seconds=120) as load:
            # the workers touch their pages under load: measure after some thousands of requests
            procs.wait_until(lambda: len(load.records) >= 3000, 30)
            print("$ hotswap status | grep memory\n" + memory_line(svc))
            for n in range(2, 5):
                master, *workers = svc.generation()
                room = memory.measure(master, workers, memory.DEFAULT_MARGIN_PERCENT)
                sums = {key: sum(memory.rollup(pid).get(key, 0) for pid in (master, *workers))
                        for key in ("Private_Clean", "Private_Dirty", "Pss", "Rss")}
                before = counter("memory.usage_in_bytes")
                (group.path / "memory.max_usage_in_bytes").write_text("0")
                svc.release(f"v{n}", terms=terms)
                done = svc.cli("reload")
                peak = counter("memory.max_usage_in_bytes")
                print(f"reload to v{n} (exit {done.returncode}): estimate {mib(room.needs)}, "
                      f"+{room.margin_percent:g}% = {mib(room.required)}; "
                      + ", ".join(f"sum {k} {mib(v)}" for k, v in sums.items())
                      + f"; swap took +{mib(peak - before)}")
            room = svc.squeeze()
            print(f"# limit {mib(room.limit)}\n$ hotswap status | grep memory\n"
                  + memory_line(svc))
            for args in ((), ("--force",)):
                kills = group.oom_kills()
                done = svc.cli("reload", *args)
                print(f"$ hotswap reload {' '.join(args)}\n{done.stdout}{done.stderr}"
                      f"exit={done.returncode}; oom_kill {kills} -> {group.oom_kills()}")
            group.limit(None)
            done = svc.cli("reload")
            print(f"limit lifted: exit {done.returncode}: {done.stdout.splitlines()[-1]}")
        print(summarize(load.records))
    finally:
        group.limit(None)
        svc.teardown()
        group.remove()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else test_memory.TERMS)
