"""`spendstream demo`: realistic GenAI traffic through the real OpenTelemetry SDK and OTLP/gRPC exporter.

Several teams, use cases, environments, providers and instrumentation dialects; cached
tokens; a few calls to a model nobody prices; some spans without a team (unallocated);
prompt text on some spans (the collector must strip it); and a research agent that runs
quietly until, in the middle of the run, its loop runs away at 10x the whole traffic.

Velocity is judged against each scope's own trailing baseline, so the demo first replays
`history_s` of the same normal traffic with past timestamps (as a backlog would arrive):
every scope has a baseline by the time the runaway starts.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Tracer

from schemas.codec import rfc3339

Attributes = dict[str, Any]


@dataclass(frozen=True)
class Service:
    name: str
    team: str | None
    env: str
    weight: float
    calls: Callable[[random.Random], Attributes]
    extra_resource: dict[str, str] = field(default_factory=dict)


def _semconv_openai(model: str, key: str) -> Callable[[random.Random], Attributes]:
    def make(rng: random.Random) -> Attributes:
        prompt = rng.randint(400, 4000)
        cached = rng.choice([0, 0, prompt // 2, prompt - 64])
        return {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
            "gen_ai.request.model": model, "gen_ai.response.model": model,
            "gen_ai.usage.input_tokens": prompt, "gen_ai.usage.output_tokens": rng.randint(50, 800),
            "gen_ai.usage.cache_read.input_tokens": cached, "gen_ai.virtual_key": key,
            "server.address": "api.openai.com", "feature.name": "support-rag",
            "gen_ai.input.messages": '[{"role":"user","parts":[{"type":"text","content":"DEMO-PROMPT-SECRET"}]}]',
        }
    return make


def _anthropic(rng: random.Random) -> Attributes:
    uncached = rng.randint(200, 2000)
    read, write = rng.choice([(0, 1200), (1200, 0), (1200, 0), (0, 0)])
    return {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-haiku-4-5", "gen_ai.response.model": "claude-haiku-4-5",
        # semconv: input_tokens includes Anthropic's cache tokens
        "gen_ai.usage.input_tokens": uncached + read + write, "gen_ai.usage.output_tokens": rng.randint(20, 300),
        "gen_ai.usage.cache_read.input_tokens": read, "gen_ai.usage.cache_creation.input_tokens": write,
        "feature.name": "query-rewrite", "gen_ai.virtual_key": "search-api",
    }


def _gemini(rng: random.Random) -> Attributes:
    return {
        "gen_ai.operation.name": "generate_content", "gen_ai.provider.name": "gcp.gemini",
        "gen_ai.request.model": "gemini-2.5-flash", "gen_ai.usage.input_tokens": rng.randint(300, 3000),
        "gen_ai.usage.output_tokens": rng.randint(200, 1500), "feature.name": "copywriter",
    }


def _legacy_openai(rng: random.Random) -> Attributes:
    # an older instrumentation: deprecated names, no operation name
    return {
        "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4.1",
        "gen_ai.usage.prompt_tokens": rng.randint(1000, 8000), "gen_ai.usage.completion_tokens": rng.randint(100, 900),
        "feature.name": "notebook", "gen_ai.prompt.0.content": "DEMO-PROMPT-SECRET",
    }


def _embeddings(rng: random.Random) -> Attributes:
    return {
        "gen_ai.operation.name": "embeddings", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "text-embedding-3-small", "gen_ai.usage.input_tokens": rng.randint(2000, 8000),
        "feature.name": "doc-indexer",
    }


def _self_hosted(rng: random.Random) -> Attributes:
    return {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "acme",
        "gen_ai.request.model": "acme-llm-7b", "gen_ai.usage.input_tokens": rng.randint(100, 900),
        "gen_ai.usage.output_tokens": rng.randint(10, 200), "feature.name": "ticket-triage",
    }


def _no_team(rng: random.Random) -> Attributes:
    attrs = _semconv_openai("gpt-4o-mini", "shadow-it")(rng)
    attrs.pop("feature.name")
    return attrs


SERVICES = (
    Service("support-bot", "customer-support", "prod", 0.35, _semconv_openai("gpt-4o", "support-rag")),
    Service("search-api", "search", "prod", 0.25, _anthropic),
    Service("campaign-studio", "marketing", "staging", 0.12, _gemini),
    Service("ds-notebooks", "data-science", "dev", 0.08, _legacy_openai),
    Service("doc-indexer", "platform", "prod", 0.12, _embeddings),
    Service("triage-worker", "operations", "prod", 0.04, _self_hosted),
    Service("weekend-hack", None, "dev", 0.04, _no_team),
)
RUNAWAY = Service("research-agent", "research", "prod", 0.04, _semconv_openai("gpt-4o", "research-agent"))


def _provider(service: Service, endpoint: str | None, token: str | None) -> TracerProvider:
    resource = {"service.name": service.name, "deployment.environment.name": service.env,
                **service.extra_resource}
    if service.team:
        resource["team.name"] = service.team
    provider = TracerProvider(resource=Resource.create(resource))
    headers = {"authorization": f"Bearer {token}"} if token else None
    # None: the SDK reads OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT / _HEADERS / _INSECURE, as any OTel app does
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True if endpoint else None, headers=headers)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=300, max_queue_size=20_000,
                                                   max_export_batch_size=512))
    return provider


def _call(tracer: Tracer, attrs: Attributes, rng: random.Random, end_ns: int) -> None:
    start = end_ns - rng.randint(200, 4000) * 1_000_000
    span = tracer.start_span(f"{attrs.get('gen_ai.operation.name', 'chat')} {attrs.get('gen_ai.request.model')}",
                             kind=SpanKind.CLIENT, attributes=attrs, start_time=start)
    span.end(end_time=end_ns)


def _agent_step(tracer: Tracer, rng: random.Random, end_ns: int) -> None:
    """One loop of the research agent: an invoke_agent span (with summed usage) around a chat call."""
    attrs = RUNAWAY.calls(rng)
    attrs["feature.name"] = "deep-research"
    agent = tracer.start_span("invoke_agent researcher", kind=SpanKind.INTERNAL, start_time=end_ns - 4_100_000_000,
                              attributes={
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "researcher",
        "gen_ai.usage.input_tokens": attrs["gen_ai.usage.input_tokens"],
        "gen_ai.usage.output_tokens": attrs["gen_ai.usage.output_tokens"],
    })
    with trace.use_span(agent, end_on_exit=False):
        _call(tracer, attrs, rng, end_ns)
    agent.end(end_time=end_ns)


class Traffic:
    """Normal traffic, one tick at a time, at any event time (live or replayed)."""

    def __init__(self, tracers: dict[str, Tracer], rng: random.Random, rate_per_s: float) -> None:
        self.tracers, self.rng, self.rate_per_s = tracers, rng, rate_per_s
        self.weights = [s.weight for s in SERVICES]
        self.calls = 0

    def tick(self, tick_s: float, end_ns: int, *, runaway: bool) -> None:
        rng = self.rng
        for _ in range(_poisson(rng, self.rate_per_s * tick_s)):
            service = rng.choices(SERVICES, self.weights)[0]
            _call(self.tracers[service.name], service.calls(rng), rng, end_ns)
            self.calls += 1
        agent_rate = (10 if runaway else RUNAWAY.weight) * self.rate_per_s
        for _ in range(_poisson(rng, agent_rate * tick_s)):
            _agent_step(self.tracers[RUNAWAY.name], rng, end_ns)
            self.calls += 1


def _progress(elapsed: float, duration: float, calls: int, burst: bool) -> None:
    width = 30
    done = int(width * min(elapsed / duration, 1.0))
    line = (f"demo [{'#' * done}{'.' * (width - done)}] {elapsed:5.1f}/{duration:.0f}s  "
            f"{calls:6d} model calls  {'RUNAWAY AGENT BURSTING' if burst else ''}")
    if sys.stderr.isatty():
        print(f"\r{line:<100}", end="", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


def run_demo(*, endpoint: str | None, duration_s: float, rate_per_s: float, seed: int, token: str | None,
             history_s: float = 180.0) -> int:
    """Replay `history_s` of normal traffic, then send it live for `duration_s`; the research agent runs
    away at 10x the whole rate between 40 % and 60 % of the live run. Without `endpoint` the spans go where the
    standard OTEL_EXPORTER_OTLP_* variables say (default localhost:4317)."""
    target = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "localhost:4317"
    rng = random.Random(seed)
    providers = {s.name: _provider(s, endpoint, token) for s in (*SERVICES, RUNAWAY)}
    traffic = Traffic({name: p.get_tracer("spendstream.demo") for name, p in providers.items()}, rng, rate_per_s)
    tick_s = 0.05
    burst: list[int] = []
    try:
        if history_s > 0:
            now_ns = time.time_ns()
            print(f"demo: replaying the last {history_s:g}s of normal traffic (past timestamps), so every scope "
                  "has a baseline", file=sys.stderr, flush=True)
            steps = int(history_s / tick_s)
            for i in range(steps):
                traffic.tick(tick_s, now_ns - int((steps - i) * tick_s * 1e9), runaway=False)
            for provider in providers.values():
                provider.force_flush()
        started = time.monotonic()
        next_report = 0.0
        while (elapsed := time.monotonic() - started) < duration_s:
            runaway = 0.4 * duration_s <= elapsed < 0.6 * duration_s
            now_ns = time.time_ns()
            traffic.tick(tick_s, now_ns, runaway=runaway)
            if runaway:
                burst = [burst[0] if burst else now_ns, now_ns]
            if elapsed >= next_report:
                _progress(elapsed, duration_s, traffic.calls, runaway)
                next_report = elapsed + (0.2 if sys.stderr.isatty() else 5.0)
            time.sleep(tick_s)
    finally:
        for provider in providers.values():
            provider.shutdown()  # flushes what is still queued
    _progress(duration_s, duration_s, traffic.calls, False)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(f"demo: sent {traffic.calls} model calls to {target}")
    if burst:
        print(f"demo: the research agent ran away from {rfc3339(burst[0] // 10**9)} to {rfc3339(burst[1] // 10**9)} "
              "(team=research, key=research-agent)")
    return traffic.calls


def _poisson(rng: random.Random, mean: float) -> int:
    # Knuth: fine for the small means of one tick
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1
