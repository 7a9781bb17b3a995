"""Wake-ups in millisecond buckets (online/timers.py): never early, in order, bounded."""
from __future__ import annotations

import random

from tcpcopyd.online.timers import Timers


def test_a_wake_up_never_fires_before_its_time_even_within_its_millisecond():
    t: Timers[str] = Timers()
    t.add(10.0004, "early")
    t.add(10.0008, "late")
    assert t.next() == 10.0004
    assert t.due(10.0003, 100) == []
    assert t.due(10.0005, 100) == ["early"]
    assert t.next() == 10.0008 and len(t) == 1
    assert t.due(10.0008, 100) == ["late"]
    assert t.next() is None and len(t) == 0


def test_wake_ups_fire_by_millisecond_then_in_the_order_they_were_set():
    t: Timers[str] = Timers()
    for when, name in ((3.0, "c"), (1.0, "a1"), (2.0, "b"), (1.0002, "a2")):
        t.add(when, name)
    assert t.due(5.0, 100) == ["a1", "a2", "b", "c"]


def test_a_tick_takes_at_most_its_budget_and_the_rest_stays():
    t: Timers[int] = Timers()
    for i in range(10):
        t.add(1.0 + i * 0.0001, i)      # all in one millisecond
    t.add(2.0, 10)
    assert t.due(3.0, 4) == [0, 1, 2, 3]
    assert t.due(3.0, 4) == [4, 5, 6, 7]
    assert t.due(3.0, 4) == [8, 9, 10]
    assert len(t) == 0


def test_against_a_sorted_list_of_random_wake_ups():
    rng = random.Random(5)
    t: Timers[int] = Timers()
    pending: list[tuple[float, int]] = []
    now = 0.0
    lowest = float("inf")
    for i in range(20000):
        when = now + rng.choice((0.0, 0.0001, 0.04, 0.2, 1.0, 5.0)) * rng.random()
        t.add(when, i)
        pending.append((when, i))
        lowest = min(lowest, when)
        if i % 3 == 0:
            assert t.next() == lowest          # the earliest is kept as wake-ups come
        if i % 7 == 0:
            now += rng.random() * 0.003
            fired = t.due(now, 10_000)
            expected = {j for w, j in pending if w <= now}
            assert set(fired) == expected
            pending = [(w, j) for w, j in pending if w > now]
            assert len(t) == len(pending)
            assert t.next() == (min(w for w, _ in pending) if pending else None)
            lowest = min((w for w, _ in pending), default=float("inf"))


def test_wake_ups_beyond_the_ring_and_before_the_first_tick_fire_in_time_and_never_early():
    t: Timers[str] = Timers()
    t.add(100.0, "before the first tick")
    t.add(99.5, "sooner, set later")
    assert t.next() == 99.5 and t.due(99.4999, 100) == []
    assert t.due(99.5, 100) == ["sooner, set later"]
    # far beyond the ring's reach from the cursor, then within it as time moves on
    t.add(110.0, "ten seconds on")
    t.add(99.501, "next millisecond")
    assert t.next() == 99.501
    assert t.due(99.6, 100) == ["next millisecond"]
    assert t.next() == 100.0 and t.due(100.0, 100) == ["before the first tick"]
    assert t.next() == 110.0 and t.due(109.999, 100) == []
    assert t.due(110.0, 100) == ["ten seconds on"] and len(t) == 0 and t.next() is None
    # idle for an hour: the ring starts again from where time is
    t.add(3700.0004, "after an hour")
    t.add(3700.0001, "a past millisecond's")
    assert t.due(3700.0002, 100) == ["a past millisecond's"]
    assert t.due(3700.0004, 100) == ["after an hour"]


def test_against_a_sorted_list_with_jumps_of_time_far_wake_ups_and_small_budgets():
    rng = random.Random(11)
    t: Timers[int] = Timers()
    pending: dict[int, float] = {}
    now = 50.0
    for i in range(30000):
        when = now + rng.choice((-0.002, 0.0, 0.0003, 0.02, 0.2, 1.0, 2.047, 2.049, 5.0, 30.0)) \
            * rng.random()
        t.add(when, i)
        pending[i] = when
        if i % 5 == 0:
            now += rng.choice((0.0002, 0.001, 0.003, 0.05, 3.0)) * rng.random()
            budget = rng.choice((1, 3, 50, 100_000))
            fired = t.due(now, budget)
            assert len(fired) <= budget
            assert all(pending[j] <= now for j in fired), "fired early"
            for j in fired:
                del pending[j]
            if budget == 100_000:
                assert not [j for j, w in pending.items() if w <= now], "a due one stayed"
            assert len(t) == len(pending)
            assert t.next() == (min(pending.values()) if pending else None)
