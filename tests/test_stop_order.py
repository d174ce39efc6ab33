"""`hotswap stop`'s order, through the FakeHost: "p", the workers parked, then "q" (a bare
"q" resets a connection a worker has just accepted), and "q" whatever happens in between."""

from __future__ import annotations

import os
import signal

import pytest
from fakehost import OLD, FakeHost

from hotswap.service.instance import quit_paused
from hotswap.swap.host import Slot


def sent(host: FakeHost) -> list[tuple]:
    return [event for event in host.events if event[0] in ("send", "signal")]


def test_stop_pauses_the_workers_then_quits():
    host = FakeHost()
    seen = []

    def parked(master: int, mark: int) -> str:
        seen.append((master, host.paused))
        return "4/4"

    assert quit_paused(host, Slot.LIVE, OLD, parked) == "4/4"
    assert seen == [(OLD, True)]  # the wait ran with the workers paused
    assert sent(host) == [("send", "live", "p"), ("send", "live", "q")]


def test_a_sigint_between_pause_and_quit_waits_until_quit_is_sent():
    host = FakeHost()

    def parked(master: int, mark: int) -> str:
        os.kill(os.getpid(), signal.SIGINT)  # an operator's Ctrl-C mid-window: held back
        assert ("send", "live", "q") not in host.events
        return "4/4"

    # Python's own Ctrl-C: another test may have imported the CLI, whose early handler
    # only notes a SIGINT (hotswap/system/early.py)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            quit_paused(host, Slot.LIVE, OLD, parked)
    finally:
        signal.signal(signal.SIGINT, before)
    assert sent(host) == [("send", "live", "p"), ("send", "live", "q")]


def test_a_failed_wait_still_quits_the_paused_master():
    host = FakeHost()

    def parked(master: int, mark: int) -> str:
        raise OSError("the log is unreadable")

    with pytest.raises(OSError):
        quit_paused(host, Slot.LIVE, OLD, parked)
    assert sent(host)[-1] == ("send", "live", "q")


def test_a_master_no_fifo_reaches_is_terminated_not_paused():
    host = FakeHost()
    host.slot.clear()  # nobody reads the live FIFO
    assert quit_paused(host, Slot.LIVE, OLD, lambda master, mark: "never") is None
    assert sent(host) == [("signal", OLD, signal.SIGTERM)]
