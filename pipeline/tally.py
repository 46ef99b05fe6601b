"""Count usage events per attribution key, exactly once across redeliveries. Pure.

Each tally stores the highest source offset it already includes (DESIGN §5): a message
redelivered after a rebalance has an offset at or below it and is skipped. Value and offset
travel in one changelog message, so the skip decision survives a worker restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeyTally:
    events: int = 0
    offset: int = -1  # highest source offset included

    def to_json(self) -> list[int]:
        return [self.events, self.offset]

    @classmethod
    def from_json(cls, value: list[int] | None) -> KeyTally:
        return cls(value[0], value[1]) if value else cls()


def newest(*tallies: KeyTally | None) -> KeyTally:
    """The tally that includes the most: offsets only grow within a key's partition, so the highest
    offset wins. Merging this way makes a stale read (e.g. a changelog restore racing a write) harmless."""
    return max((t for t in tallies if t is not None), key=lambda t: t.offset, default=KeyTally())


@dataclass(frozen=True, slots=True)
class TallyUpdate:
    tallies: dict[str, KeyTally]
    counted_events: int
    skipped_messages: int
    #: (key, offset) of every message counted now: the ones to price
    counted: frozenset[tuple[str, int]]


def tally_messages(current: Mapping[str, KeyTally], messages: Iterable[tuple[str, int, int]]) -> TallyUpdate:
    """Fold (key, offset, events in message) into the tallies; replays at or below a key's offset are skipped.

    Returns only the tallies that changed, so the shell writes each table key once per batch.
    """
    changed: dict[str, KeyTally] = {}
    counted = skipped = 0
    fresh: set[tuple[str, int]] = set()
    # in source order per key: a batch that mixes a refetch after a seek must not see 148 before 147
    for key, offset, n_events in sorted(messages, key=lambda m: (m[0], m[1])):
        tally = changed.get(key) or current.get(key) or KeyTally()
        if offset <= tally.offset:
            skipped += 1
            continue
        changed[key] = KeyTally(tally.events + n_events, offset)
        counted += n_events
        fresh.add((key, offset))
    return TallyUpdate(changed, counted, skipped, frozenset(fresh))
