"""`spendstream gateway`: a small OpenAI-compatible HTTP proxy that obeys the breakers. An example.

It shows the whole loop on one page: who is calling comes from the virtual key in
`Authorization: Bearer`, mapped by `gateway.keys` in the config (never from what the client says
about itself), the authz check (`authz.py`) says what to do, and the proxy

- refuses with its answer: 401 unknown key, 429 blocked, 403 approval required,
- or rewrites `model` to the cheaper one (header `x-spendstream-downgraded-from`)

and forwards everything else to the upstream, streamed as it arrives (SSE), with the upstream's
own API key (from the environment), not the client's virtual key. `/healthz` answers 503 once the
command follower died: its decisions would go stale. A real gateway (LiteLLM, Envoy, Kong) does the
same in its own request hook, or asks `spendstream authz`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import orjson
from aiohttp import ClientSession, ClientTimeout, web

from pipeline.gateway.authz import Authz
from pipeline.gateway.client import BreakerClient
from pipeline.gateway.identity import MODEL_HEADER, joined, model_of
from schemas.config import Config

#: upstream answer headers passed on: the rest (lengths, encodings, connection) are aiohttp's to set
_PASSED_ON = ("content-type", "cache-control", "x-request-id", "openai-processing-ms")


def make_app(authz: Authz, *, upstream: str, upstream_key: str | None) -> web.Application:
    session: dict[str, ClientSession] = {}

    async def forward(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        result = authz.check(joined(request.headers, authz.header_names), raw, "gateway")
        if result.status != 200:
            return web.Response(status=result.status, headers=result.headers, body=result.body)
        headers = dict(result.headers)
        model = model_of(raw)
        if MODEL_HEADER in headers and model is not None:
            headers["x-spendstream-downgraded-from"] = model
            raw = orjson.dumps(orjson.loads(raw) | {"model": headers[MODEL_HEADER]})
        forwarded = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept")}
        if upstream_key:
            forwarded["Authorization"] = f"Bearer {upstream_key}"
        async with session["upstream"].request(request.method, upstream.rstrip("/") + request.path_qs, data=raw,
                                               headers=forwarded) as answer:
            response = web.StreamResponse(status=answer.status, headers=headers | _passed_on(answer.headers))
            await response.prepare(request)
            async for chunk in answer.content.iter_any():  # as it arrives: SSE streams must not wait for the end
                await response.write(chunk)
            await response.write_eof()
            return response

    async def health(_: web.Request) -> web.Response:
        return authz.health()

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


def _passed_on(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() in _PASSED_ON}


async def serve_gateway(config: Config, *, upstream: str, port: int, upstream_key: str | None) -> None:
    """Serve until cancelled (Ctrl-C)."""
    client = BreakerClient(config.kafka)
    await client.start()
    runner = web.AppRunner(make_app(Authz(client, config), upstream=upstream, upstream_key=upstream_key))
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
