"""Counting per attribution key survives redelivery: replays at or below the stored offset are skipped."""

from __future__ import annotations

from pipeline.tally import KeyTally, newest, tally_messages


def test_counts_events_per_key_and_keeps_highest_offset() -> None:
    update = tally_messages({}, [("a", 0, 3), ("b", 1, 2), ("a", 2, 5)])
    assert update.tallies == {"a": KeyTally(8, 2), "b": KeyTally(2, 1)}
    assert update.counted_events == 10 and update.skipped_messages == 0


def test_redelivered_messages_are_skipped() -> None:
    first = tally_messages({}, [("a", 0, 3), ("a", 1, 4)])
    replay = tally_messages(first.tallies, [("a", 0, 3), ("a", 1, 4), ("a", 2, 1)])
    assert replay.tallies == {"a": KeyTally(8, 2)}
    assert replay.skipped_messages == 2 and replay.counted_events == 1


def test_only_changed_keys_are_returned() -> None:
    current = {"a": KeyTally(5, 10), "b": KeyTally(1, 3)}
    update = tally_messages(current, [("a", 9, 1), ("b", 4, 1)])
    assert update.tallies == {"b": KeyTally(2, 4)}


def test_json_round_trip() -> None:
    assert KeyTally.from_json(KeyTally(7, 42).to_json()) == KeyTally(7, 42)
    assert KeyTally.from_json(None) == KeyTally()


def test_newest_tally_wins_by_offset() -> None:
    assert newest(KeyTally(5, 10), KeyTally(9, 14), None) == KeyTally(9, 14)
    assert newest(KeyTally(9, 14), KeyTally(5, 10)) == KeyTally(9, 14)
    assert newest(None, None) == KeyTally()


def test_out_of_order_messages_in_a_batch_are_all_counted() -> None:
    update = tally_messages({"a": KeyTally(25, 73)}, [("a", 148, 1), ("a", 147, 1), ("a", 148, 1), ("a", 74, 1)])
    assert update.tallies == {"a": KeyTally(28, 148)}
    assert update.skipped_messages == 1  # the duplicate 148
