"""Count each call once: the usage ids one `genai.usage` partition has already priced. Pure.

OTLP exporters retry a whole request after a timeout or an UNAVAILABLE, and the collector may
have published it already: the same span then arrives again, at a new offset, seconds or an
hour later. Offset guards cannot see that; a usage id (trace id + span id) can. A call's
attribution key decides its partition, so a retried span always lands where its first copy did.

Ids are kept per minute of the call's start time, for `horizon_s` of event time behind the
partition's watermark (the collector accepts no span older than `collector.max_lateness_s`, and
the horizon is at least that, so every span the edge accepts can be checked). The minute still
filling is a set; older minutes are sealed into sorted arrays of 64-bit hashes, 8 bytes an id,
searched by bisection. Two different ids share a hash with probability about n²/2^65 (n ids in the
horizon): at a million ids an hour, once in about 36,000 years; the files' row-id dedupe stays
as the last line.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable
from heapq import merge
from typing import Final

MINUTE_S: Final = 60
#: minutes this far behind the watermark take no new ids often enough to be sealed
SEAL_AFTER_S: Final = 2 * MINUTE_S


def id_hash(usage_id: str) -> int:
    """A 64-bit fingerprint of a usage id. Stable within one process only (str hashing is salted per
    process), which is all this needs: the ids are rebuilt from their source in each process."""
    return hash(usage_id)


class HashedIds:
    """A set of 64-bit id hashes at about 8 bytes an id: sorted arrays searched by bisection, plus a set of the
    hashes added since the last `seal`."""

    __slots__ = ("late", "sealed")

    def __init__(self, sealed: Iterable[int] = ()) -> None:
        self.sealed = array("q", sorted(sealed))
        self.late: set[int] = set()

    def __contains__(self, key: int) -> bool:
        i = bisect_left(self.sealed, key)
        return (i < len(self.sealed) and self.sealed[i] == key) or key in self.late

    def add(self, key: int) -> bool:
        """Add `key`; whether it was new."""
        if key in self:
            return False
        self.late.add(key)
        return True

    def seal(self) -> None:
        """Merge the late hashes into the sorted array (they are never in it: `add` checks), streaming, so that the
        only copy is the new array."""
        if self.late:
            self.sealed = array("q", merge(self.sealed, sorted(self.late)))
            self.late = set()

    def seal_if_due(self) -> None:
        """`seal` once the late hashes are an eighth of the sealed ones: amortised O(log n) an id, and the late set
        (~70 bytes a hash) stays a fraction of the whole."""
        if len(self.late) * 8 > len(self.sealed):
            self.seal()

    def __len__(self) -> int:
        return len(self.sealed) + len(self.late)


class SeenUsage:
    """The usage ids of one partition within `horizon_s` of event time behind its watermark."""

    def __init__(self, horizon_s: int) -> None:
        self.horizon_s = horizon_s
        self._minutes: dict[int, HashedIds] = {}
        self._watermark_s = 0

    def first_time(self, usage_id: str, start_s: int) -> bool:
        """True the first time a usage id is seen (and from then on remembers it); False for a repeat.
        A call older than the horizon is not remembered and counts as new: the edge never accepts one."""
        if start_s < self._watermark_s - self.horizon_s:
            return True
        minute_s = start_s - start_s % MINUTE_S
        minute = self._minutes.get(minute_s)
        if minute is None:
            minute = self._minutes[minute_s] = HashedIds()
        return minute.add(id_hash(usage_id))

    def advance(self, watermark_s: int) -> None:
        """Move the watermark: forget minutes past the horizon, seal those too old to be filling."""
        self._watermark_s = max(self._watermark_s, watermark_s)
        oldest = self._watermark_s - self.horizon_s
        for minute_s in [m for m in self._minutes if m + MINUTE_S <= oldest]:
            del self._minutes[minute_s]
        seal_before = self._watermark_s - SEAL_AFTER_S
        for minute_s, minute in self._minutes.items():
            if minute_s < seal_before:
                minute.seal_if_due()

    def __len__(self) -> int:
        return sum(len(m) for m in self._minutes.values())
