"""Realistic `genai.cost.focus` traffic for the exporter tests: priced by the real pricing code, produced in
bulk, and the exporter as a subprocess whose memory can be read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.kafka.producer import BatchProducer
from pipeline.pricing import PriceCatalog
from pipeline.pricing.cost_records import cost_records
from pipeline.pricing.focus import Billing
from schemas.usage import TokenCounts, UsageEvent

TEAMS = ("search", "support", "research", "ads")


def focus_messages(calls: int, *, start_s: int | None = None, spread_s: int = 3600,
                   tag: str = "") -> list[tuple[bytes, bytes]]:
    """(key, value) of the FOCUS rows of `calls` priced calls (3 rows a call: input, cache read, output), their
    start times spread over `spread_s` seconds from `start_s` (default: the last hour). `tag` makes ids unique
    between sets."""
    start_ns = (int(time.time()) - spread_s if start_s is None else start_s) * 10**9
    step_ns = spread_s * 10**9 // max(calls, 1)
    catalog = PriceCatalog()
    rows: list[tuple[bytes, bytes]] = []
    for first in range(0, calls, 10_000):
        events = []
        for m in range(first, min(first + 10_000, calls)):
            team = TEAMS[m % len(TEAMS)]
            use_case = f"uc{m % 7}"
            key = f"team={team}|use_case={use_case}|env=prod|app=a|key="
            trace = f"{tag}{m:x}".rjust(32, "0")[-32:]
            events.append(UsageEvent(
                id=f"{trace}-{m:016x}", trace_id=trace, span_id=f"{m:016x}", parent_span_id=None,
                start_time_unix_nano=start_ns + m * step_ns, end_time_unix_nano=start_ns + m * step_ns + 10**9,
                operation="chat", provider="openai", request_model="gpt-4o", response_model="gpt-4o-2024-08-06",
                tokens=TokenCounts(input_uncached=100 + m % 1000, cache_read=64, output=20 + m % 50),
                attribution={"team": team, "use_case": use_case, "env": "prod", "app": "a"},
                attribution_key=key))
        rows += cost_records(events, catalog, Billing()).rows
    return rows


def chunks(messages: list[tuple[bytes, bytes]], size: int) -> Iterator[list[tuple[bytes, bytes]]]:
    for start in range(0, len(messages), size):
        yield messages[start:start + size]


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    """Every message on `topic`, acknowledged, as fast as the producer goes."""
    async def main() -> None:
        producer = BatchProducer({"bootstrap_servers": bootstrap})
        await producer.start()
        try:
            for part in chunks(messages, 5_000):
                await producer.send_all(topic, part)
        finally:
            await producer.stop()

    asyncio.run(main())


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB: resident now, and the peak so far."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
