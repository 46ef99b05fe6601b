"""The loop closed end to end: `spendstream run` + `spendstream demo` (real OTel SDK) trip the runaway
agent's breaker within seconds; the example gateway (in its own process, with the real `openai`
client in front of it) obeys breaker commands from the kill switch."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import openai
import orjson
import pytest

from tests.e2e.running import SPENDSTREAM, RunningPipeline, demo, read_until, spendstream, spendstream_run
from tests.support import free_port, read_topic

pytestmark = pytest.mark.e2e
POLICY = """
velocity: {window: 5m, rate_window: 10s, min_history: 1m}
breaker: {cool_down: 5s, probe: 5s}
downgrade: {gpt-4o: gpt-4o-mini}
"""
GATEWAY_KEYS = """
gateway:
  keys:
    ads-key-0001: {team: ads, env: prod, use_case: copy, key: ads-key}
    search-key-01: {team: search, env: prod, use_case: rag, key: search-key}
    vip-key-0001: {team: ads, env: prod, use_case: oncall, key: vip-key}
  approved_keys: [vip-key]
"""
RUNAWAY_SCOPES = {"rate|team=research", "rate|key=research-agent"}


def schema(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(resources.files("schemas").joinpath(name).read_text("utf-8")))


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def messages(pipeline: RunningPipeline, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in read_topic(pipeline.bootstrap, topic) if r.value]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningPipeline, str]]:
    tmp = tmp_path_factory.mktemp("guardrails")
    config = tmp / "spendstream.yaml"
    config.write_text(POLICY)
    with spendstream_run(tmp / "data", tmp / "run.log", "--config", str(config)) as run:
        yield run, demo(run, 20, history_s=120).stdout


def test_runaway_agent_opens_its_breaker_within_seconds_then_half_opens_and_closes(
    pipeline: tuple[RunningPipeline, str],
) -> None:
    run, demo_output = pipeline
    window = re.search(r"ran away from (\S+) to (\S+)", demo_output)
    assert window, demo_output
    burst_start = epoch(window.group(1))
    deadline = time.monotonic() + 90
    commands: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        commands = messages(run, "genai.breaker.commands")
        closed = {c["breaker_id"] for c in commands if c["state"] == "closed"}
        if closed >= RUNAWAY_SCOPES:
            break
        time.sleep(1)
    for command in commands:
        schema("breaker_command.schema.json").validate(command)
    assert {c["breaker_id"] for c in commands} == RUNAWAY_SCOPES, "another scope was tripped"
    for breaker in RUNAWAY_SCOPES:
        states = [c for c in commands if c["breaker_id"] == breaker]
        assert [c["state"] for c in states][:1] == ["open"]
        assert [c["state"] for c in states][-2:] == ["half_open", "closed"]
        delay = epoch(states[0]["issued_at"]) - burst_start
        assert delay < 5, f"{breaker} opened {delay:.1f}s after the burst began"
        assert states[0]["action"] == "block" and states[0]["expires_at"]
    alerts = messages(run, "genai.alerts")
    for alert in alerts:
        schema("alert.schema.json").validate(alert)
    spikes = {a["scope"] for a in alerts if a["kind"] == "velocity_spike"}
    assert spikes == {"team=research", "key=research-agent"}
    assert any(a["kind"] == "unpriced_model" and "acme-llm-7b" in a["message"] for a in alerts)


class Gateway:
    def __init__(self, port: int) -> None:
        self.port = port

    def chat(self, key: str = "ads-key-0001") -> openai.types.chat.ChatCompletion:
        # who is calling comes from the key (gateway.keys), whatever the headers claim
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0,
                               default_headers={"x-team": "search"})
        return client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def until(predicate: Any, timeout_s: float = 10) -> None:
    """Wait until `predicate()` holds (a command takes a moment to reach the gateway)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except openai.APIStatusError:
            pass
        time.sleep(0.3)
    raise AssertionError("the gateway never got there")


def refused(call: Any, error: type[openai.APIStatusError], timeout_s: float = 10) -> openai.APIStatusError:
    """Call until the gateway refuses with `error` (a command takes a moment to reach it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            call()
        except error as exc:
            return exc
        time.sleep(0.3)
    raise AssertionError(f"the gateway never answered {error.__name__}")


def breaker(run: RunningPipeline, *args: str) -> str:
    done = spendstream("breaker", *args, "--kafka", run.bootstrap)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_example_gateway_obeys_the_kill_switch(
    pipeline: tuple[RunningPipeline, str], model_server: str, tmp_path: Path,
) -> None:
    run, _ = pipeline
    port = free_port()
    log = tmp_path / "gateway.log"
    config = tmp_path / "gateway.yaml"
    config.write_text(GATEWAY_KEYS)
    with log.open("w") as out:
        process = subprocess.Popen(
            [*SPENDSTREAM, "gateway", "--kafka", run.bootstrap, "--upstream", model_server.removesuffix("/v1"),
             "--port", str(port), "--config", str(config)], stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        read_until(process, log, "gateway on", timeout_s=30)
        gateway = Gateway(port)
        assert gateway.chat().model == "gpt-4o-2024-08-06"

        breaker(run, "trip", "--scope", "team=ads", "--action", "block", "--reason", "runaway test")
        assert "runaway test" in str(refused(gateway.chat, openai.RateLimitError))
        assert gateway.chat("search-key-01").model == "gpt-4o-2024-08-06"  # other teams unaffected
        assert "manual|team=ads" in breaker(run, "list")

        no_map = spendstream("breaker", "trip", "--scope", "team=ads", "--action", "downgrade", "--reason", "x",
                             "--kafka", run.bootstrap)
        assert no_map.returncode == 1 and "needs a model map" in no_map.stderr
        breaker(run, "trip", "--scope", "team=ads", "--action", "downgrade", "--downgrade", "gpt-4o=gpt-4o-mini",
                "--reason", "too dear")
        # the upstream is asked for the cheaper model
        until(lambda: gateway.chat().model == "gpt-4o-mini-2024-08-06")

        breaker(run, "trip", "--scope", "team=ads", "--action", "approved_only", "--reason", "needs sign-off")
        assert "needs sign-off" in str(refused(gateway.chat, openai.PermissionDeniedError))
        assert gateway.chat("vip-key-0001").model == "gpt-4o-2024-08-06"

        breaker(run, "reset", "--scope", "team=ads")
        until(lambda: gateway.chat().model == "gpt-4o-2024-08-06")
        assert "manual|team=ads" not in breaker(run, "list")
    finally:
        process.terminate()
        process.wait(timeout=10)
