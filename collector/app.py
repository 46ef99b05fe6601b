"""Composition root of the collector: publisher first, then the OTLP receivers; stop in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from aiohttp import web

from collector import metrics
from collector._grpc import PortInUse, start_grpc_server
from collector._http import build_http_app
from collector._tls import grpc_server_credentials, http_ssl_context
from collector.inflight import InflightBytes
from collector.publisher import KafkaPublisher, Publisher
from collector.service import TraceIngestService
from schemas.config import Config
from schemas.errors import ConfigError

if TYPE_CHECKING:
    from collector.forward import SpanForwarder

log = logging.getLogger(__name__)

#: An HMAC key shorter than this is refused: user ids would be guessable.
MIN_USER_KEY_BYTES = 16


@dataclass(frozen=True, slots=True)
class Endpoints:
    grpc_port: int
    http_port: int


def user_id_key(config: Config, environ: Mapping[str, str]) -> bytes | None:
    """The HMAC key for user ids from the environment; None when hashing is off or the variable is unset.

    Raises ConfigError when the variable is set but too short to be a secret.
    """
    attribution = config.attribution
    if not attribution.hash_user_ids:
        return None
    value = environ.get(attribution.user_id_key_env, "")
    if not value:
        log.warning("%s is not set: user ids (enduser.id, user.id) are dropped, not hashed; set it to a random "
                    "secret of at least %d bytes to keep them as HMAC pseudonyms", attribution.user_id_key_env,
                    MIN_USER_KEY_BYTES)
        return None
    key = value.encode()
    if len(key) < MIN_USER_KEY_BYTES:
        raise ConfigError([f"attribution.user_id_key_env: {attribution.user_id_key_env} holds {len(key)} bytes; "
                           f"a user-id key needs at least {MIN_USER_KEY_BYTES} (e.g. `openssl rand -hex 32`)"],
                          "environment")
    return key


def _forwarder(config: Config) -> SpanForwarder | None:
    """Processor mode's forwarder, priced as the workers price (the same catalog, built the same way).

    Imported here, not at the top: the price catalog (genai-prices) is loaded only by a collector that
    forwards; one that does not stays as lean as before (tests/unit/test_layout.py).
    """
    if config.collector.forward is None:
        return None
    from collector.forward import SpanForwarder  # noqa: PLC0415
    from pipeline.pricing import PriceCatalog  # noqa: PLC0415
    from pipeline.pricing.focus import Billing  # noqa: PLC0415

    return SpanForwarder(config.collector.forward, PriceCatalog.from_config(config), Billing.from_config(config))


class Collector:
    """The OTLP receiver. `start()` undoes itself on failure; `stop()` is safe twice and flushes."""

    def __init__(self, config: Config, publisher: Publisher | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self._config = config
        self._environ = os.environ if environ is None else environ
        self._publisher = publisher or KafkaPublisher(config.kafka, self._environ,
                                                      timeout_s=config.collector.publish_timeout_s)
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._service: TraceIngestService | None = None
        self.forwarder: SpanForwarder | None = None
        self.inflight = InflightBytes(config.collector.max_inflight_bytes)
        self.endpoints: Endpoints | None = None

    async def start(self) -> Endpoints:
        cfg = self._config.collector
        try:
            # certificates and keys first: a wrong file is a clear error before anything listens
            ssl_context = http_ssl_context(cfg.tls) if cfg.tls else None
            credentials = grpc_server_credentials(cfg.tls) if cfg.tls else None
            user_key = user_id_key(self._config, self._environ)
            self.forwarder = await asyncio.to_thread(_forwarder, self._config)
            service = self._service = TraceIngestService(self._config, self._publisher, user_key=user_key,
                                                         forwarder=self.forwarder)
            await self._publisher.start()
            if self.forwarder is not None:
                await self.forwarder.start()
            self._grpc, grpc_port = await start_grpc_server(
                service, cfg.host, cfg.grpc_port, max_request_bytes=cfg.max_request_bytes, inflight=self.inflight,
                credentials=credentials, min_tls=cfg.tls.min_version if cfg.tls else None)
            self._http = web.AppRunner(build_http_app(service, cfg.max_request_bytes, self.inflight),
                                       access_log=None, auto_decompress=False)
            await self._http.setup()
            site = web.TCPSite(self._http, cfg.host, cfg.http_port, ssl_context=ssl_context)
            try:
                await site.start()
            except OSError as exc:
                raise PortInUse(f"cannot listen for OTLP/HTTP on {cfg.host}:{cfg.http_port}: {exc.strerror} "
                                "(change it with --http-port)") from exc
            http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # bound port
        except BaseException:
            await self.stop()
            raise
        metrics.INFLIGHT_BYTES.set_function(lambda: self.inflight.held)
        self.endpoints = Endpoints(grpc_port, http_port)
        scheme = "TLS" + (" with client certificates" if cfg.tls and cfg.tls.client_ca_file else "") if cfg.tls \
            else "plaintext"
        log.info("collector listening on %s (%s): OTLP/gRPC :%d, OTLP/HTTP :%d", cfg.host, scheme, grpc_port,
                 http_port)
        return self.endpoints

    async def stop(self) -> None:
        server, self._grpc = self._grpc, None
        if server is not None:
            await server.stop(grace=2.0)  # in-flight calls finish and get their answer
        runner, self._http = self._http, None
        if runner is not None:
            await runner.cleanup()
        service, self._service = self._service, None
        if service is not None:
            await asyncio.to_thread(service.close)
        forwarder, self.forwarder = self.forwarder, None
        if forwarder is not None:
            await forwarder.stop()
        await self._publisher.stop()


async def serve(config: Config, stop: asyncio.Event) -> None:
    """Run a collector until `stop` is set."""
    collector = Collector(config)
    await collector.start()
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await collector.stop()
