"""The adjusted count of a sampled span, from its OpenTelemetry sampling threshold. Pure.

OpenTelemetry's probability sampling (tracestate `ot=th:<hex>`, the "TraceState Probability
Sampling" spec) records the rejection threshold T, a 56-bit number written as up to 14 hex
digits with trailing zeros dropped: a span was kept with probability p = 1 - T / 2^56, so it
stands for 1/p calls, its *adjusted count*. `th:0` is p = 1; `th:8` is 1/2; `th:c` 1/4; `th:e`
1/8. The count is an exact rational (2^56 / (2^56 - T)); it is a whole number only for powers
of two, so it stays a `Fraction` here and each consumer rounds once, where it must.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Final

_MAX_THRESHOLD: Final = 1 << 56
_HEX_DIGITS: Final = 14
_THRESHOLD: Final = re.compile(r"[0-9a-f]{1,14}")


class InvalidTraceState(ValueError):
    """The span's `ot` tracestate entry names a threshold that is not one (the span counts as unsampled)."""


def adjusted_count(trace_state: str) -> Fraction | None:
    """How many calls a span stands for: 2^56 / (2^56 - T) for `ot=th:T`; None when the span carries no threshold.

    Only the `ot` vendor's `th` sub-key matters; other vendors, the randomness value `rv` and unknown
    sub-keys are ignored, as the spec asks. Raises InvalidTraceState when `th` is present but is not
    1-14 lowercase hex digits.
    """
    if "ot=" not in trace_state:  # the common case: no tracestate, or other vendors only
        return None
    for member in trace_state.split(","):
        key, _, value = member.strip().partition("=")
        if key != "ot":
            continue
        for field in value.split(";"):
            name, _, threshold = field.partition(":")
            if name != "th":
                continue
            if not _THRESHOLD.fullmatch(threshold):
                raise InvalidTraceState(f"ot=th:{threshold[:20]!r} is not a sampling threshold (1-14 hex digits)")
            rejected = int(threshold.ljust(_HEX_DIGITS, "0"), 16)
            return Fraction(_MAX_THRESHOLD, _MAX_THRESHOLD - rejected)
    return None


def scaled(count: int, by: Fraction) -> int:
    """`count` observed calls' worth of a quantity, times the adjusted count, to the nearest whole unit (half even).

    Exact when the adjusted count is a whole number (every power-of-two probability); otherwise off by at
    most half a unit, far below what sampling itself leaves uncertain.
    """
    return round(count * by)


__all__ = ["InvalidTraceState", "adjusted_count", "scaled"]
