"""The breaker keeper's snapshot: the commands in force and this month's operator resets, so a restart of the
embedded broker tells stage 2 of a reset again (a reset budget breaker stays closed for the rest of its month)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from pipeline.cli.breaker_keeper import read_snapshot, write_snapshot
from pipeline.gateway.kill_switch import reset_commands, reset_records, trip_command
from schemas.policy import Scope
from schemas.spend import Reset, decode_spend


def test_a_snapshot_keeps_this_months_reset_and_drops_last_months(tmp_path: Path) -> None:
    now = time.time()
    month_start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
    scope = Scope.parse("team=ads")
    this_month = reset_commands(scope, "incident closed", now)
    last_month = reset_commands(Scope.parse("team=search"), "old", month_start - 3600)
    tripped = trip_command(Scope.parse("team=x"), "block", "runaway", ttl_s=None, downgrade={}, now_s=now)
    path = tmp_path / "breakers.jsonl"
    write_snapshot(path, [*this_month, *last_month, tripped])
    kept = read_snapshot(path, now)
    assert {c.breaker_id for c in kept} == {"manual|team=ads", "manual|team=x"}
    records = [decode_spend(value) for _, value in reset_records(kept)]
    assert records == [Reset("team=ads", "incident closed", int(now))]
