"""SeenUsage: a usage id counts once within the horizon, whatever the order, and memory follows the horizon."""

from __future__ import annotations

import tracemalloc

from pipeline.pricing.dedupe import MINUTE_S, SeenUsage

T0 = 1_795_000_000 - 1_795_000_000 % MINUTE_S


def test_a_repeat_is_not_new_in_the_open_minute_or_after_sealing() -> None:
    seen = SeenUsage(horizon_s=3600)
    assert seen.first_time("a-1", T0)
    assert not seen.first_time("a-1", T0)
    seen.advance(T0 + 10 * MINUTE_S)  # the minute of a-1 is sealed now
    assert not seen.first_time("a-1", T0)
    assert seen.first_time("a-2", T0)  # a late new id in a sealed minute
    assert not seen.first_time("a-2", T0)
    seen.advance(T0 + 11 * MINUTE_S)
    assert not seen.first_time("a-2", T0) and not seen.first_time("a-1", T0)


def test_a_retry_ten_minutes_later_is_caught_one_beyond_the_horizon_is_forgotten() -> None:
    seen = SeenUsage(horizon_s=3600)
    assert seen.first_time("span", T0)
    seen.advance(T0 + 600)
    assert not seen.first_time("span", T0)
    seen.advance(T0 + 3600 + MINUTE_S)
    assert len(seen) == 0  # memory follows the horizon


def test_many_ids_stay_distinct_and_sealed_memory_is_about_8_bytes_an_id() -> None:
    seen = SeenUsage(horizon_s=3600)
    ids = [f"{i:032x}-{i * 7919:016x}" for i in range(60_000)]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i, usage_id in enumerate(ids):
        assert seen.first_time(usage_id, T0 + i // 1000)  # 60k ids over a minute
    seen.advance(T0 + 5 * MINUTE_S)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert held / len(ids) < 16
    assert not any(seen.first_time(usage_id, T0 + i // 1000) for i, usage_id in enumerate(ids))
    assert len(seen) == len(ids)
