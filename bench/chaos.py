"""`make chaos`: random faults at random moments, under load, and every failed request
attributed to the swap, the fault and the moment that lost it (issue 20).

    .venv/bin/python -m bench.chaos --swaps 300 --connections 64 --fault-fraction 0.5 --seed 1

N swaps of an isolated instance (bench/chaos_rig.py) under C closed-loop connections
(bench/loadgen.py in its own process). In about `--fault-fraction` of the swaps one fault,
drawn from chaos_rig.FAULTS, lands at a random moment. The draw is seeded: the same --seed
replays the same faults at the same moments. After each swap:

- some generation answers /healthz within chaos_rig.ANSWER_BOUND;
- the exit code is true to what serves: 0 -> the new release, 1 or 5 -> the old one;
- after a faulted swap, a plain `hotswap reload` exits 0 and serves the new release.

Every failed request is attributed to the swap whose window holds it (from the reload's start
to the end of its follow-up), with that swap's fault, the phase the CLI had printed when the
request failed, its time offset from the fault, and the client's error. A request in flight
in a process the fault itself killed (chaos_rig.KILLS_REQUESTS) is counted apart, as killed
by the fault; every other one is lost. The report ends with a table per fault class, and
--out gets chaos.json with every swap and every failed request.

Exit 0 when the targets hold (nothing lost, every follow-up reload 0, every exit code true,
always an answer), 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from bench.chaos_rig import FAULTS, FILL, KILLS_REQUESTS, STARTUP, Instance, Load, land

# The random moment of a fault is a seeded fraction of a span after its target appears: for
# the CLI and an old worker, of the last unfaulted reload's length from the reload's start
# (the machine's load sets it: a fixed span would miss the end of every swap, or most of
# them); for the new master, of its import (about a second) from its fork; for the hook,
# of its hand-over (milliseconds) from its first record; for a new worker, of a second
# from the commit.
MOMENT_SPAN = {"new master": 1.5, "hook": 0.05, "new worker": 1.0}
FIRST_SWAP_SECONDS = 3.0
SEGMENT_SECONDS = 300.0  # the load client is restarted between swaps past this (its cap: 900)
RELOAD_ARGS = ("--timeout", "60", "--drain", "30")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_BUDGET = 180.0
SIGKILLED_CLI = {"cli SIGKILL"}  # the one fault a CLI cannot answer: it dies of it


@dataclass(frozen=True)
class Planned:
    index: int
    fault: str | None
    moment: float  # 0..1, the fraction of the fault's span

    def delay(self, swap_seconds: float) -> float:
        if not self.fault:
            return 0.0
        return round(self.moment * MOMENT_SPAN.get(FAULTS[self.fault][0], swap_seconds), 4)


def draw(seed: int, swaps: int, fraction: float, faults: list[str] | None = None) -> list[Planned]:
    """The seeded plan: which swaps get a fault, which one, and its moment."""
    rng = random.Random(seed)
    names = sorted(faults or FAULTS)
    plan = []
    for index in range(1, swaps + 1):
        fault = rng.choice(names) if rng.random() < fraction else None
        plan.append(Planned(index, fault, round(rng.random(), 4)))
    return plan


@dataclass
class Swap:
    index: int
    fault: str | None
    version: str
    started: float
    ended: float = 0.0
    reload_ended: float = 0.0  # when the (faulted) reload exited; its follow-up came after
    code: int | None = None
    message: str = ""
    old_generation: str = ""
    serving: str = ""  # the generation that answered after the swap ("" none)
    landed: dict | None = None
    follow_code: int | None = None
    follow_message: str = ""
    problems: list[str] = field(default_factory=list)
    phases: list[tuple[float, str]] = field(default_factory=list)  # (time.time(), phase)


@dataclass(frozen=True)
class Failed:
    started: float
    latency: float
    outcome: str
    swap: int | None  # None: outside every swap's window
    fault: str | None
    phase: str
    offset: float | None  # seconds from the fault to the failure (negative: before it)
    killed_by_fault: bool


def attribute(records: list[dict], swaps: list[Swap]) -> list[Failed]:
    """Each failed request, with the swap, fault and moment that lost it."""
    failed = []
    ordered = sorted(swaps, key=lambda s: s.started)
    for record in records:
        if record["outcome"] == "ok":
            continue
        start, latency = record["started"], record["latency"]
        end = start + latency
        swap = next((s for s in ordered if s.started <= end and start <= s.ended), None)
        at = (swap.landed or {}).get("at") if swap else None
        # In flight when the fault's kill landed (a little slack for the kernel's delivery)
        killed = bool(swap and swap.fault in KILLS_REQUESTS and at is not None
                      and start <= at + 0.05 and at <= end + 0.05)
        failed.append(Failed(start, round(latency, 4), record["outcome"],
                             swap.index if swap else None, swap.fault if swap else None,
                             phase_at(swap, end) if swap else "", round(end - at, 4)
                             if at is not None else None, killed))
    return failed


def phase_at(swap: Swap, moment: float) -> str:
    """The phase the reload had printed by `moment` ("follow-up" once it had exited)."""
    if swap.reload_ended and moment > swap.reload_ended:
        return "follow-up"
    phase = "starting"
    for at, name in swap.phases:
        if at > moment:
            break
        phase = name
    return phase


def check(swap: Swap, new_generation_prefix: str) -> None:
    """Is the exit code true to what serves? Is there an answer? Did the follow-up work?"""
    if not swap.serving:
        swap.problems.append("no generation answered within the bound")
    elif swap.code == 0 and not swap.serving.startswith(new_generation_prefix):
        swap.problems.append(f"exit 0 but {swap.serving} serves")
    elif swap.code in (1, 5, 7) and swap.serving.startswith(new_generation_prefix):
        swap.problems.append(f"exit {swap.code} but the new release {swap.serving} serves")
    elif swap.code not in (0, 1, 5) and swap.code is not None and swap.code >= 0 and not (
            swap.code == 7 and swap.fault == "disk full"):  # refused: no room for the records
        swap.problems.append(f"exit {swap.code}: {swap.message}")
    in_startup = (swap.landed or {}).get("phase") == STARTUP
    if swap.code is not None and swap.code < 0 and swap.fault not in SIGKILLED_CLI:
        if not in_startup:
            swap.problems.append(f"the CLI died of its signal ({swap.code}) with no message")
        elif swap.serving != swap.old_generation:
            swap.problems.append("a CLI killed in its interpreter's start-up changed what "
                                 f"serves: {swap.old_generation} -> {swap.serving}")
    if swap.follow_code not in (None, 0):
        swap.problems.append(f"follow-up reload exit {swap.follow_code}: {swap.follow_message}")


class Soak:
    """Run the plan against one instance under load; every swap recorded."""

    def __init__(self, args: argparse.Namespace, plan: list[Planned]) -> None:
        self.args = args
        self.plan = plan
        self.instance = Instance(keep=args.keep, small_disk=any(
            FAULTS[p.fault][1] == FILL for p in plan if p.fault))
        self.swaps: list[Swap] = []
        self.records: list[dict] = []
        self.out = args.out or tempfile.mkdtemp(prefix="hotswap-chaos-out-")
        os.makedirs(self.out, exist_ok=True)
        self.swap_seconds = FIRST_SWAP_SECONDS  # the last unfaulted reload's length

    def run(self) -> None:
        began = time.time()
        load = None
        try:
            self.instance.start()
            load, since, segment = self._load(0), time.time(), 0
            for planned in self.plan:
                if self.args.minutes and time.time() - began > self.args.minutes * 60:
                    print(f"chaos: --minutes {self.args.minutes:g} spent: stopped before swap "
                          f"{planned.index}", flush=True)
                    break
                if time.time() - since > SEGMENT_SECONDS:
                    self.records.extend(load.stop())
                    segment += 1
                    load, since = self._load(segment), time.time()
                self.swaps.append(self.one(planned))
                say(self.swaps[-1])
                if not self.swaps[-1].serving:
                    print("chaos: nothing answers: stopped (every swap after an outage would "
                          "measure only the outage)", flush=True)
                    break
        finally:
            try:
                if load:
                    self.records.extend(load.stop())
            finally:  # the instance is stopped even if the load client failed
                self.instance.stop()

    def _load(self, segment: int) -> Load:
        path = os.path.join(self.out, f"load-{segment}.jsonl")
        return Load(str(self.instance.socket), self.args.connections,
                    self.instance.sample_paths(), path, SEGMENT_SECONDS + 580).start()

    def one(self, planned: Planned) -> Swap:
        instance = self.instance
        version = f"s{planned.index}"
        instance.release(version)
        before = instance.answers_within() or {}
        swap = Swap(planned.index, planned.fault, version, time.time(),
                    old_generation=before.get("generation", ""))
        cli = instance.reload(*RELOAD_ARGS)
        landed = land(planned.fault, planned.delay(self.swap_seconds), cli, instance,
                      before.get("master_pid", 0)) if planned.fault else None
        retry = None
        if landed and landed.at and planned.fault in SIGKILLED_CLI:
            # an operator's (or systemd's) retry at once, while the kernel still tears the
            # killed CLI down
            retry = instance.reload(*RELOAD_ARGS)
        run = cli.finish(CLI_BUDGET)
        swap.reload_ended = run.ended or time.time()
        if run.code == 0 and not (landed and landed.at):  # a reload no fault touched
            self.swap_seconds = swap.reload_ended - swap.started
        swap.code, swap.message = run.code, run.first_error or run.stdout.strip()[-300:]
        swap.phases = [(at, line.split("]", 1)[1].split()[0]) for at, line in cli.lines
                       if line.lstrip().startswith("[") and "]" in line]
        swap.landed = asdict(landed) if landed else None
        answer = instance.answers_within()
        swap.serving = (answer or {}).get("generation", "")
        instance.settle()  # the disk freed, the OOM trap lifted: the follow-up must work
        if planned.fault:
            follow = (retry or instance.reload(*RELOAD_ARGS)).finish(CLI_BUDGET)
            swap.follow_code = follow.code
            swap.follow_message = follow.first_error
            answer = instance.answers_within()
            if follow.code == 0 and not (answer or {}).get("generation", "").startswith(
                    f"{version}+"):
                swap.problems.append("follow-up reload exit 0 but the new release does "
                                     "not serve")
        swap.ended = time.time()
        check(swap, f"{version}+")
        return swap


def say(swap: Swap) -> None:
    fault = swap.fault or "-"
    landed = swap.landed or {}
    where = f" at {landed['phase']}" if landed.get("at") else (
        f" ({landed['note']})" if landed.get("note") else "")
    follow = f", follow-up {swap.follow_code}" if swap.follow_code is not None else ""
    problems = f"  PROBLEM: {'; '.join(swap.problems)}" if swap.problems else ""
    print(f"swap {swap.index:>4}  {fault:<19}{where:<16} exit {swap.code}{follow}  "
          f"{swap.ended - swap.started:5.1f}s{problems}", flush=True)


def summary(swaps: list[Swap], failed: list[Failed], requests: int) -> dict:
    classes: dict[str, dict] = {}
    for swap in swaps:
        row = classes.setdefault(swap.fault or "none", {
            "swaps": 0, "landed": 0, "exit_codes": collections.Counter(), "lost": 0,
            "in_startup": 0, "killed_by_fault": 0, "follow_up_refused": 0, "problems": 0})
        row["swaps"] += 1
        row["landed"] += bool((swap.landed or {}).get("at"))
        row["in_startup"] += (swap.landed or {}).get("phase") == STARTUP
        row["exit_codes"][str(swap.code)] += 1
        row["follow_up_refused"] += swap.follow_code not in (None, 0)
        row["problems"] += bool(swap.problems)
    outside = {"lost": 0, "killed_by_fault": 0}
    by_index = {swap.index: swap for swap in swaps}
    for item in failed:
        row = classes[by_index[item.swap].fault or "none"] if item.swap else outside
        row["killed_by_fault" if item.killed_by_fault else "lost"] += 1
    return {"requests": requests, "swaps": len(swaps),
            "faulted": sum(1 for s in swaps if s.fault),
            "lost": sum(1 for f in failed if not f.killed_by_fault),
            "killed_by_fault": sum(1 for f in failed if f.killed_by_fault),
            "follow_up_refused": sum(r["follow_up_refused"] for r in classes.values()),
            "swaps_with_problems": sum(1 for s in swaps if s.problems),
            "outside_swaps": outside, "classes": classes}


def table(result: dict) -> str:
    lines = [f"{'fault':<20} {'swaps':>5} {'landed':>6} {'startup':>7} {'lost':>5} "
             f"{'killed':>6} {'refused':>7} {'problems':>8}  exit codes"]
    for name, row in sorted(result["classes"].items()):
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(row["exit_codes"].items()))
        lines.append(f"{name:<20} {row['swaps']:>5} {row['landed']:>6} "
                     f"{row['in_startup']:>7} {row['lost']:>5} "
                     f"{row['killed_by_fault']:>6} {row['follow_up_refused']:>7} "
                     f"{row['problems']:>8}  {codes}")
    lines.append(f"{result['requests']:,} requests, {result['swaps']} swaps "
                 f"({result['faulted']} with a fault): {result['lost']} lost, "
                 f"{result['killed_by_fault']} killed by the fault itself, "
                 f"{result['follow_up_refused']} follow-up reloads refused, "
                 f"{result['swaps_with_problems']} swaps with a problem")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=300)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--fault-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1, help="the same seed replays the run")
    parser.add_argument("--faults", nargs="+", choices=sorted(FAULTS), metavar="FAULT",
                        help=f"draw only from these (default all: {', '.join(sorted(FAULTS))})")
    parser.add_argument("--minutes", type=float, help="start no swap past this many minutes "
                        "(a soak on a shared machine: report the swaps it could run)")
    parser.add_argument("--out", help="folder for chaos.json and the raw load records")
    parser.add_argument("--keep", action="store_true", help="keep the instance's folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # Started in the background by a non-interactive shell (`make chaos &`), SIGINT comes
    # ignored, and every child would inherit that: the load client could not be stopped, and
    # a "cli SIGINT" landing before the CLI's own handlers would be no fault at all.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args(argv)
    plan = draw(args.seed, args.swaps, args.fault_fraction, args.faults)
    soak = Soak(args, plan)
    print(f"chaos: {args.swaps} swaps, {args.connections} connections, faults in "
          f"~{args.fault_fraction:.0%}, seed {args.seed}; instance {soak.instance.root}",
          flush=True)
    soak.run()
    failed = attribute(soak.records, soak.swaps)
    result = summary(soak.swaps, failed, len(soak.records))
    for item in failed:
        offset = f"{item.offset:+.3f}s from the fault" if item.offset is not None else \
            "no fault landed"
        killed = " (killed by the fault)" if item.killed_by_fault else ""
        print(f"failed request: swap {item.swap} ({item.fault or 'no fault'}), phase "
              f"{item.phase or '-'}, {offset}: {item.outcome}{killed}")
    print(table(result))
    with open(os.path.join(soak.out, "chaos.json"), "w") as handle:
        json.dump({"args": vars(args), "summary": result,
                   "swaps": [asdict(s) for s in soak.swaps],
                   "failed": [asdict(f) for f in failed]}, handle, indent=1)
    print(f"chaos: wrote {os.path.join(soak.out, 'chaos.json')}")
    ok = not result["lost"] and not result["follow_up_refused"] and \
        not result["swaps_with_problems"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
