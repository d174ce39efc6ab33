"""Every transition of the reload machine, on a fake host (tests/fakehost.py): milliseconds
each. What each asserts is what the operator relies on: the exit code, the message, which
generation serves afterwards, and which FIFO commands were sent (never "p" or "0" to a master
told "q"; never a kill of a generation that committed)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from fakehost import GOOD_PLAN, NEW, OLD, FakeHost

from hotswap.errors import ExitCode, HotswapError
from hotswap.protocol.record import Handover, State
from hotswap.swap.host import Detached, Masters, Slot
from hotswap.swap.reload import PAUSE_STALL, Phase, Reload

# The good plan cut after a step: the hook stops there (SIGKILLed, SIGSTOPped, or slow).
UNTIL_NOTIFYING = GOOD_PLAN[:2]
UNTIL_PAUSED = GOOD_PLAN[:4]
UNTIL_COMMITTED = GOOD_PLAN[:5]


def run(host: FakeHost, timeout: float = 30.0, drain: float = 5.0, interrupt_at=None,
        signame: str = "SIGTERM"):
    """Run one reload; `interrupt_at` is a phase (the signal lands as it is entered) or a
    time (seconds on the fake clock)."""
    phases: list[str] = []
    machine: Reload

    def on_phase(phase: Phase, _at: float, _detail: str) -> None:
        phases.append(phase.value)
        if phase == interrupt_at:
            machine.interrupt(signame)

    machine = Reload(host, timeout, drain, on_phase)
    if isinstance(interrupt_at, float):
        host.at(interrupt_at, lambda: machine.interrupt(signame))
    return machine.run(), phases


def sent(host: FakeHost) -> list[tuple[str, str]]:
    return [(e[1], e[2]) for e in host.events if e[0] == "send"]


def after_quit(host: FakeHost) -> list[tuple]:
    """Everything done to the old master after it was told to quit."""
    quits = [i for i, e in enumerate(host.events) if e == ("quit", OLD)]
    return host.events[quits[0] + 1:] if quits else []


def assert_old_serves(host: FakeHost) -> None:
    assert host.serving() == OLD and host.holds(OLD, Slot.LIVE)
    assert NEW not in host.alive_pids


def assert_new_serves(host: FakeHost) -> None:
    assert host.serving() == NEW
    assert ("kill", (NEW,)) not in host.events
    assert not [e for e in after_quit(host) if e[0] == "send" and e[1] == "standby"], \
        "a command was sent to a master already told to quit"


def test_success_walks_every_phase_and_sends_only_1f():
    host = FakeHost()
    result, phases = run(host)
    assert result.ok and result.exit_code == 0
    assert list(dict.fromkeys(phases)) == ["preflight", "forking", "loading", "retiring",
                                           "verifying", "done"]
    assert result.message == "generation v1 (master 100) -> v2 (master 200)"
    assert sent(host) == [("live", "1f")]  # "p" and "q" are the hook's
    assert_new_serves(host)


def test_new_master_crash_while_loading_rolls_back_with_its_cause():
    host = FakeHost(plan=[])
    host.at(0.3, lambda: (host.kill_generations([NEW]),
                          setattr(host, "log", host.log + b"ImportError: release 42\n")))
    result, phases = run(host)
    assert result.exit_code == ExitCode.RELOAD_FAILED and result.rolled_back
    assert "new master 200 exited while loading" in result.message
    assert result.message.endswith(": ImportError: release 42")
    assert phases[-2:] == ["rolling-back", "failed"]
    assert ("standby", "0") in sent(host)
    assert_old_serves(host)


def test_hang_past_timeout_is_exit_5_and_killed():
    host = FakeHost(plan=[])
    result, _ = run(host, timeout=3.0)
    assert result.exit_code == ExitCode.TIMEOUT
    assert "not ready within --timeout 3s" in result.message
    assert ("kill", (NEW,)) in host.events
    assert_old_serves(host)


def test_a_hand_over_started_at_the_deadline_gets_its_grace():
    host = FakeHost(plan=[(2.9, State.STARTED), (5.0, State.NOTIFIED), (5.01, State.PAUSED),
                          (5.02, State.COMMITTED), (5.03, State.DONE)])
    result, _ = run(host, timeout=3.0)
    assert result.ok, result.message
    assert_new_serves(host)


PRE_COMMIT_STATES = [State.STARTED, State.NOTIFYING, State.NOTIFIED, State.PAUSED]


@pytest.mark.parametrize("last_state", PRE_COMMIT_STATES)
def test_new_master_killed_at_each_pre_commit_step(last_state: State):
    plan = GOOD_PLAN[:PRE_COMMIT_STATES.index(last_state) + 1]
    host = FakeHost(plan=plan)
    host.systemd = True
    host.at(1.0, lambda: host.kill_generations([NEW]))
    result, _ = run(host)
    assert result.exit_code == ExitCode.RELOAD_FAILED and result.rolled_back
    assert "exited while loading" in result.message
    assert_old_serves(host)
    assert host.paused is False, "old workers left paused"
    assert (("standby", "p") in sent(host)) == (last_state is State.PAUSED)


def test_systemd_is_told_the_old_main_pid_before_the_new_generation_dies():
    host = FakeHost(plan=UNTIL_PAUSED)  # notified, paused, then the hook stops
    host.systemd = True
    result, _ = run(host)
    assert result.exit_code == ExitCode.RELOAD_FAILED and "stalled" in result.message
    kinds = [e[0] for e in host.events]
    notify = kinds.index("notify", kinds.index("abort"))
    assert host.events[notify][1] == f"MAINPID={OLD}"
    assert kinds.index("freeze") < notify < kinds.index("kill"), \
        "systemd must know the old main pid before the kill"
    assert_old_serves(host)


def test_interrupt_while_systemd_is_being_told_the_new_main_pid():
    """NOTIFYING is recorded before the hook's MAINPID= goes out: the rollback freezes the new
    generation, restores the old main pid, then kills."""
    host = FakeHost(plan=UNTIL_NOTIFYING)
    host.systemd = True
    result, _ = run(host, interrupt_at=0.515)
    assert result.exit_code == ExitCode.RELOAD_FAILED and "interrupted" in result.message
    notifies = [e for e in host.events if e[0] == "notify"]
    assert notifies[0][1] == f"MAINPID={NEW}" and notifies[-1][1] == f"MAINPID={OLD}"
    kinds = [e[0] for e in host.events]
    assert kinds.index("freeze") < len(kinds) - 1 - kinds[::-1].index("notify") \
        < kinds.index("kill")
    assert_old_serves(host)


def test_a_rollback_killed_halfway_is_finished_by_the_next_reload():
    """The CLI died after aborting, before resuming the paused old workers: the record says
    what is owed, and the next reload's preflight pays it."""
    host = FakeHost()
    host._fork()
    host.timers.clear()
    host.paused = True
    host.record = Handover(master_pid=NEW, state=State.ABORTED, retiring_pid=OLD,
                           aborted_from=State.PAUSED)
    result, _ = run(host)
    assert result.ok, result.message
    assert ("standby", "p") in sent(host)
    assert host.serving() == host.new != NEW


def test_hook_dead_between_p_and_q_is_rolled_back_within_the_stall_budget():
    host = FakeHost(plan=UNTIL_PAUSED)  # PAUSED, then nothing: the hook is SIGSTOPped
    result, _ = run(host, timeout=300)
    assert result.exit_code == ExitCode.RELOAD_FAILED
    assert "stalled with the old workers paused" in result.message
    assert result.seconds < 0.6 + PAUSE_STALL + 1, "old workers paused far too long"
    assert host.paused is False and ("standby", "p") in sent(host)
    assert_old_serves(host)


def test_old_master_gone_mid_swap_still_ends_with_the_new_one():
    host = FakeHost(drain_seconds=0.0)
    result, _ = run(host)
    assert result.ok
    assert_new_serves(host)


def test_drain_past_its_budget_succeeds_with_a_warning():
    host = FakeHost(drain_seconds=50.0)
    result, _ = run(host, drain=1.0)
    assert result.ok
    assert any("still draining after --drain 1s" in w for w in result.warnings)
    assert_new_serves(host)


def test_a_committed_hook_that_could_not_write_q_is_finished_by_the_cli():
    host = FakeHost(plan=UNTIL_COMMITTED)  # COMMITTED, then the hook's "q" failed
    host.q_fails = True
    result, _ = run(host)
    assert result.ok, result.message
    assert sent(host)[-1] == ("standby", "q")
    assert_new_serves(host)


def test_a_hook_that_aborts_itself_is_rolled_back_with_its_reason():
    host = FakeHost(plan=[(0.5, State.STARTED)])
    host.at(0.6, lambda: setattr(host, "record", host.record.to(
        State.ABORTED, error="systemd did not confirm MAINPID=200")))
    result, _ = run(host)
    assert result.exit_code == ExitCode.RELOAD_FAILED
    assert "systemd did not confirm MAINPID=200" in result.message
    assert_old_serves(host)


PRE_COMMIT = [Phase.PREFLIGHT, Phase.FORKING, Phase.LOADING]
POST_COMMIT = [Phase.RETIRING, Phase.VERIFYING]


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", PRE_COMMIT + POST_COMMIT)
def test_interrupt_at_every_phase(phase: Phase, signame: str):
    host = FakeHost(drain_seconds=1.0)
    result, _ = run(host, interrupt_at=phase, signame=signame)
    assert result.interrupted == signame
    if phase in PRE_COMMIT:
        assert result.exit_code == ExitCode.RELOAD_FAILED
        assert f"interrupted by {signame}" in result.message
        assert_old_serves(host)
        assert not host.paused
    else:
        assert result.ok, result.message
        assert_new_serves(host)
    assert not [e for e in after_quit(host) if e[0] in ("send", "kill")]


def test_interrupt_while_the_old_workers_are_paused_resumes_them():
    host = FakeHost(plan=UNTIL_PAUSED)  # paused at 0.53 s; the commit never comes
    result, _ = run(host, interrupt_at=0.8)
    assert result.exit_code == ExitCode.RELOAD_FAILED and "interrupted" in result.message
    assert host.paused is False
    assert_old_serves(host)


def test_interrupt_racing_the_commit_rolls_forward():
    """The signal lands; before the machine takes the record lock, the hook commits."""
    host = FakeHost()
    real_abort = host.abort

    def abort_after_commit(master, error):
        while host.record.state is not State.DONE:  # the hook wins the lock first
            host.sleep(0.01)
        return real_abort(master, error)

    host.abort = abort_after_commit
    result, _ = run(host, interrupt_at=0.54)
    assert result.ok, result.message
    assert any("already committed" in w for w in result.warnings)
    assert_new_serves(host)


def test_interrupt_during_the_rollback_does_not_stop_it():
    host = FakeHost(plan=[])
    host.at(0.3, lambda: host.kill_generations([NEW]))
    result, _ = run(host, interrupt_at=Phase.ROLLING_BACK)
    assert result.exit_code == ExitCode.RELOAD_FAILED and result.rolled_back
    assert_old_serves(host)


def test_preflight_repairs_what_a_killed_reload_left():
    host = FakeHost()
    host._fork()  # a "1f" whose reload was SIGKILLed: 200 loading, 100 parked
    host.timers.clear()  # ... and whose release hangs
    host.record = Handover(master_pid=NEW, state=State.STARTED, retiring_pid=OLD)
    host.at(0.0, lambda: None)
    repaired: list[str] = []
    machine = Reload(host, 30.0, 5.0, lambda p, _a, d: repaired.append(d))
    result = machine.run()
    assert any("rolled back master 200" in d for d in repaired), repaired
    assert result.ok, result.message  # then the reload itself went through
    assert host.serving() == host.new != NEW


def test_preflight_refuses_while_the_old_master_still_drains():
    host = FakeHost()
    host.slot[300] = Slot.LIVE
    host.alive_pids.add(300)
    host.slot[OLD] = Slot.STANDBY
    host.record = Handover(master_pid=300, state=State.DONE, retiring_pid=OLD)
    host.masters = lambda: Masters(live=300, parked=OLD)
    with pytest.raises(HotswapError) as refused:
        Reload(host, 30.0, 5.0).run()
    assert refused.value.code == ExitCode.BUSY and "still draining" in refused.value.message
    assert sent(host) == []


def test_preflight_waits_for_the_last_swaps_old_master_to_drain_then_swaps():
    """Found by the chaos soak: a reload right after an interrupted one was refused (exit 4)
    while the old master of the last swap still drained; it now waits within its budget."""
    host = FakeHost()
    host.slot[90] = Slot.STANDBY  # the generation before OLD, retiring
    host.alive_pids.add(90)
    host.record = Handover(master_pid=OLD, state=State.DONE, retiring_pid=90)
    host.at(2.0, lambda: host._exit(90))
    result, _ = run(host, drain=5.0)
    assert result.ok, result.message
    details = [p["detail"] for p in result.phases]
    assert any("waiting for old master 90 to drain" in d for d in details), details
    assert "old master 90 drained and exited" in details
    assert host.t >= 2.0
    assert_new_serves(host)


def test_an_interrupt_while_waiting_for_a_drain_changes_nothing():
    host = FakeHost()
    host.slot[90] = Slot.STANDBY
    host.alive_pids.add(90)
    host.record = Handover(master_pid=OLD, state=State.DONE, retiring_pid=90)
    machine = Reload(host, 30.0, 5.0)
    host.at(1.0, lambda: machine.interrupt("SIGTERM"))
    result = machine.run()
    assert result.exit_code == ExitCode.RELOAD_FAILED
    assert result.message == "interrupted by SIGTERM before anything changed"
    assert sent(host) == []


def test_a_stopped_master_is_refused_before_its_fifo_is_written():
    host = FakeHost()
    host.stopped_pids.add(OLD)
    with pytest.raises(HotswapError) as refused:
        Reload(host, 30.0, 5.0).run()
    assert refused.value.code == ExitCode.INCONSISTENT
    assert refused.value.message.startswith(f"master {OLD} is stopped (state T")
    assert f"`kill -CONT {OLD}`" in refused.value.message
    assert sent(host) == [] and host.events == []


def test_no_master_is_not_running():
    host = FakeHost()
    host.alive_pids.clear()
    with pytest.raises(HotswapError) as refused:
        Reload(host, 30.0, 5.0).run()
    assert refused.value.code == ExitCode.NOT_RUNNING


def test_signal_numbers_are_named():
    assert signal.Signals(signal.SIGTERM).name == "SIGTERM"


# -- preflight refusals and repairs (issue 14) --------------------------------------------
def test_a_fifo_removed_under_its_master_is_recreated_before_the_swap():
    host = FakeHost()
    host.lost = [Detached(Slot.LIVE, OLD, 16, Path("run/0.fifo"))]
    result, _ = run(host)
    assert result.ok, result.message
    assert host.events.index(("reattach", "live", OLD)) < host.events.index(
        ("send", "live", "1f"))
    assert any("re-created run/0.fifo" in p["detail"] for p in result.phases)


def test_a_fifo_that_cannot_be_recreated_refuses_with_the_way_out():
    host = FakeHost()
    host.lost = [Detached(Slot.LIVE, OLD, 16, Path("run/0.fifo"))]
    host.reattach_error = IsADirectoryError(21, "Is a directory")
    with pytest.raises(HotswapError) as refused:
        Reload(host, 30.0, 5.0).run()
    assert refused.value.code == ExitCode.INCONSISTENT
    assert f"kill -TERM {OLD}" in refused.value.message and "Is a directory" in \
        refused.value.message
    assert sent(host) == []


def test_a_config_change_a_refork_cannot_apply_is_refused_before_forking():
    host = FakeHost()
    host.drift = ["http-socket changed in the ini (a -> b): restart to apply it"]
    with pytest.raises(HotswapError) as refused:
        Reload(host, 30.0, 5.0).run()
    assert refused.value.code == ExitCode.CONFIG and "http-socket" in refused.value.message
    assert sent(host) == [] and host.serving() == OLD


@pytest.mark.parametrize("force", [False, True])
def test_a_silent_serving_generation_is_refused_unless_forced(force: bool):
    host = FakeHost()
    answers = host.healthz
    host.healthz = lambda timeout: None if host.new == NEW and NEW not in host.alive_pids \
        else answers(timeout)
    if not force:
        with pytest.raises(HotswapError) as refused:
            Reload(host, 30.0, 5.0).run()
        assert refused.value.code == ExitCode.INCONSISTENT
        assert "--force" in refused.value.message and sent(host) == []
        return
    result = Reload(host, 30.0, 5.0, force=True).run()
    assert result.ok and result.old_generation is None and host.serving() == NEW


def test_a_rollback_to_an_old_generation_busy_with_long_requests_is_not_inconsistent():
    host = FakeHost(plan=[])
    host.at(0.3, lambda: host.kill_generations([NEW]))
    answers = host.healthz
    host.healthz = lambda timeout: answers(timeout) if host.t < 0.2 else None
    host.stats = lambda: {"pid": OLD, "workers": [{"pid": w, "status": "busy"}
                                                  for w in [101, 102, 103, 104]]}
    result, _ = run(host)
    assert result.exit_code == ExitCode.RELOAD_FAILED and result.rolled_back
    assert any("4/4 workers busy" in w for w in result.warnings), result.warnings


# -- memory (docs/memory.md) ------------------------------------------------------------------
MIB = 1024 * 1024


def test_a_second_generation_that_does_not_fit_is_refused_before_anything_changes():
    host = FakeHost()
    host.generation_bytes, host.available_bytes = 300 * MIB, 200 * MIB
    with pytest.raises(HotswapError) as refused:
        Reload(host, 30.0, 5.0).run()
    assert refused.value.code == ExitCode.NO_ROOM == 7
    message = refused.value.message
    assert "needs ~390 MiB" in message and "200 MiB available" in message, message
    assert "master 100 keeps serving" in message and "--force" in message
    assert sent(host) == [] and host.forks == 0
    assert host.serving() == OLD


def test_the_margin_decides_at_the_edge():
    hosts = [FakeHost(), FakeHost()]
    for host in hosts:
        host.generation_bytes, host.available_bytes = 100 * MIB, 115 * MIB
    with pytest.raises(HotswapError):
        Reload(hosts[0], 30.0, 5.0, memory_margin=20.0).run()
    result = Reload(hosts[1], 30.0, 5.0, memory_margin=10.0).run()
    assert result.ok, result.message


def test_force_measures_but_does_not_refuse():
    host = FakeHost()
    host.generation_bytes, host.available_bytes = 300 * MIB, 200 * MIB
    details: list[str] = []
    result = Reload(host, 30.0, 5.0, lambda _p, _a, d: details.append(d), force=True).run()
    assert result.ok, result.message
    assert any("not checked (--force)" in d for d in details), details


def test_unknown_figures_never_refuse():
    host = FakeHost()
    host.generation_bytes = host.available_bytes = None
    assert Reload(host, 30.0, 5.0).run().ok


def test_new_master_killed_by_the_oom_killer_is_a_rolled_back_reload():
    host = FakeHost(plan=[])
    host.at(0.3, lambda: host.oom_kill(NEW))
    result = Reload(host, 30.0, 5.0, force=True).run()
    assert result.exit_code == ExitCode.RELOAD_FAILED and result.rolled_back
    assert result.message.startswith(
        "new master 200 was killed by the kernel's OOM killer while loading"), result.message
    assert_old_serves(host)


def test_an_oom_kill_in_the_new_generation_with_its_master_alive_rolls_back():
    host = FakeHost(plan=[])
    host.at(0.3, lambda: host.oom_kill(NEW + 1))  # one of its workers
    result = Reload(host, 30.0, 5.0).run()
    assert result.exit_code == ExitCode.RELOAD_FAILED and result.rolled_back
    assert "OOM killer killed a process of the new generation (master 200)" in result.message
    assert ("kill", (NEW,)) in host.events
    assert_old_serves(host)


def test_an_oom_killed_worker_is_named_from_the_uwsgi_log():
    host = FakeHost(plan=[])

    def kill_worker() -> None:
        host.oom_kill(NEW + 2)
        host.log += (b"Thu Nov 26 14:00:00 2026 - DAMN ! worker 2 (pid: 202) died, killed by "
                     b"signal 9 :( trying respawn ...\n")

    host.at(0.3, kill_worker)
    result = Reload(host, 30.0, 5.0).run()
    assert result.message.startswith("worker 202 of new master 200 was killed by the kernel's "
                                     "OOM killer while loading"), result.message
    assert_old_serves(host)


def test_a_crash_without_an_oom_kill_keeps_its_own_message():
    host = FakeHost(plan=[])
    host.at(0.3, lambda: host.kill_generations([NEW]))
    result = Reload(host, 30.0, 5.0).run()
    assert result.message.startswith("new master 200 exited while loading"), result.message


def test_without_a_cgroup_only_a_dead_new_master_is_blamed_on_the_oom_killer():
    """The machine-wide counter (/proc/vmstat) also counts kills far from this service."""
    elsewhere = FakeHost()
    elsewhere.cgroup = None
    elsewhere.at(0.3, lambda: elsewhere.oom_kill(999))
    assert Reload(elsewhere, 30.0, 5.0).run().ok
    ours = FakeHost(plan=[])
    ours.cgroup = None
    ours.at(0.3, lambda: ours.oom_kill(NEW))
    result = Reload(ours, 30.0, 5.0).run()
    assert "new master 200 was killed by the kernel's OOM killer" in result.message


def test_a_release_still_loading_at_half_its_timeout_gets_the_services_priority_back():
    """It loads at a low priority; past half of --timeout it must not lose the deadline to
    that, so the machine restores the service's own (once) and says so in the timeline."""
    host = FakeHost(plan=[(at + 3.5, state) for at, state in GOOD_PLAN])
    details: list[str] = []
    machine = Reload(host, 6.0, 5.0, lambda _p, _at, detail: details.append(detail))
    result = machine.run()
    assert result.ok, result.message
    assert host.events.count(("priority", NEW)) == 1
    [line] = [d for d in details if "half of --timeout" in d]
    assert f"master {NEW}" in line, line
    quick = FakeHost()
    assert run(quick, timeout=30.0)[0].ok and ("priority", NEW) not in quick.events


def test_a_worker_respawned_during_the_pause_does_not_keep_the_old_master_draining():
    """Found by the every-class chaos soak (swap 122): an old worker SIGKILLed at "p" was
    respawned parked, the quit never reached it, the old master drained forever and every
    later reload exited 4. The drain now kills such a worker (born after the pause, parked:
    it accepted nothing) and the old master exits within --drain."""
    host = FakeHost()
    host.at(0.549, lambda: host.respawn(105, parked=True))  # after "p" (0.53), about "q"
    result, _ = run(host, drain=10.0)
    assert result.ok, result.message
    assert ("signal", 105, signal.SIGKILL) in host.events
    assert any("worker 105 was respawned during the hand-over's pause" in w
               for w in result.warnings), result.warnings
    assert not any("still draining" in w for w in result.warnings), result.warnings
    assert not host.alive(OLD)
    assert_new_serves(host)


def test_a_worker_not_named_stranded_is_never_killed_by_the_drain():
    """The other side: a worker that may hold a request (not suspended: here, in one) is
    left to uWSGI's own graceful quit, however long the drain (here: it outlasts --drain)."""
    host = FakeHost()
    host.at(0.549, lambda: host.respawn(105, parked=False))
    result, _ = run(host, drain=5.0)
    assert result.ok, result.message
    assert not any(e[:2] == ("signal", 105) for e in host.events), host.events
    assert any("still draining after --drain 5s" in w for w in result.warnings)


def test_the_next_reload_frees_a_stranded_worker_of_the_last_swaps_old_master():
    """A reload whose CLI was killed after the commit left the old master stuck on such a
    worker: the next reload's preflight frees it and swaps, instead of exiting 4."""
    host = FakeHost()
    host.slot[90] = Slot.STANDBY  # the generation before OLD, retiring
    host.alive_pids.add(90)
    host.record = Handover(master_pid=OLD, state=State.DONE, retiring_pid=90, paused_at=-5.0)
    host.t = -1.0
    host.respawn(91, parked=True, master=90)  # born after that pause, parked for good
    host.t = 0.0
    host.at(0.1, lambda: host._exit(90))  # it was told "q": it exits once 91 is gone
    result, _ = run(host, drain=10.0)
    assert result.ok, result.message
    assert ("signal", 91, signal.SIGKILL) in host.events
    details = [p["detail"] for p in result.phases]
    assert "old master 90 drained and exited" in details, details
    assert any("worker 91 was respawned" in w for w in result.warnings), result.warnings
    assert_new_serves(host)


def test_a_full_run_dir_is_refused_before_anything_changes():
    """Found by the chaos soak: a run dir filled before the fork made the reload wait out
    its whole --timeout (exit 5), since no hook can record a hand-over there."""
    host = FakeHost()
    host.run_dir_free = 0
    with pytest.raises(HotswapError) as refused:
        Reload(host, 30.0, 5.0).run()
    assert refused.value.code == ExitCode.NO_ROOM
    assert refused.value.message.startswith("the run dir /fake/run is full (0 bytes free)")
    assert f"master {OLD} keeps serving" in refused.value.message
    assert sent(host) == []


def test_a_run_dir_that_fills_while_loading_rolls_back_within_seconds():
    host = FakeHost(plan=[])  # the hook never records anything: the disk is full
    host.at(0.2, lambda: setattr(host, "run_dir_free", 100))
    result, _ = run(host, timeout=60.0)
    assert result.exit_code == ExitCode.RELOAD_FAILED and result.rolled_back
    assert result.message.startswith("the run dir /fake/run is full (100 bytes free): new "
                                     f"master {NEW} cannot record its hand-over")
    assert host.t < 10.0  # not the whole --timeout
    assert host.serving() == OLD


def test_a_run_dir_full_for_a_moment_does_not_fail_the_swap():
    host = FakeHost()
    host.at(0.1, lambda: setattr(host, "run_dir_free", 0))
    host.at(0.3, lambda: setattr(host, "run_dir_free", 10**9))
    result, _ = run(host)
    assert result.ok, result.message
    assert_new_serves(host)
