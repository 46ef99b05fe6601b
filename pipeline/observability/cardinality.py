"""Bounded label sets for Prometheus metrics. Pure.

Every distinct label tuple is a series that Prometheus, and this process, keep in memory, so
a flood of new attribution values (a leaked key, a user id used as a team) must not become a
flood of series. Two rules bound them:

- `LabelBudget` (counters): each bounded label admits its first `max_values` distinct values;
  later ones are counted as `other`. A counter series cannot be moved once exported (its rate
  would break), so admission is first come; the sum over all series stays exact.
- `top_scopes` (gauges): a gauge is read fresh at every scrape, so it can show the true top N
  scopes by value, with the rest summed into `scope="other"`.

On top, each family has a ceiling of `max_series`: a tuple that would pass it is folded into
`other` on every bounded label, a series that always exists.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Final, TypeVar

OTHER: Final = "other"
#: the attribution labels the cost, token and request metrics carry
METRIC_DIMENSIONS: Final = ("team", "use_case", "env", "app")
T = TypeVar("T")


class LabelBudget:
    """Folds label tuples of one metric family into a bounded set."""

    def __init__(self, labels: Sequence[str], bounded: Iterable[str], *, max_values: int, max_series: int) -> None:
        bounded = set(bounded)
        unknown = bounded - set(labels)
        if unknown:
            raise ValueError(f"bounded labels {sorted(unknown)} are not labels of this metric {list(labels)}")
        if max_values < 1 or max_series < 1:
            raise ValueError("max_values and max_series must be at least 1")
        self._positions = [i for i, name in enumerate(labels) if name in bounded]
        self._admitted: dict[int, set[str]] = {i: set() for i in self._positions}
        self._max_values = max_values
        self._max_series = max_series
        self._series: set[tuple[str, ...]] = set()
        self.folded = 0  # tuples that lost at least one value to `other`

    @property
    def series(self) -> int:
        return len(self._series)

    def fold(self, values: tuple[str, ...]) -> tuple[str, ...]:
        """The label tuple to count `values` under."""
        if values in self._series:
            return values
        out = list(values)
        for i in self._positions:
            admitted = self._admitted[i]
            if out[i] not in admitted:
                if len(admitted) < self._max_values:
                    admitted.add(out[i])
                else:
                    out[i] = OTHER
        folded = tuple(out)
        if folded not in self._series and len(self._series) >= self._max_series:
            for i in self._positions:
                out[i] = OTHER
            folded = tuple(out)
        if folded != values:
            self.folded += 1
        self._series.add(folded)
        return folded


def top_scopes(values: Iterable[tuple[str, T]], n: int,
               weight: Callable[[T], Decimal | float]) -> tuple[list[tuple[str, T]], list[T]]:
    """The `n` heaviest (scope, value) pairs, and the values of the rest (for an `other` series)."""
    items = list(values)
    if len(items) <= n:
        return items, []
    top = heapq.nlargest(n, items, key=lambda item: weight(item[1]))
    kept = {scope for scope, _ in top}
    return top, [value for scope, value in items if scope not in kept]
