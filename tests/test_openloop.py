"""The open-loop scheduler of bench/loadgen.py, on an injected clock (no sleeping)."""

from __future__ import annotations

from bench.loadgen import OpenLoopGenerator, Record


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_due_on_the_clock_and_dropped_when_the_pool_is_full() -> None:
    clock = Clock()
    sent = []

    def send(target, path, timeout):
        sent.append(path)
        clock.now += 0.5  # the answer takes half a second of the fake clock
        return Record(0.0, 0.5, "ok", 7, "g1")

    gen = OpenLoopGenerator("sock", rate=10, in_flight=2, clock=clock, send=send)
    clock.now += 0.35  # requests 0..3 are due (0, 0.1, 0.2, 0.3)
    assert gen.dispatch_due(clock.now) == 4
    assert [i for i, _ in gen.queue] == [0, 1]
    assert [r.outcome for r in gen.records] == ["dropped", "dropped"]
    index, due = gen.queue.pop(0)
    record = gen.serve(index, due)
    assert record.latency == 100.35 + 0.5 - due  # from the scheduled start, not the send
    assert gen.idle == 1 and sent == ["/healthz"]
