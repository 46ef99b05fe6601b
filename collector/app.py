"""Composition root of the collector: publisher first, then the OTLP receivers; stop in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass

import grpc
from aiohttp import web

from collector._grpc import PortInUse, start_grpc_server
from collector._http import build_http_app
from collector.publisher import KafkaPublisher, Publisher
from collector.service import TraceIngestService
from schemas.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Endpoints:
    grpc_port: int
    http_port: int


class Collector:
    """The OTLP receiver. `start()` undoes itself on failure; `stop()` is safe twice and flushes."""

    def __init__(self, config: Config, publisher: Publisher | None = None) -> None:
        self._config = config
        self._publisher = publisher or KafkaPublisher(config.kafka, os.environ,
                                                      timeout_s=config.collector.publish_timeout_s)
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self.endpoints: Endpoints | None = None

    async def start(self) -> Endpoints:
        cfg = self._config.collector
        service = TraceIngestService(self._config, self._publisher)
        try:
            await self._publisher.start()
            self._grpc, grpc_port = await start_grpc_server(service, cfg.host, cfg.grpc_port,
                                                            cfg.max_request_bytes)
            self._http = web.AppRunner(build_http_app(service, cfg.max_request_bytes), access_log=None)
            await self._http.setup()
            site = web.TCPSite(self._http, cfg.host, cfg.http_port)
            try:
                await site.start()
            except OSError as exc:
                raise PortInUse(f"cannot listen for OTLP/HTTP on {cfg.host}:{cfg.http_port}: {exc.strerror} "
                               "(change it with --http-port)") from exc
            http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # bound port
        except BaseException:
            await self.stop()
            raise
        self.endpoints = Endpoints(grpc_port, http_port)
        log.info("collector listening: OTLP/gRPC :%d, OTLP/HTTP :%d", grpc_port, http_port)
        return self.endpoints

    async def stop(self) -> None:
        server, self._grpc = self._grpc, None
        if server is not None:
            await server.stop(grace=2.0)  # in-flight calls finish and get their answer
        runner, self._http = self._http, None
        if runner is not None:
            await runner.cleanup()
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
