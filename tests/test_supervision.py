"""The slot state machine (pacsys/pool/supervision.py) with a hand-driven clock: no processes, no loop."""

import pytest

from pacsys.pool.supervision import (
    EndReason,
    Exit,
    Kill,
    Retire,
    Slot,
    SlotState,
    Spawn,
    SpawnReplacement,
    Wait,
)
from pacsys.settings import Settings

POLICY = Settings(
    restart_backoff_initial=0.1,
    restart_backoff_max=5.0,
    restart_stable_uptime=1.0,
    restart_intensity=3,
    restart_period=60.0,
    restart_cooldown_initial=10.0,
    restart_cooldown_max=40.0,
)
CRASH = Exit(EndReason.SIGNAL, "SIGKILL")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def make(others_serving=True, policy=POLICY):
    clock = Clock()
    slot = Slot(0, policy, clock=clock, others_serving=lambda s: others_serving)
    return slot, clock


def serve(slot, clock, seconds=0.0):
    """Start a fresh slot's worker, make it ready and let it serve `seconds`."""
    (spawn,) = slot.start()
    assert slot.ready(spawn.generation) == []
    clock.advance(seconds)
    return spawn.generation


def restart(slot, actions):
    """Fire the timer of the single Wait in `actions`; returns the new generation."""
    (wait,) = actions
    assert isinstance(wait, Wait)
    (spawn,) = slot.timer_fired(wait.token)
    assert isinstance(spawn, Spawn)
    return spawn.generation


def test_first_start_and_ready():
    slot, clock = make()
    (spawn,) = slot.start()
    assert spawn == Spawn(1) and slot.state is SlotState.STARTING and not slot.serving
    assert slot.ready(1) == [] and slot.state is SlotState.READY and slot.serving


def test_a_worker_that_served_comes_back_after_the_initial_backoff_whatever_came_before():
    slot, clock = make()
    gen = serve(slot, clock, 0.2)
    for _ in range(2):  # two early deaths grow the backoff
        actions = slot.exited(gen, CRASH)
        gen = restart(slot, actions)
        slot.ready(gen)
        clock.advance(0.2)
    assert slot.backoff == pytest.approx(0.4)
    clock.advance(5.0)  # then it serves for a while
    (wait,) = slot.exited(gen, CRASH)
    assert wait.delay == pytest.approx(0.1) and slot.state is SlotState.RESTARTING
    assert slot.backoff == pytest.approx(0.1) and len(slot.early_exits) == 0


def test_early_exits_double_the_backoff_up_to_its_cap():
    slot, clock = make(
        policy=POLICY.replace(restart_intensity=100, restart_backoff_initial=0.1, restart_backoff_max=0.5)
    )
    (spawn,) = slot.start()
    gen, delays = spawn.generation, []
    for _ in range(5):
        (wait,) = slot.exited(gen, Exit(EndReason.STARTUP_FAILED))  # never ready
        delays.append(wait.delay)
        clock.advance(wait.delay)
        gen = restart(slot, [wait])
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_too_many_early_exits_cool_the_slot_down_and_repeated_exhaustion_doubles_it_to_a_cap():
    slot, clock = make()
    (spawn,) = slot.start()
    gen, cooldowns = spawn.generation, []
    while len(cooldowns) < 4:
        (wait,) = slot.exited(gen, Exit(EndReason.STARTUP_FAILED))
        if slot.state is SlotState.COOLING:
            cooldowns.append(wait.delay)
            assert slot.restart_budget_left() == POLICY.restart_intensity  # the history starts over
        clock.advance(wait.delay)
        gen = restart(slot, [wait])
    assert cooldowns == [10.0, 20.0, 40.0, 40.0]
    assert slot.cooldowns == 4


def test_the_fourth_early_exit_within_the_period_cools_not_the_third():
    slot, clock = make()
    gen = serve(slot, clock)
    states = []
    for _ in range(4):
        actions = slot.exited(gen, CRASH)
        states.append(slot.state)
        gen = restart(slot, actions)
        slot.ready(gen)
    assert states == [SlotState.RESTARTING] * 3 + [SlotState.COOLING]


def test_early_exits_older_than_the_period_are_forgotten():
    slot, clock = make()
    gen = serve(slot, clock)
    for _ in range(3):
        gen = restart(slot, slot.exited(gen, CRASH))
        slot.ready(gen)
        clock.advance(0.5)
    clock.advance(61)  # ... but that was long ago: served 61 s, a crash, not a loop
    slot.exited(gen, CRASH)
    assert slot.state is SlotState.RESTARTING


def test_the_last_slot_standing_never_cools_it_keeps_restarting_at_the_capped_backoff():
    slot, clock = make(others_serving=False)
    (spawn,) = slot.start()
    gen = spawn.generation
    for _ in range(20):
        actions = slot.exited(gen, Exit(EndReason.EXIT, "1"))
        assert slot.state is SlotState.RESTARTING
        gen = restart(slot, actions)
    assert actions[0].delay == POLICY.restart_backoff_max and slot.cooldowns == 0


def test_a_worker_that_stays_up_after_a_cooldown_returns_the_slot_to_normal():
    slot, clock = make()
    (spawn,) = slot.start()
    gen = spawn.generation
    while slot.state is not SlotState.COOLING:
        actions = slot.exited(gen, Exit(EndReason.STARTUP_FAILED))
        if slot.state is not SlotState.COOLING:
            gen = restart(slot, actions)
    clock.advance(10)
    gen = restart(slot, actions)
    slot.ready(gen)
    clock.advance(2.0)  # past stable_uptime
    (wait,) = slot.exited(gen, CRASH)
    assert slot.state is SlotState.RESTARTING and wait.delay == POLICY.restart_backoff_initial
    assert slot.cooldown == POLICY.restart_cooldown_initial and slot.backoff == POLICY.restart_backoff_initial


def test_an_exit_reported_twice_counts_once():
    """The race: a restart failed (startup_failed) and the same process's exit is reaped after."""
    slot, clock = make()
    gen = serve(slot, clock, 5.0)
    gen = restart(slot, slot.exited(gen, CRASH))
    first = slot.exited(gen, Exit(EndReason.STARTUP_FAILED))
    assert len(first) == 1 and len(slot.early_exits) == 1
    assert slot.exited(gen, Exit(EndReason.EXIT, "1")) == []  # the reap of the same worker
    assert len(slot.early_exits) == 1 and slot.state is SlotState.RESTARTING
    assert slot.last_exit == Exit(EndReason.STARTUP_FAILED)


def test_a_late_exit_of_a_replaced_worker_is_ignored():
    slot, clock = make()
    old = serve(slot, clock, 5.0)
    actions = slot.exited(old, CRASH)
    new = restart(slot, actions)
    slot.ready(new)
    assert slot.exited(old, CRASH) == []
    assert slot.state is SlotState.READY and slot.generation == new


def test_a_timer_of_a_retired_slot_starts_nothing():
    slot, clock = make()
    gen = serve(slot, clock, 5.0)
    (wait,) = slot.exited(gen, CRASH)
    slot.retire()
    assert slot.timer_fired(wait.token) == [] and slot.state is SlotState.RETIRED
    assert slot.exited(gen, CRASH) == []
    (spawn,) = slot.revive()
    assert spawn.generation > gen and slot.state is SlotState.STARTING


def test_a_missed_pong_kills_a_serving_worker_only():
    slot, clock = make()
    (spawn,) = slot.start()
    assert slot.pong_missed(spawn.generation) == []  # starting: the ready timeout covers it
    slot.ready(spawn.generation)
    assert slot.pong_missed(spawn.generation) == [Kill(spawn.generation, EndReason.HANG)]
    assert slot.pong_missed(spawn.generation + 1) == []


def test_recycling_is_make_before_break_and_costs_no_restart_budget():
    slot, clock = make()
    old = serve(slot, clock, 5.0)
    (replace,) = slot.over_limit(old, EndReason.RECYCLE_RSS)
    assert isinstance(replace, SpawnReplacement) and slot.state is SlotState.RECYCLING and slot.serving
    assert slot.over_limit(old, EndReason.RECYCLE_RSS) == []  # one replacement at a time
    assert slot.ready(replace.generation) == [Retire(old)]
    assert slot.state is SlotState.READY and slot.generation == replace.generation
    assert slot.exited(old, Exit(EndReason.EXIT, "0")) == []  # the retired worker stops later
    assert slot.restart_budget_left() == POLICY.restart_intensity


def test_a_replacement_that_fails_leaves_the_old_worker_serving():
    slot, clock = make()
    old = serve(slot, clock, 5.0)
    (replace,) = slot.over_limit(old, EndReason.RECYCLE_REQUESTS)
    assert slot.replacement_failed(replace.generation) == [Kill(replace.generation, EndReason.RECYCLE_FAILED)]
    assert slot.state is SlotState.READY and slot.generation == old
    (replace,) = slot.over_limit(old, EndReason.RECYCLE_REQUESTS)
    assert slot.exited(replace.generation, CRASH) == []  # died while starting: nothing counted
    assert slot.state is SlotState.READY and len(slot.early_exits) == 0


def test_the_serving_worker_dying_during_a_recycle_cancels_the_replacement():
    slot, clock = make()
    old = serve(slot, clock, 5.0)
    (replace,) = slot.over_limit(old, EndReason.RECYCLE_RSS)
    kill, wait = slot.exited(old, CRASH)
    assert kill == Kill(replace.generation, EndReason.RECYCLE_CANCELLED) and isinstance(wait, Wait)
    assert slot.state is SlotState.RESTARTING
    assert slot.ready(replace.generation) == [] and slot.state is SlotState.RESTARTING


def test_restart_to_ready_is_measured_from_the_death():
    slot, clock = make()
    gen = serve(slot, clock, 5.0)
    actions = slot.exited(gen, CRASH)
    clock.advance(0.1)
    gen = restart(slot, actions)
    clock.advance(0.5)
    slot.ready(gen)
    assert slot.last_restart_to_ready == pytest.approx(0.6)
    assert slot.restarts == 1


def test_one_vocabulary_of_endings_whose_words_are_the_logs_and_metrics_labels():
    # A StrEnum: the reason is its word wherever a string is (log lines, labels, JSON, counters).
    assert f"{EndReason.HANG}" == "hang" and EndReason("startup_failed") is EndReason.STARTUP_FAILED
    counts = {EndReason.SIGNAL: 2}
    assert counts["signal"] == 2
    exits = [r.value for r in EndReason if r.is_exit]
    assert exits == ["signal", "exit", "hang", "protocol_error", "startup_failed", "spawn_failed", "ready_timeout"]
    assert [r.value for r in EndReason if r.is_recycle] == ["recycle_rss", "recycle_requests"]
    stopped = {r for r in EndReason if r.stopped_by_front}
    assert stopped == {
        EndReason.RECYCLED,
        EndReason.SCALE_DOWN,
        EndReason.SHUTDOWN,
        EndReason.RECYCLE_FAILED,
        EndReason.RECYCLE_CANCELLED,
    }
