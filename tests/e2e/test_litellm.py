"""The real LiteLLM proxy, run with deploy/litellm/config.yaml, in front of a fake OpenAI-compatible server:
the spendstream callback makes it obey the breakers for its virtual keys, and its own OpenTelemetry spans
are priced by the pipeline with the key's attribution. One `spendstream run` and one LiteLLM for the module."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import yaml

from pipeline.gateway.kill_switch import publish, reset_commands, trip_command
from pipeline.pricing import PriceCatalog, price_usage
from pipeline.pricing.focus import money
from schemas.breaker import BreakerAction
from schemas.config import KafkaConfig
from schemas.policy import Scope
from schemas.usage import UsageEvent
from tests.e2e.conftest import USAGE, FakeChatCompletions
from tests.e2e.running import RunningPipeline, read_until, spendstream_run
from tests.support import free_port, read_topic, read_usage

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
LITELLM = Path(sys.executable).with_name("litellm")


class Upstream(ThreadingHTTPServer):
    """The fake model server, remembering the model each call asked it for."""

    asked: list[str]


class RecordingChat(FakeChatCompletions):
    server: Upstream

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.asked.append(json.loads(body)["model"])
        self.rfile = io.BytesIO(body)
        super().do_POST()


class LiteLLM:
    def __init__(self, port: int, upstream: Upstream) -> None:
        self.port = port
        self.upstream = upstream

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0)

    def asks_upstream_for(self, key: str, **extra: Any) -> str:
        """The model the upstream was asked for by one call of `key` for gpt-4o."""
        self.client(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                                 **extra)
        return self.upstream.asked[-1]


def litellm_config(tmp: Path, upstream: str) -> Path:
    """deploy/litellm/config.yaml as documented, with the fake upstream and the test's keys (no database)."""
    config = yaml.safe_load((ROOT / "deploy" / "litellm" / "config.yaml").read_text())
    for model in config["model_list"]:
        model["litellm_params"] |= {"api_base": upstream, "api_key": "sk-upstream"}
    del config["general_settings"]["database_url"]
    config["general_settings"]["custom_auth"] = "tests.e2e.litellm_keys.user_api_key_auth"
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningPipeline, LiteLLM]]:
    tmp = tmp_path_factory.mktemp("litellm")
    upstream = Upstream(("127.0.0.1", 0), RecordingChat)
    upstream.asked = []
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    # its kafka section is overridden by SPENDSTREAM_KAFKA_BOOTSTRAP_SERVERS: both ways of pointing LiteLLM at
    # Kafka are used
    (tmp / "spendstream.yaml").write_text("kafka: {bootstrap_servers: '127.0.0.1:1'}\n")
    with spendstream_run(tmp / "data", tmp / "run.log") as run:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LITELLM_MASTER_KEY": "sk-master-" + os.urandom(16).hex(),
               "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of LiteLLM's price list from the internet
               "SPENDSTREAM_CONFIG": str(tmp / "spendstream.yaml"),
               "SPENDSTREAM_KAFKA_BOOTSTRAP_SERVERS": run.bootstrap,
               "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{run.grpc_port}",
               "OTEL_ENVIRONMENT_NAME": "prod"}
        log = tmp / "litellm.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [str(LITELLM), "--config", str(litellm_config(tmp, f"http://127.0.0.1:{upstream.server_port}/v1")),
                 "--host", "127.0.0.1", "--port", str(port)],
                stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp)
        try:
            read_until(process, log, "Uvicorn running on", timeout_s=180)
            yield run, LiteLLM(port, upstream)
        finally:
            process.terminate()
            process.wait(timeout=30)
            upstream.shutdown()


ADS = Scope.parse("team=ads")


def trip(run: RunningPipeline, action: BreakerAction, reason: str, *, ttl_s: int | None = None,
         downgrade: dict[str, str] | None = None) -> None:
    """What `spendstream breaker trip --scope team=ads` publishes, without a process per command."""
    command = trip_command(ADS, action, reason, ttl_s=ttl_s, downgrade=downgrade or {}, now_s=time.time())
    asyncio.run(publish(KafkaConfig(bootstrap_servers=run.bootstrap), [command]))


def eventually(check: Callable[[], bool], timeout_s: float = 20) -> None:
    """Until `check()` holds: a command takes a moment to reach LiteLLM."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except openai.APIStatusError:
            pass
        time.sleep(0.3)
    raise AssertionError("LiteLLM never got there")


def refused(call: Callable[[], object], error: type[openai.APIStatusError]) -> openai.APIStatusError:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            call()
        except error as exc:
            return exc
        time.sleep(0.3)
    raise AssertionError(f"LiteLLM never answered {error.__name__}")


def test_litellm_obeys_the_breakers_for_its_virtual_keys(running: tuple[RunningPipeline, LiteLLM]) -> None:
    run, litellm = running
    assert litellm.asks_upstream_for("sk-ads") == "gpt-4o"
    with pytest.raises(openai.AuthenticationError):
        litellm.asks_upstream_for("sk-nobody")

    trip(run, "block", "runaway test", ttl_s=3600)
    blocked = refused(lambda: litellm.asks_upstream_for("sk-ads"), openai.RateLimitError)
    assert "runaway test" in str(blocked)
    assert 3500 < int(blocked.response.headers["retry-after"]) <= 3601
    # what the client claims about itself changes nothing: LiteLLM verified the key
    with pytest.raises(openai.RateLimitError):
        litellm.asks_upstream_for("sk-ads", extra_headers={"x-team": "search"},
                                  extra_body={"metadata": {"tags": ["env:dev"], "team": "search"}})
    assert litellm.asks_upstream_for("sk-search") == "gpt-4o"  # other teams unaffected

    trip(run, "downgrade", "too dear", downgrade={"gpt-4o": "gpt-4o-mini"})
    eventually(lambda: litellm.asks_upstream_for("sk-ads") == "gpt-4o-mini")

    trip(run, "approved_only", "needs sign-off")
    assert "needs sign-off" in str(refused(lambda: litellm.asks_upstream_for("sk-ads"), openai.PermissionDeniedError))
    assert litellm.asks_upstream_for("sk-vip") == "gpt-4o"  # the ads team's approved key

    asyncio.run(publish(KafkaConfig(bootstrap_servers=run.bootstrap), reset_commands(ADS, "done", time.time())))
    eventually(lambda: litellm.asks_upstream_for("sk-ads") == "gpt-4o")


def test_litellm_spans_are_priced_with_the_keys_attribution(running: tuple[RunningPipeline, LiteLLM]) -> None:
    run, litellm = running
    litellm.asks_upstream_for("sk-search")
    deadline = time.monotonic() + 60
    events: list[UsageEvent] = []
    while time.monotonic() < deadline and not events:
        events = [e for e in read_usage(run.bootstrap, "genai.usage", min_events=1)
                  if e.dialect == "litellm" and e.attribution.get("key") == "search-key" and e.tokens.output]
    assert events, "no LiteLLM span reached genai.usage"
    event = events[0]
    assert (event.attribution["team"], event.attribution["env"]) == ("search", "prod")
    assert (event.provider, event.request_model, event.operation) == ("openai", "gpt-4o", "chat")
    cached = USAGE["prompt_tokens_details"]["cached_tokens"]
    assert (event.tokens.cache_read, event.tokens.input_uncached) == (cached, USAGE["prompt_tokens"] - cached)

    expected = sum((money(line.contract_cost) for line in price_usage(event, PriceCatalog()).lines), Decimal(0))
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline + 30 and not rows:
        rows = [row for r in read_topic(run.bootstrap, "genai.cost.focus")
                if (row := orjson.loads(r.value))["x_UsageId"] == event.id]
    assert rows, "the LiteLLM call was not priced"
    assert {(row["x_Team"], row["x_Key"]) for row in rows} == {("search", "search-key")}
    assert sum(Decimal(row["BilledCost"]) for row in rows) == expected > 0
