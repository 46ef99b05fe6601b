"""`spendstream authz`: the breaker decisions, in the protocols gateways already speak.

- HTTP (NGINX `auth_request`, Traefik `forwardAuth`, Envoy ext_authz HTTP mode): any method on
  `/check` or below it. 200 go on (with `x-spendstream-model` on a downgrade), 401 unknown caller,
  403 approval required, 429 blocked (`Retry-After` from the breaker's expiry, the reason in
  `x-spendstream-reason`).
- gRPC: Envoy's `envoy.service.auth.v3.Authorization/Check` (its protos vendored in `ext_authz/`), the same
  answers as an `OkHttpResponse` with the headers to set or a `DeniedHttpResponse`.

`/healthz` (503 once the command follower died) and `/metrics` are on the HTTP port. The caller
and the answer come from `identity.py`; the decision from the `BreakerClient`'s board.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Final

import grpc
from aiohttp import web
from google.rpc import code_pb2, status_pb2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.gateway.client import BreakerClient
from pipeline.gateway.ext_authz import authorization_handler
from pipeline.gateway.ext_authz import ext_authz_pb2 as ext_authz
from pipeline.gateway.ext_authz.ext_authz_pb2 import HeaderValue, HeaderValueOption, HttpStatus
from pipeline.gateway.identity import DECISION_HEADER, MODEL_HEADER, Answer, answer, identify, model_of
from pipeline.observability.metrics import AUTHZ_DECISIONS
from schemas.config import Config

#: the gRPC status of each HTTP status a refusal carries (Envoy logs it; the client sees the HTTP one)
_GRPC_CODES: Final[Mapping[int, int]] = {
    200: code_pb2.OK, 401: code_pb2.UNAUTHENTICATED, 403: code_pb2.PERMISSION_DENIED,
    429: code_pb2.RESOURCE_EXHAUSTED}


class Authz:
    def __init__(self, client: BreakerClient, config: Config) -> None:
        self.client = client
        self._gateway = config.gateway
        self._required = config.attribution.required

    def check(self, headers: Mapping[str, str], body: bytes, protocol: str) -> Answer:
        """The answer to one request, from its headers (names lower-case) and its body if the gateway passed it."""
        caller = identify(headers, self._gateway, self._required)
        board, now = self.client.board, time.time()
        decision = None if caller is None else \
            board.decide(caller.attribution, model_of(body) or headers.get(MODEL_HEADER, ""), now)
        expires = board.expires_s(decision.breaker_id) if decision and decision.breaker_id else None
        result = answer(caller, decision, now, expires)
        AUTHZ_DECISIONS.labels(protocol, result.headers[DECISION_HEADER]).inc()
        return result


def http_app(authz: Authz) -> web.Application:
    async def check(request: web.Request) -> web.Response:
        result = authz.check({k.lower(): v for k, v in request.headers.items()}, await request.read(), "http")
        return web.Response(status=result.status, headers=result.headers, body=result.body)

    async def health(_: web.Request) -> web.Response:
        following = authz.client.following()
        return web.json_response({"following": following, "breakers_in_force": len(authz.client.board.in_force())},
                                 status=200 if following else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"content-type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/check", check)
    app.router.add_route("*", "/check/{tail:.*}", check)
    return app


class _Authorization:
    """The servicer of `envoy.service.auth.v3.Authorization` (the generated base class is untyped)."""

    def __init__(self, authz: Authz) -> None:
        self._authz = authz

    async def Check(self, request: Any, _: grpc.aio.ServicerContext[Any, Any]) -> Any:  # the proto names it
        http = request.attributes.request.http
        headers = {k.lower(): v for k, v in http.headers.items()}
        result = self._authz.check(headers, http.raw_body or http.body.encode(), "grpc")
        return check_response(result)


def check_response(result: Answer) -> Any:
    # overwrite, not append: a client's own x-spendstream-model must not ride along
    options = [HeaderValueOption(header=HeaderValue(key=k, value=v),
                                 append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
               for k, v in result.headers.items()]
    status = status_pb2.Status(code=_GRPC_CODES[result.status])
    if result.status == 200:
        return ext_authz.CheckResponse(status=status, ok_response=ext_authz.OkHttpResponse(headers=options))
    return ext_authz.CheckResponse(status=status, denied_response=ext_authz.DeniedHttpResponse(
        status=HttpStatus(code=result.status), headers=options, body=result.body.decode()))


async def serve_authz(config: Config, *, host: str, http_port: int, grpc_port: int,
                      stop: asyncio.Event) -> None:
    """Serve both protocols until `stop` is set."""
    client = BreakerClient(config.kafka)
    await client.start()
    authz = Authz(client, config)
    runner = web.AppRunner(http_app(authz))
    await runner.setup()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((authorization_handler(_Authorization(authz).Check),))
    try:
        await web.TCPSite(runner, host, http_port).start()
        if not server.add_insecure_port(f"{host}:{grpc_port}"):
            raise OSError(f"cannot listen on {host}:{grpc_port} (change it with --grpc-port)")
        await server.start()
        print(f"authz on http://{host}:{http_port}/check and grpc {host}:{grpc_port} "
              f"({len(client.board.in_force())} breakers in force)", flush=True)
        await stop.wait()
    finally:
        await server.stop(grace=1)
        await runner.cleanup()
        await client.stop()
