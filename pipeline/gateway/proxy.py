"""`spendstream gateway`: a small OpenAI-compatible HTTP proxy that obeys the breakers. An example.

It shows the whole loop on one page: who is calling comes from the request (virtual key in
`Authorization: Bearer`, team / use case / env / app in `x-team`, `x-use-case`, `x-env`,
`x-app` headers), `BreakerClient.decide` says what to do, and the proxy

- blocks with 429 and the breaker's reason,
- answers 403 `approval_required` unless the key is an approved client,
- or rewrites `model` to the cheaper one (header `x-spendstream-downgraded-from`)

and forwards everything else to the upstream unchanged. A real gateway (LiteLLM, Envoy, Kong)
does the same in its own request hook.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import orjson
from aiohttp import ClientSession, ClientTimeout, web

from pipeline.gateway.board import Decision
from pipeline.gateway.client import BreakerClient
from schemas.config import KafkaConfig

ATTRIBUTION_HEADERS = {"x-team": "team", "x-use-case": "use_case", "x-env": "env", "x-app": "app",
                       "x-cost-center": "cost_center"}


def attribution_of(headers: Mapping[str, str]) -> dict[str, str]:
    attribution = {dim: headers[h] for h, dim in ATTRIBUTION_HEADERS.items() if headers.get(h)}
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and auth[7:].strip():
        attribution["key"] = auth[7:].strip()
    return attribution


def _refusal(status: int, kind: str, decision: Decision) -> web.Response:
    body = {"error": {"type": kind, "message": decision.reason, "breaker": decision.breaker_id}}
    return web.json_response(body, status=status, headers={"x-spendstream-decision": decision.verdict},
                             dumps=lambda o: orjson.dumps(o).decode())


def make_app(client: BreakerClient, *, upstream: str, approved_keys: frozenset[str]) -> web.Application:
    session: dict[str, ClientSession] = {}

    async def forward(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            return web.json_response({"error": {"type": "invalid_request", "message": "body is not JSON"}},
                                     status=400)
        attribution = attribution_of(request.headers)
        model = str(body.get("model", "")) if isinstance(body, dict) else ""
        decision = client.decide(attribution, model)
        headers: dict[str, str] = {"x-spendstream-decision": decision.verdict}
        if decision.verdict == "block":
            return _refusal(429, "spendstream_blocked", decision)
        if decision.verdict == "approval_required" and attribution.get("key") not in approved_keys:
            return _refusal(403, "approval_required", decision)
        if decision.verdict == "downgrade" and isinstance(body, dict):
            headers["x-spendstream-downgraded-from"] = model
            body["model"] = decision.model
            raw = orjson.dumps(body)
        forwarded = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with session["upstream"].request(request.method, upstream.rstrip("/") + request.path_qs, data=raw,
                                               headers=forwarded) as answer:
            payload = await answer.read()
            return web.Response(body=payload, status=answer.status, headers=headers,
                                content_type=answer.content_type)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"breakers_in_force": len(client.board.in_force())})

    async def open_session(_: web.Application) -> None:
        session["upstream"] = ClientSession(timeout=ClientTimeout(total=300))

    async def close_session(_: web.Application) -> None:
        await session["upstream"].close()

    app = web.Application()
    app.router.add_get("/healthz", health)
    app.router.add_route("*", "/v1/{tail:.*}", forward)
    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    return app


async def serve_gateway(kafka: KafkaConfig, *, upstream: str, port: int, approved_keys: frozenset[str]) -> None:
    """Serve until cancelled (Ctrl-C)."""
    client = BreakerClient(kafka)
    await client.start()
    runner = web.AppRunner(make_app(client, upstream=upstream, approved_keys=approved_keys))
    await runner.setup()
    try:
        await web.TCPSite(runner, "0.0.0.0", port).start()
    except OSError as exc:
        await runner.cleanup()
        await client.stop()
        raise OSError(exc.errno, f"cannot listen on :{port}: {exc.strerror} (change it with --port)") from exc
    print(f"gateway on http://localhost:{port}/v1 → {upstream} ({len(client.board.in_force())} breakers in force)",
          flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await client.stop()
