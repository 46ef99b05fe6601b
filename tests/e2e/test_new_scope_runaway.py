"""No blind spot and no poisoned clock: after the pipeline has watched for min_history, spans stamped in the year
2200 and near 2^64 are dead-lettered, and a team never seen before that spends 600 USD/min from its first call
is stopped within seconds; a steady team and a team that makes one large call are left alone."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

import orjson
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Tracer

from pipeline.guardrails.stage import PARTITION_KEY
from schemas.config import KafkaConfig
from schemas.guardrail_state import decode_partition_state
from tests.e2e.running import RunningPipeline, spendstream_run
from tests.support import read_topic

pytestmark = pytest.mark.e2e
#: every call costs 1 USD per 1,000 input tokens; the pipeline watches teams (the default shapes).
#: Velocity is shortened from the defaults (window 5m, rate_window 1m, min_history 1m) so that the test waits ~32 s,
#: not 65 s, for the same two phases. From min_history (30 s) after a partition began watching, a scope with no
#: call there before its rate window is new: baseline 0, the newcomer is stopped by that rule alone until
#: about min_history + rate_window (45-50 s) after the watching began, when its baseline would come from its (empty)
#: history instead. A scope with calls before its rate window has no baseline (nothing spikes) until min_history of
#: its spend lies before the rate window, then its own rate: the steady team, which calls from the start, is never
#: taken for new as long as its first call comes within min_history - rate_window (10 s) of the watching.
MIN_HISTORY_S = 30
CONFIG = f"""
pricing:
  overrides:
    - {{provider: openai, model: gpt-4o, input_per_mtok: 1000, output_per_mtok: 0}}
velocity: {{window: 1m, rate_window: 20s, min_history: {MIN_HISTORY_S}s}}
"""
YEAR_2200_NS = 7_258_118_400 * 10**9


def tracer_for(run: RunningPipeline, team: str, *, batch: bool = True) -> tuple[TracerProvider, Tracer]:
    provider = TracerProvider(resource=Resource.create({"service.name": f"{team}-svc", "team.name": team,
                                                        "feature.name": "chat", "deployment.environment.name": "prod"}))
    exporter = OTLPSpanExporter(endpoint=f"localhost:{run.grpc_port}", insecure=True, timeout=30)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50) if batch
                                else SimpleSpanProcessor(exporter))
    return provider, provider.get_tracer("runaway")


def call(tracer: Tracer, usd: int, start_ns: int | None = None) -> None:
    attrs: dict[str, str | int] = {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 1000 * usd, "gen_ai.usage.output_tokens": 0}
    span = tracer.start_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes=attrs,
                             start_time=start_ns)
    span.end(end_time=None if start_ns is None else start_ns + 10**9)


def watching_since_s(run: RunningPipeline) -> int:
    """When the last spend partition began watching (stage 2 records it, `@partition`, in its changelog): the
    first tick of stage 1, a few seconds after the banner or before it."""
    partitions = KafkaConfig().partitions  # `spendstream run` without --partitions
    deadline = time.monotonic() + 60
    since: dict[int, int | None] = {}
    while len(since) < partitions or None in since.values():
        assert time.monotonic() < deadline, f"spend partitions watching: {since}"
        time.sleep(0.5)
        since = {r.partition: decode_partition_state(r.value).watching_since_s
                 for r in read_topic(run.bootstrap, "genai.guardrails.state") if r.key == PARTITION_KEY.encode()}
    return max(s for s in since.values() if s is not None)


def commands(run: RunningPipeline) -> list[dict[str, object]]:
    return [orjson.loads(r.value) for r in read_topic(run.bootstrap, "genai.breaker.commands") if r.value]


def test_a_new_team_looping_from_its_first_call_is_stopped_and_no_clock_can_disarm_it(tmp_path: Path) -> None:
    config = tmp_path / "spendstream.yaml"
    config.write_text(CONFIG)
    with spendstream_run(tmp_path / "data", tmp_path / "run.log", "--config", str(config)) as run:
        steady_provider, steady = tracer_for(run, "steady")
        stop = threading.Event()

        def steady_traffic() -> None:  # 30 USD/min, from the start and all along: no spike
            while True:
                call(steady, 1)
                if stop.wait(2.0):
                    return

        background = threading.Thread(target=steady_traffic)
        background.start()
        try:
            # every partition has watched for min_history: the newcomer is new from its first call, and the burst comes
            # well before min_history + rate_window, when its (empty) history would give it a baseline of zero too
            time.sleep(max(0, watching_since_s(run) + MIN_HISTORY_S + 2 - time.time()))
            poisoner_provider, poisoner = tracer_for(run, "clockless", batch=False)
            call(poisoner, 1, start_ns=YEAR_2200_NS)
            call(poisoner, 1, start_ns=2**64 - 2 * 10**9)
            big_provider, big = tracer_for(run, "bigcall", batch=False)
            call(big, 50)  # one large call: not a runaway

            runaway_provider, runaway = tracer_for(run, "newcomer")
            burst_ns = time.time_ns()
            opened: list[dict[str, object]] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not opened:
                for _ in range(5):
                    call(runaway, 1)  # 10 calls a second, 1 USD each: 600 USD/min
                    time.sleep(0.1)
                opened = [c for c in commands(run) if c["breaker_id"] == "rate|team=newcomer" and c["state"] == "open"]
            for provider in (poisoner_provider, big_provider, runaway_provider):
                provider.shutdown()
        finally:
            stop.set()
            background.join()
            steady_provider.shutdown()
        assert opened, "the new team's runaway was never stopped"
        decided_ns = datetime.fromisoformat(str(opened[0]["event_time"])).timestamp() * 10**9
        assert decided_ns - burst_ns <= 5 * 10**9, "stopped, but not within 5 s of event time"
        tripped = {c["breaker_id"] for c in commands(run)}
        assert tripped == {"rate|team=newcomer"}, f"other scopes were tripped: {tripped}"

        letters = [orjson.loads(r.value) for r in read_topic(run.bootstrap, "genai.deadletter")]
        stamped = [letter for letter in letters if letter["reason"] == "invalid_timestamp"]
        assert len(stamped) == 2
        assert run.process.poll() is None  # still running
