"""Gateways obey the breakers, with identity nobody can fake: real NGINX (`deploy/nginx/spendstream.conf`, as
shipped) in front of a fake OpenAI-compatible server, the real `openai` client through it, `spendstream authz`
deciding; a real gRPC client speaking Envoy's `Check` proto (`deploy/envoy/ext_authz.yaml` points there); and
SSE streaming through the example gateway. One authz, one NGINX, one gateway for the module."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import msgspec
import openai
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from pipeline.gateway import kill_switch
from pipeline.gateway.authz import Authz, FollowerLost, serve
from pipeline.gateway.client import BreakerClient
from pipeline.gateway.ext_authz import check_stub
from pipeline.gateway.ext_authz import ext_authz_pb2 as ext_authz
from pipeline.gateway.proxy import make_app
from pipeline.kafka.broker import EmbeddedBroker
from schemas.breaker import BreakerAction
from schemas.config import Config, KafkaConfig
from schemas.policy import Scope
from tests.conftest import new_topics
from tests.e2e.running import read_until, spendstream
from tests.support import free_port

pytestmark = pytest.mark.integration
DEPLOY = Path(__file__).parents[2] / "deploy"
KEYS = {"sk-search-0001": {"team": "search", "use_case": "rag", "env": "prod", "key": "search-bot"},
        "sk-ads-000001": {"team": "ads", "use_case": "copy", "env": "prod", "key": "ads-bot"},
        "sk-vip-000001": {"team": "ads", "use_case": "oncall", "env": "prod", "key": "vip"}}
FAKE_IDENTITY = {"x-team": "ads", "x-key": "ads-bot", "x-use-case": "copy", "x-env": "dev"}


@dataclass
class Upstream:
    """A fake OpenAI-compatible model server that remembers what reached it. A `stream` request sends its first
    SSE chunk, then holds the rest until `release` is set."""

    seen: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {k.lower(): v for k, v in self.headers.items()}
                upstream.seen.append((headers, body))
                # an LLM proxy upstream of NGINX applies the downgrade it is told
                model = headers.get("x-spendstream-model") or body["model"]
                if body.get("stream"):
                    self._stream(model)
                    return
                data = json.dumps({
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 1767225600, "model": model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, model: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for word in ("first", "second"):
                    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1767225600, "model": model,
                             "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
                    self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())
                    upstream.release.wait(60)
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")
                upstream.finished.set()

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@dataclass(frozen=True)
class Stack:
    kafka: KafkaConfig
    upstream: Upstream
    authz_port: int
    grpc_port: int
    nginx_port: int
    gateway_port: int
    upstream_port: int
    config: Path


def _start(args: list[str], log: Path, marker: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    with log.open("w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, **(env or {})})
    read_until(process, log, marker, timeout_s=60)
    return process


def nginx_conf(tmp: Path, *, listen: int, authz: int, upstream: int) -> Path:
    """The shipped snippet, its three addresses replaced, inside a minimal nginx.conf of our own (own prefix, no
    daemon, no master: an ordinary process of the test's user)."""
    snippet = (DEPLOY / "nginx" / "spendstream.conf").read_text()
    for shipped, ours in (("127.0.0.1:9480", f"127.0.0.1:{authz}"), ("127.0.0.1:4000", f"127.0.0.1:{upstream}"),
                          ("listen 8080;", f"listen 127.0.0.1:{listen};")):
        assert shipped in snippet
        snippet = snippet.replace(shipped, ours)
    (tmp / "spendstream.conf").write_text(snippet)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""daemon off; master_process off; pid {tmp}/nginx.pid; error_log {tmp}/error.log info;
events {{}}
http {{
  access_log {tmp}/access.log;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  include {tmp}/spendstream.conf;
}}
""")
    return conf


def listening(port: int, process: subprocess.Popen[str], log: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nginx is not listening on {port}:\n{log.read_text() if log.exists() else ''}")


@pytest.fixture(scope="module")
def stack(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed: run `make nginx` (Debian's package)")
    tmp = tmp_path_factory.mktemp("gateways")
    names = new_topics(broker.bootstrap_servers)
    kafka = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic_prefix=names.prefix)
    config = tmp / "spendstream.yaml"
    config.write_text(yaml.safe_dump({"kafka": {"topic_prefix": names.prefix},
                                      "gateway": {"keys": KEYS, "approved_keys": ["vip"]}}))
    upstream = Upstream()
    server = ThreadingHTTPServer(("127.0.0.1", 0), upstream.handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ports = [free_port() for _ in range(4)]
    common = ["--kafka", broker.bootstrap_servers, "--config", str(config)]
    processes = []
    try:
        processes.append(_start([sys.executable, "-m", "pipeline", "authz", *common, "--port", str(ports[0]),
                                 "--grpc-port", str(ports[1])], tmp / "authz.log", "authz on"))
        conf = nginx_conf(tmp, listen=ports[2], authz=ports[0], upstream=server.server_address[1])
        processes.append(subprocess.Popen([nginx, "-p", str(tmp), "-c", str(conf)], text=True))
        listening(ports[2], processes[-1], tmp / "error.log")
        processes.append(_start([sys.executable, "-m", "pipeline", "gateway", *common, "--port", str(ports[3]),
                                 "--upstream", f"http://127.0.0.1:{server.server_address[1]}",
                                 "--upstream-key-env", "TEST_UPSTREAM_KEY"],
                                tmp / "gateway.log", "gateway on", {"TEST_UPSTREAM_KEY": "sk-gateway-upstream"}))
        yield Stack(kafka, upstream, ports[0], ports[1], ports[2], ports[3], server.server_address[1], config)
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
        server.shutdown()


def trip(stack: Stack, scope: str, action: BreakerAction, reason: str, ttl_s: int | None = None) -> None:
    command = kill_switch.trip_command(Scope.parse(scope), action, reason, ttl_s=ttl_s,
                                       downgrade={"gpt-4o": "gpt-4o-mini"}, now_s=time.time())
    asyncio.run(kill_switch.publish(stack.kafka, [command]))


def reset(stack: Stack, scope: str) -> None:
    asyncio.run(kill_switch.publish(stack.kafka, kill_switch.reset_commands(Scope.parse(scope), "test", time.time())))


def chat(port: int, key: str, headers: dict[str, str] | None = None) -> openai.types.chat.ChatCompletion:
    # NGINX cannot pass the body to authz: the app names its model in a header, as the snippet says
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0,
                           default_headers={"x-spendstream-model": "gpt-4o", **(headers or {})})
    return client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def check(stack: Stack, key: str, model: str = "gpt-4o", **claimed: str) -> Any:
    """Envoy's `Check`, as the ext_authz filter sends it with `with_request_body`."""
    request = ext_authz.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "POST", "/v1/chat/completions"
    http.headers.update({"authorization": f"Bearer {key}", **claimed})
    http.body = json.dumps({"model": model, "messages": []})
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        return check_stub(channel)(request, timeout=10)


def until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    """A command takes a moment to reach authz."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except openai.APIStatusError:
            pass
        time.sleep(0.2)
    raise AssertionError("never got there")


def refusal(port: int, key: str, error: type[openai.APIStatusError], **headers: str) -> openai.APIStatusError:
    caught: list[openai.APIStatusError] = []

    def refused() -> bool:
        try:
            chat(port, key, headers)
        except error as exc:
            caught.append(exc)
            return True
        return False

    until(refused)
    return caught[0]


def test_a_block_refuses_the_team_whatever_its_calls_claim(stack: Stack) -> None:
    trip(stack, "team=Search ", "block", "runaway agent", ttl_s=600)  # case and blanks do not matter
    # and the breaker stage 2 opened for the same runaway, named by the calls' own spelling
    automatic = kill_switch.trip_command(Scope.parse("team=search"), "block", "runaway agent", ttl_s=600,
                                         downgrade={}, now_s=time.time())
    asyncio.run(kill_switch.publish(stack.kafka, [msgspec.structs.replace(
        automatic, source="rate", breaker_id="rate|team=Search", scope="team=Search")]))
    blocked = refusal(stack.nginx_port, "sk-search-0001", openai.RateLimitError, **FAKE_IDENTITY)
    assert "runaway agent" in str(blocked)
    assert 590 <= int(blocked.response.headers["retry-after"]) <= 600
    assert blocked.response.headers["x-spendstream-reason"] == "runaway agent"
    assert chat(stack.nginx_port, "sk-ads-000001", {"x-team": "search"}).model == "gpt-4o"  # other teams go on
    # other spellings of the path are refused or not served, never passed to the model unasked
    seen = len(stack.upstream.seen)
    for path in ("/V1/chat/completions", "//v1/chat/completions", "/v1/../v1/chat/completions",
                 "/%76%31/chat/completions", "/v1/chat/completions?api_key=sk-ads-000001"):
        connection = http.client.HTTPConnection("127.0.0.1", stack.nginx_port, timeout=10)
        connection.request("POST", path, body=b'{"model": "gpt-4o"}', headers={
            "Authorization": "Bearer sk-search-0001", "Content-Type": "application/json", "X-Forwarded-For": "10.0.0.1",
            "X-Original-URI": "/healthz", "Host": "authz"})
        assert connection.getresponse().status in (404, 429), path
        connection.close()
    assert len(stack.upstream.seen) == seen
    denied = check(stack, "sk-search-0001", **FAKE_IDENTITY)
    assert denied.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert denied.denied_response.status.code == 429
    assert "runaway agent" in denied.denied_response.body
    assert check(stack, "sk-ads-000001", **{"x-team": "search"}).HasField("ok_response")
    # an unknown or missing key is refused, not let through as whoever it claims to be
    with pytest.raises(openai.AuthenticationError):
        chat(stack.nginx_port, "sk-made-up-key", FAKE_IDENTITY)
    assert check(stack, "sk-made-up-key").denied_response.status.code == 401
    # an operator's reset, as typed: it lifts the trip and stage 2's breaker of the calls' own spelling
    done = spendstream("breaker", "reset", "--kafka", stack.kafka.bootstrap_servers, "--config", str(stack.config),
                       "--scope", "team=SEARCH")
    assert done.returncode == 0 and "rate|team=Search: closed" in done.stdout, done.stderr
    until(lambda: chat(stack.nginx_port, "sk-search-0001").model == "gpt-4o")
    assert check(stack, "sk-search-0001").HasField("ok_response")


def test_approved_only_lets_only_approved_keys_through(stack: Stack) -> None:
    trip(stack, "team=ads", "approved_only", "needs sign-off")
    assert "needs sign-off" in str(refusal(stack.nginx_port, "sk-ads-000001", openai.PermissionDeniedError,
                                           **{"x-key": "vip"}))
    assert chat(stack.nginx_port, "sk-vip-000001").model == "gpt-4o"
    assert check(stack, "sk-ads-000001", **{"x-key": "vip"}).denied_response.status.code == 403
    assert check(stack, "sk-vip-000001").HasField("ok_response")
    reset(stack, "team=ads")
    until(lambda: chat(stack.nginx_port, "sk-ads-000001").model == "gpt-4o")


def test_a_downgrade_reaches_the_upstream(stack: Stack) -> None:
    trip(stack, "team=ads", "downgrade", "over budget")
    until(lambda: chat(stack.nginx_port, "sk-ads-000001").model == "gpt-4o-mini")
    headers, _ = stack.upstream.seen[-1]
    assert headers["x-spendstream-model"] == "gpt-4o-mini"
    assert headers["authorization"] == "Bearer sk-upstream-key"  # the gateway's key, not the client's
    ok = check(stack, "sk-ads-000001")
    assert {(h.header.key, h.header.value) for h in ok.ok_response.headers} >= {("x-spendstream-model", "gpt-4o-mini")}
    # Envoy's and Traefik's HTTP mode: the original path under /check, the body passed, no model header
    envoy_http = urllib.request.Request(f"http://127.0.0.1:{stack.authz_port}/check/v1/chat/completions",
                                        data=b'{"model": "gpt-4o"}', headers={"authorization": "Bearer sk-ads-000001"})
    with urllib.request.urlopen(envoy_http, timeout=10) as answer:
        assert answer.headers["x-spendstream-model"] == "gpt-4o-mini"
    # the example gateway rewrites the body itself
    until(lambda: chat(stack.gateway_port, "sk-ads-000001").model == "gpt-4o-mini")
    headers, body = stack.upstream.seen[-1]
    assert body["model"] == "gpt-4o-mini" and headers["authorization"] == "Bearer sk-gateway-upstream"
    assert chat(stack.nginx_port, "sk-search-0001").model == "gpt-4o"
    reset(stack, "team=ads")
    until(lambda: chat(stack.nginx_port, "sk-ads-000001").model == "gpt-4o")


def test_the_example_gateway_streams_before_the_upstream_finishes(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.gateway_port}/v1", api_key="sk-ads-000001",
                           max_retries=0)
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.content == "first"
    assert not stack.upstream.finished.is_set()  # the upstream is still holding the rest back
    stack.upstream.release.set()
    assert [c.choices[0].delta.content for c in stream] == ["second"]


def test_health_and_metrics(stack: Stack) -> None:
    ask = urllib.request.Request(f"http://127.0.0.1:{stack.authz_port}/check",
                                 headers={"authorization": "Bearer sk-ads-000001"})
    with urllib.request.urlopen(ask, timeout=10) as answer:
        assert answer.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.authz_port}/healthz", timeout=10) as answer:
        assert json.loads(answer.read())["following"] is True
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.authz_port}/metrics", timeout=10) as answer:
        assert 'spendstream_authz_decisions_total{decision="allow",protocol="http"}' in answer.read().decode()
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.gateway_port}/healthz", timeout=10) as answer:
        assert answer.status == 200


def test_once_the_command_follower_died_health_fails_and_authz_exits(stack: Stack) -> None:
    async def main() -> None:
        client = BreakerClient(stack.kafka)
        await client.start()
        authz, port, stop = Authz(client, Config(kafka=stack.kafka)), free_port(), asyncio.Event()
        serving = asyncio.create_task(serve(authz, host="127.0.0.1", http_port=port, grpc_port=free_port(), stop=stop))
        example = make_app(authz, upstream="http://127.0.0.1:9", upstream_key=None)
        async with TestClient(TestServer(example)) as gateway, aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while not await _healthy(session, f"http://127.0.0.1:{port}/healthz") and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert (await gateway.get("/healthz")).status == 200
            assert client._consumer is not None
            await client._consumer.stop()  # the follower's consumer fails under it, as when its broker is lost
            with pytest.raises(FollowerLost):  # for its supervisor to start it again on the state in force
                await asyncio.wait_for(serving, 30)
            assert (await gateway.get("/healthz")).status == 503
            # the example gateway, which stays up, refuses as authz's default says
            assert (await gateway.post("/v1/chat/completions", headers={"authorization": "Bearer sk-ads-000001"},
                                       json={"model": "gpt-4o"})).status == 503
        await client.stop()

    asyncio.run(main())


async def _healthy(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as answer:
            return answer.status == 200
    except aiohttp.ClientConnectionError:
        return False


def test_nginx_refuses_when_authz_does_not_answer(stack: Stack, tmp_path: Path) -> None:
    """Fail closed, as the snippet ships: an unverified caller never reaches the model."""
    nginx, port, seen = shutil.which("nginx") or "/usr/sbin/nginx", free_port(), len(stack.upstream.seen)
    conf = nginx_conf(tmp_path, listen=port, authz=free_port(), upstream=stack.upstream_port)
    process = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(conf)], text=True)
    try:
        listening(port, process, tmp_path / "error.log")
        with pytest.raises(openai.InternalServerError) as refused:
            chat(port, "sk-ads-000001")
        assert refused.value.status_code == 503 and "spendstream_unavailable" in str(refused.value)
        assert len(stack.upstream.seen) == seen
    finally:
        process.terminate()
        process.wait(10)


def test_the_envoy_snippet_points_at_the_check_service() -> None:
    envoy = yaml.safe_load((DEPLOY / "envoy" / "ext_authz.yaml").read_text())
    authz = envoy["http_filters"][0]["typed_config"]
    assert authz["transport_api_version"] == "V3" and authz["with_request_body"]  # the body carries the model
    address = envoy["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"]["port_value"] == 9481  # `spendstream authz`'s default --grpc-port
