"""`spendstream authz`'s shells (authz.py): what reaches identity over HTTP and gRPC, malformed requests, and the
answer once the command follower died. The board stays empty: the breakers' own tests are test_breaker_board."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from aiohttp.test_utils import RawTestServer

from pipeline.gateway.authz import Authz, _Authorization, http_handler
from pipeline.gateway.client import BreakerClient
from pipeline.gateway.ext_authz import authorization_handler, check_stub
from pipeline.gateway.ext_authz import ext_authz_pb2 as ext_authz
from schemas.config import KafkaConfig, config_from_dict

KEYS = {"sk-search-0001": {"team": "search", "key": "search-bot"}, "sk-ads-000001": {"team": "ads", "key": "ads"}}


def authz(**gateway: object) -> Authz:
    """Its client is never started: no follower, as when it died."""
    return Authz(BreakerClient(KafkaConfig()), config_from_dict({"gateway": {"keys": KEYS, **gateway}}))


async def http(service: Authz, *headers: str) -> tuple[int, str]:
    """A POST with these header lines, written by hand: HTTP clients fold repeated headers into one."""
    async with RawTestServer(http_handler(service)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        body = b'{"model": "gpt-4o"}'
        lines = ["POST /check/v1/chat/completions HTTP/1.1", "Host: authz", f"Content-Length: {len(body)}",
                 "Connection: close", *headers]
        writer.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        answer = (await reader.read()).decode()
        writer.close()
    status = int(answer.split()[1])
    decision = next(line.split(":", 1)[1].strip() for line in answer.splitlines()
                    if line.lower().startswith("x-spendstream-decision:"))
    return status, decision


async def check(service: Authz, request: ext_authz.CheckRequest) -> ext_authz.CheckResponse:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((authorization_handler(_Authorization(service).Check),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer: ext_authz.CheckResponse = await check_stub(channel)(request, timeout=30)
            return answer
    finally:
        await server.stop(grace=None)


def test_two_keys_in_two_headers_are_refused_not_one_picked() -> None:
    service = authz(follower_lost="last_known", unknown_keys="unallocated")
    assert asyncio.run(http(service, "Authorization: Bearer sk-search-0001")) == (200, "allow")
    assert asyncio.run(http(service, "Authorization: Bearer sk-search-0001",
                            "authorization: Bearer sk-ads-000001")) == (401, "unknown_key")


def body_only() -> ext_authz.CheckRequest:
    request = ext_authz.CheckRequest()
    request.attributes.request.http.body = "{not json"
    return request


@pytest.mark.parametrize("request_", [ext_authz.CheckRequest(), body_only()])
def test_a_check_without_attributes_is_an_unknown_caller(request_: ext_authz.CheckRequest) -> None:
    answer = asyncio.run(check(authz(follower_lost="last_known"), request_))
    assert answer.status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert answer.denied_response.status.code == 401


def test_envoy_raw_headers_are_read_and_repeats_refused() -> None:
    """`encode_raw_headers: true`: the headers come in `header_map`, one entry a line."""
    service = authz(follower_lost="last_known")
    request = ext_authz.CheckRequest()
    lines = request.attributes.request.http.header_map.headers
    lines.add(key="authorization", raw_value=b"Bearer sk-search-0001")
    assert asyncio.run(check(service, request)).HasField("ok_response")
    lines.add(key="Authorization", raw_value=b"Bearer sk-ads-000001")
    assert asyncio.run(check(service, request)).denied_response.status.code == 401


def test_without_the_follower_every_call_is_refused_unless_told_otherwise() -> None:
    refusing = authz()
    assert asyncio.run(http(refusing, "Authorization: Bearer sk-search-0001")) == (503, "unavailable")
    request = ext_authz.CheckRequest()
    request.attributes.request.http.headers["authorization"] = "Bearer sk-search-0001"
    answer = asyncio.run(check(refusing, request))
    assert answer.status.code == grpc.StatusCode.UNAVAILABLE.value[0] and answer.denied_response.status.code == 503
    assert asyncio.run(check(authz(follower_lost="last_known"), request)).HasField("ok_response")
