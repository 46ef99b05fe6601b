"""A ceiling on the request bytes the collector holds at once, shared by both OTLP transports.

Each request reserves the bytes it holds (an HTTP body as it is read and inflated, a gRPC
message when it arrives) and gives them back when it is answered. A request that would take
the total past `collector.max_inflight_bytes` is answered "busy, try later" (`CollectorBusy`:
HTTP 429 + Retry-After, gRPC UNAVAILABLE + RetryInfo), so memory stays bounded whatever the
number of clients, and nothing is lost: the client retries.
"""

from __future__ import annotations

from schemas.errors import TransientError


class CollectorBusy(TransientError):
    """Too many request bytes in flight; the client should retry the whole request later."""


class InflightBytes:
    """Bytes held by requests being served. Single event loop: no locking needed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def reservation(self) -> Reservation:
        return Reservation(self)


class Reservation:
    """One request's share of the in-flight bytes; `release()` (idempotent) gives it back."""

    def __init__(self, budget: InflightBytes) -> None:
        self._budget = budget
        self.bytes = 0

    def grow(self, n: int) -> bool:
        """Take `n` more bytes; False (nothing taken) when that would pass the limit."""
        if self._budget.held + n > self._budget.limit:
            return False
        self._budget.held += n
        self.bytes += n
        return True

    def take(self, n: int) -> None:
        """Take `n` more bytes. Raises CollectorBusy when that would pass the limit."""
        if not self.grow(n):
            raise self.busy()

    def busy(self) -> CollectorBusy:
        """The error that answers a request the in-flight limit refused."""
        return CollectorBusy(
            f"collector busy: {self._budget.held} request bytes in flight (collector.max_inflight_bytes "
            f"= {self._budget.limit}); retry later"
        )

    def release(self) -> None:
        self._budget.held -= self.bytes
        self.bytes = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["CollectorBusy", "InflightBytes", "Reservation"]
