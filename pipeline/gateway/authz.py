"""`spendstream authz`: the breaker decisions, in the protocols gateways already speak.

- HTTP (NGINX `auth_request`, Traefik `forwardAuth`, Envoy ext_authz HTTP mode): any method on
  `/check` or below it. 200 go on (with `x-spendstream-model` on a downgrade), 401 unknown caller,
  403 approval required, 429 blocked (`Retry-After` from the breaker's expiry, the reason in
  `x-spendstream-reason`).
- gRPC: Envoy's `envoy.service.auth.v3.Authorization/Check` (its protos vendored in `ext_authz/`), the same
  answers as an `OkHttpResponse` with the headers to set or a `DeniedHttpResponse`.

`/healthz` (503 once the command follower died) and `/metrics` are on the HTTP port. The caller
and the answer come from `identity.py`; the decision from the `BreakerClient`'s board. Once the
follower died the service exits (FollowerLost) for its supervisor to start it again; until then
every call is refused with 503 (`gateway.follower_lost: refuse`, the default: a breaker tripped
since would not be obeyed) or decided from the breakers last known (`last_known`).

Every request pays for one decision and nothing else: aiohttp's low-level server (no router, no
middleware, no access log), only the headers identity reads, and the allow answers prebuilt.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import grpc
from aiohttp import web
from google.rpc import code_pb2, status_pb2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics import Counter

from pipeline.gateway.client import BreakerClient
from pipeline.gateway.ext_authz import authorization_handler
from pipeline.gateway.ext_authz import ext_authz_pb2 as ext_authz
from pipeline.gateway.ext_authz.ext_authz_pb2 import HeaderValue, HeaderValueOption, HttpStatus
from pipeline.gateway.identity import (
    DECISION_HEADER,
    MODEL_HEADER,
    UNAVAILABLE,
    Answer,
    answer,
    identify,
    joined,
    model_of,
)
from pipeline.observability.metrics import AUTHZ_DECISIONS
from schemas.config import Config
from schemas.errors import SpendstreamError

#: the gRPC status of each HTTP status a refusal carries (Envoy logs it; the client sees the HTTP one)
_GRPC_CODES: Final[Mapping[int, int]] = {
    200: code_pb2.OK, 401: code_pb2.UNAUTHENTICATED, 403: code_pb2.PERMISSION_DENIED,
    429: code_pb2.RESOURCE_EXHAUSTED, 503: code_pb2.UNAVAILABLE}
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@functools.cache
def _counted(protocol: str, decision: str) -> Counter:
    """The counter's child: `labels` looks it up under a lock on every call."""
    return AUTHZ_DECISIONS.labels(protocol, decision)


class Authz:
    def __init__(self, client: BreakerClient, config: Config) -> None:
        self.client = client
        self._gateway = config.gateway
        self._required = config.attribution.required
        self._refuse_blind = config.gateway.follower_lost == "refuse"
        #: the request headers `check` reads (lower-case); a shell passes these only
        self.header_names: tuple[str, ...] = ("authorization", MODEL_HEADER,
                                              *(h.lower() for h in config.gateway.identity_headers.values()))

    def check(self, headers: Mapping[str, str], body: bytes, protocol: str) -> Answer:
        """The answer to one request, from its headers (names lower-case, repeats joined with `,`) and its body if
        the gateway passed it."""
        result = self._answer(headers, body)
        _counted(protocol, result.headers[DECISION_HEADER]).inc()
        return result

    def _answer(self, headers: Mapping[str, str], body: bytes) -> Answer:
        if self._refuse_blind and not self.client.following():
            return UNAVAILABLE
        caller = identify(headers, self._gateway, self._required)
        if caller is None:
            return answer(None, None, 0, None)
        board, now = self.client.board, time.time()
        decision = board.decide(caller.attribution, model_of(body) or headers.get(MODEL_HEADER, ""), now)
        expires = board.expires_s(decision.breaker_id) if decision.breaker_id else None
        return answer(caller, decision, now, expires)

    def health(self) -> web.Response:
        following = self.client.following()
        return web.json_response({"following": following, "breakers_in_force": len(self.client.board.in_force())},
                                 status=200 if following else 503)


def http_handler(authz: Authz) -> Handler:
    """`/check` and below it, `/healthz`, `/metrics`: for aiohttp's low-level server."""
    names = authz.header_names

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path == "/check" or path.startswith("/check/"):
            body = await request.read() if request.body_exists else b""
            result = authz.check(joined(request.headers, names), body, "http")
            return web.Response(status=result.status, headers=result.headers, body=result.body)
        if path == "/healthz":
            return authz.health()
        if path == "/metrics":
            return web.Response(body=generate_latest(), headers={"content-type": CONTENT_TYPE_LATEST})
        return web.Response(status=404)

    return handle


class _Authorization:
    """The servicer of `envoy.service.auth.v3.Authorization` (registered by `ext_authz.authorization_handler`)."""

    def __init__(self, authz: Authz) -> None:
        self._authz = authz

    async def Check(self, request: Any, _: grpc.aio.ServicerContext[Any, Any]) -> Any:  # the proto names it
        # a request without attributes reads as empty: no key, so an unknown caller's answer
        http = request.attributes.request.http
        # Envoy sends the names lower-case (HTTP/2) with repeats joined by `,`: the map is read as it is; with
        # `encode_raw_headers: true` it sends `header_map` instead, and `headers` is empty
        headers = raw_headers(http.header_map) if http.HasField("header_map") else http.headers
        return check_response(self._authz.check(headers, http.raw_body or http.body.encode(), "grpc"))


def raw_headers(header_map: Any) -> dict[str, str]:
    """Envoy's `header_map` (one entry a header line, values as bytes) as `headers` has them: repeats joined."""
    values: dict[str, list[str]] = {}
    for header in header_map.headers:
        values.setdefault(header.key.lower(), []).append(header.raw_value.decode(errors="replace") or header.value)
    return {name: ",".join(repeats) for name, repeats in values.items()}


def check_response(result: Answer) -> Any:
    return _check_response(result.status, tuple(result.headers.items()), result.body)


@functools.lru_cache(maxsize=256)
def _check_response(code: int, headers: tuple[tuple[str, str], ...], body: bytes) -> Any:
    """Envoy's answer. The same few answers recur, so each is built once (and never changed: grpc only reads it)."""
    # overwrite, not append: a client's own x-spendstream-model must not ride along
    options = [HeaderValueOption(header=HeaderValue(key=k, value=v),
                                 append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
               for k, v in headers]
    status = status_pb2.Status(code=_GRPC_CODES[code])
    if code == 200:
        return ext_authz.CheckResponse(status=status, ok_response=ext_authz.OkHttpResponse(headers=options))
    return ext_authz.CheckResponse(status=status, denied_response=ext_authz.DeniedHttpResponse(
        status=HttpStatus(code=code), headers=options, body=body.decode()))


class FollowerLost(SpendstreamError):
    """The command follower died: authz exits, so that its supervisor starts it again on the state in force."""


async def serve_authz(config: Config, *, host: str, http_port: int, grpc_port: int,
                      stop: asyncio.Event) -> None:
    """Serve both protocols until `stop` is set; raises FollowerLost once the command follower died."""
    client = BreakerClient(config.kafka)
    await client.start()
    try:
        await serve(Authz(client, config), host=host, http_port=http_port, grpc_port=grpc_port, stop=stop)
    finally:
        await client.stop()


async def serve(authz: Authz, *, host: str, http_port: int, grpc_port: int, stop: asyncio.Event) -> None:
    """Serve both protocols with a started client until `stop` is set or its follower died (FollowerLost):
    `spendstream run`, compose and Kubernetes restart a role that exits, not one that stays up blind."""
    runner = web.ServerRunner(web.Server(http_handler(authz), access_log=None))
    await runner.setup()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((authorization_handler(_Authorization(authz).Check),))
    try:
        await web.TCPSite(runner, host, http_port).start()
        if not server.add_insecure_port(f"{host}:{grpc_port}"):
            raise OSError(f"cannot listen on {host}:{grpc_port} (change it with --grpc-port)")
        await server.start()
        print(f"authz on http://{host}:{http_port}/check and grpc {host}:{grpc_port} "
              f"({len(authz.client.board.in_force())} breakers in force)", flush=True)
        stopped, lost = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(authz.client.lost())
        await asyncio.wait((stopped, lost), return_when=asyncio.FIRST_COMPLETED)
        for waiting in (stopped, lost):
            waiting.cancel()
        if not stop.is_set():
            raise FollowerLost("authz: stopped following the breaker commands; exiting to be started again")
    finally:
        await server.stop(grace=1)
        await runner.cleanup()
