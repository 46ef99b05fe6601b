"""`spendstream` command line: parse arguments, load config, call the role. No business logic here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path

from schemas.codec import parse_utc
from schemas.config import Config, load_config
from schemas.errors import ConfigError, SpendstreamError
from schemas.policy import Scope, duration_s

log = logging.getLogger("spendstream")
#: where `run` keeps state and logs, and where the exporter writes and `report` reads the FOCUS files
DEFAULT_DATA_DIR = "./spendstream-data"
#: a role's log file is rotated at this size; with the files kept, a role's logs stay under 40 MB
LOG_FILE_BYTES = 10 * 2**20
LOG_FILES_KEPT = 3


def _config(args: argparse.Namespace) -> Config:
    """The config file with command-line flags applied on top."""
    config = load_config(Path(args.config) if args.config else None)
    kafka = config.kafka
    if getattr(args, "kafka", None):
        kafka = replace(kafka, bootstrap_servers=args.kafka)
    if getattr(args, "partitions", None):
        kafka = replace(kafka, partitions=args.partitions)
    collector = config.collector
    if getattr(args, "host", None):
        collector = replace(collector, host=args.host)
    if getattr(args, "grpc_port", None) is not None:
        collector = replace(collector, grpc_port=args.grpc_port)
    if getattr(args, "http_port", None) is not None:
        collector = replace(collector, http_port=args.http_port)
    metrics = config.metrics
    if getattr(args, "metrics_port", None) is not None:
        metrics = replace(metrics, port=args.metrics_port)
    return replace(config, kafka=kafka, collector=collector, metrics=metrics)


def _add_common(p: argparse.ArgumentParser, *, kafka: bool = True) -> None:
    p.add_argument("--config", metavar="FILE", help="spendstream.yaml (default: built-in defaults)")
    if kafka:
        p.add_argument("--kafka", metavar="HOST:PORT",
                       help="Kafka bootstrap servers (overrides kafka.bootstrap_servers)")
    _add_log_level(p, "info")


def _add_host(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address the OTLP receivers listen on (overrides collector.host; default "
                   "127.0.0.1, this machine only; 0.0.0.0 listens on every interface)")


def _add_log_level(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--log-level", default=default, choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-file", metavar="FILE",
                   help=f"log to FILE instead of stderr, rotated at {LOG_FILE_BYTES // 2**20} MB "
                        f"({LOG_FILES_KEPT} kept)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spendstream", description="Real-time cost control for generative-AI traffic (OTLP in, Kafka out)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="everything on one machine: broker, topics, collector, workers")
    _add_common(run)
    run.add_argument("--workers", type=int, default=1, help="pipeline workers in the consumer group (default 1)")
    run.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"state, logs, files (default {DEFAULT_DATA_DIR})")
    run.add_argument("--broker-port", type=int, default=9092, help="embedded broker port (default 9092)")
    _add_host(run)
    run.add_argument("--grpc-port", type=int, help="OTLP/gRPC port (default 4317)")
    run.add_argument("--http-port", type=int, help="OTLP/HTTP port (default 4318)")
    run.add_argument("--metrics-port", type=int, help="Prometheus port of the collector (default 9464); "
                     "workers use the following ports")
    run.add_argument("--partitions", type=int, help="partitions per topic (default kafka.partitions)")

    collector = sub.add_parser("collector", help="the OTLP receiver alone")
    _add_common(collector)
    _add_host(collector)
    collector.add_argument("--grpc-port", type=int, help="OTLP/gRPC port (default 4317)")
    collector.add_argument("--http-port", type=int, help="OTLP/HTTP port (default 4318)")
    collector.add_argument("--metrics-port", type=int, help="Prometheus port (default 9464)")

    worker = sub.add_parser("worker", help="one pipeline worker (join the consumer groups)")
    _add_common(worker)
    worker.add_argument("--data-dir", help="where the exporter writes (DIR/focus/): read on a cold start to rebuild "
                        "budget totals, baselines and dedupe ids (default: none)")
    worker.add_argument("--metrics-port", type=int, help="Prometheus port (default 9465)")

    exporter = sub.add_parser("exporter", help="write genai.cost.focus into FOCUS Parquet files")
    _add_common(exporter)
    exporter.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="files go under DIR/focus/")
    exporter.add_argument("--metrics-port", type=int, help="Prometheus port (default 9464 + 2)")

    compact = sub.add_parser("compact", help="merge the small request files of closed charge dates into few "
                             "(the exporter does it every exporter.compact_every_s)")
    _add_common(compact, kafka=False)
    compact.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                         help=f"where the exporter writes (default {DEFAULT_DATA_DIR})")
    compact.add_argument("--all", action="store_true",
                         help="also the charge dates still open: today's, and those that ended less than "
                              "collector.max_lateness_s ago (a late row then starts a new small file)")

    report = sub.add_parser("report", help="top N by cost from the FOCUS files (DuckDB)")
    report.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help=f"where the exporter writes (default {DEFAULT_DATA_DIR})")
    report.add_argument("--by", default="team,use_case", help="comma-separated: team, use_case, env, app, key, "
                        "cost_center, provider, model, meter, service, day (default team,use_case)")
    report.add_argument("--since", help="from this UTC date or date-time (inclusive)")
    report.add_argument("--until", help="up to this UTC date or date-time (exclusive)")
    report.add_argument("--top", type=int, default=10, help="rows to show (default 10)")
    report.add_argument("--format", choices=["table", "csv", "json"], default="table")
    _add_log_level(report, "warning")

    price = sub.add_parser("price", help="what one call costs, and why")
    price.add_argument("model")
    price.add_argument("--input", type=int, required=True, help="input tokens, cached ones included")
    price.add_argument("--output", type=int, required=True, help="output tokens, reasoning included")
    price.add_argument("--cache-read", type=int, default=0)
    price.add_argument("--cache-write", type=int, default=0)
    price.add_argument("--reasoning", type=int, default=0)
    price.add_argument("--provider", help="e.g. openai, anthropic, aws.bedrock (default: found from the model)")
    price.add_argument("--service-tier", help="e.g. flex, priority, batch")
    price.add_argument("--at", metavar="DATE", help="price in force on this UTC date (default now)")
    price.add_argument("--config", metavar="FILE", help="spendstream.yaml for overrides and fx")
    _add_log_level(price, "warning")

    breaker = sub.add_parser("breaker", help="the kill switch: trip, reset or list circuit breakers")
    breaker_sub = breaker.add_subparsers(dest="breaker_command", required=True, metavar="ACTION")
    trip = breaker_sub.add_parser("trip", help="open a manual breaker for a scope")
    _add_common(trip)
    trip.add_argument("--scope", required=True, help="global, or dimension=value[,dimension=value…], "
                      "e.g. team=search or key=support-rag,env=prod")
    trip.add_argument("--action", required=True, choices=["block", "downgrade", "approved_only"])
    trip.add_argument("--reason", required=True, help="why: shown to operators and in gateway answers")
    trip.add_argument("--ttl", help="lift it by itself after this long: 30s, 15m, 1h (default: until reset)")
    trip.add_argument("--downgrade", action="append", default=[], metavar="FROM=TO",
                      help="model map for --action downgrade (default: the config's downgrade map)")
    reset = breaker_sub.add_parser("reset", help="close every breaker of a scope (manual, rate, budget)")
    _add_common(reset)
    reset.add_argument("--scope", required=True, help="as for trip")
    reset.add_argument("--reason", default="reset by hand", help="why (default: reset by hand)")
    listing = breaker_sub.add_parser("list", help="the breakers in force, from the compacted commands topic")
    _add_common(listing)
    listing.add_argument("--all", action="store_true", help="also closed and expired breakers")
    listing.add_argument("--format", choices=["table", "json"], default="table")

    gateway = sub.add_parser("gateway", help="example OpenAI-compatible gateway that obeys the breakers")
    _add_common(gateway)
    gateway.add_argument("--upstream", required=True, help="base URL of the model API, e.g. https://api.openai.com")
    gateway.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    gateway.add_argument("--approved-key", action="append", default=[], metavar="KEY",
                         help="virtual key allowed through an approved_only breaker (repeatable)")

    topics = sub.add_parser("topics", help="create the topics (idempotent)")
    _add_common(topics)
    topics.add_argument("--partitions", type=int, help="partitions per topic (default kafka.partitions)")

    demo = sub.add_parser("demo", help="send realistic GenAI traffic through the OpenTelemetry SDK")
    demo.add_argument("--endpoint", default="localhost:4317", help="OTLP/gRPC endpoint (default localhost:4317)")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds of traffic (default 30)")
    demo.add_argument("--rate", type=float, default=40.0, help="model calls per second, steady traffic (default 40)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    demo.add_argument("--token", help="ingest token to send as 'Authorization: Bearer'")
    demo.add_argument("--history", type=float, default=180.0, help="seconds of normal traffic to replay with past "
                      "timestamps first, so velocity has a baseline (default 180; 0: none)")
    _add_log_level(demo, "warning")
    return parser


def _serve_until_signal(coro_factory: object) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await coro_factory(stop)  # type: ignore[operator]

    asyncio.run(main())


def _cmd_collector(args: argparse.Namespace) -> None:
    from collector.app import serve  # noqa: PLC0415
    from pipeline.observability.endpoint import serve_metrics  # noqa: PLC0415

    config = _config(args)
    serve_metrics(config.metrics.port)
    _serve_until_signal(lambda stop: serve(config, stop))


def _cmd_worker(args: argparse.Namespace) -> None:
    from pipeline.cli.worker import run_worker  # noqa: PLC0415
    from pipeline.observability.endpoint import serve_metrics  # noqa: PLC0415

    config = _config(args)
    serve_metrics(args.metrics_port if args.metrics_port is not None else config.metrics.port + 1)
    config_path = Path(args.config) if args.config else None
    data_dir = Path(args.data_dir) if args.data_dir else None
    _serve_until_signal(lambda stop: run_worker(config, config_path, data_dir, stop))


def _cmd_exporter(args: argparse.Namespace) -> None:
    from pipeline.export.exporter import FocusExporter  # noqa: PLC0415
    from pipeline.observability.endpoint import serve_metrics  # noqa: PLC0415

    config = _config(args)
    serve_metrics(args.metrics_port if args.metrics_port is not None else config.metrics.port + 2)
    exporter = FocusExporter(config, Path(args.data_dir))
    _serve_until_signal(exporter.run)


def _cmd_compact(args: argparse.Namespace) -> None:
    from pipeline.export.compaction import compact  # noqa: PLC0415

    config = _config(args)
    done = compact(Path(args.data_dir), math.inf if args.all else time.time(), config.collector.max_lateness_s,
                   config.exporter.rollup)
    for day in done:
        print(f"charge_date={day.day}: {day.files_before:,} files -> {day.files_after:,} ({day.rows:,} rows)")
    if not done:
        print("nothing to compact: no closed charge date has more than one small file")


def _cmd_report(args: argparse.Namespace) -> None:
    from pipeline.cli.render import render_report  # noqa: PLC0415
    from pipeline.export.report import make_report  # noqa: PLC0415

    by = [b.strip() for b in args.by.split(",") if b.strip()]
    report = make_report(Path(args.data_dir), by, since=args.since, until=args.until, top=args.top)
    print(render_report(report, args.format))


def _cmd_price(args: argparse.Namespace) -> None:
    from pipeline.pricing.catalog import PriceCatalog, UnpricedError  # noqa: PLC0415
    from pipeline.pricing.explain import explain_price  # noqa: PLC0415

    catalog = PriceCatalog.from_config(_config(args))
    for flag in ("input", "output", "cache_read", "cache_write", "reasoning"):
        if getattr(args, flag) < 0:
            raise SpendstreamError(f"--{flag.replace('_', '-')} must not be negative")
    try:
        at = parse_utc(args.at) if args.at else datetime.now(UTC)
    except ValueError:
        raise SpendstreamError(f"--at: not a date or date-time: {args.at!r} (use e.g. 2026-11-01)") from None
    try:
        _, text = explain_price(catalog, args.model, input_tokens=args.input, output_tokens=args.output,
                                cache_read=args.cache_read, cache_write=args.cache_write, reasoning=args.reasoning,
                                provider=args.provider, at=at, service_tier=args.service_tier)
    except UnpricedError as exc:
        raise SpendstreamError(f"cannot price: {exc} ({exc.reason})") from None
    print(text)


def _cmd_topics(args: argparse.Namespace) -> None:
    from pipeline.kafka.topics import ensure_topics  # noqa: PLC0415

    config = _config(args)
    result = asyncio.run(ensure_topics(config.kafka, os.environ))
    for topic, state in sorted(result.items()):
        print(f"{topic}: {state}")


def _scope(text: str) -> Scope:
    try:
        return Scope.parse(text)
    except ValueError as exc:
        raise SpendstreamError(f"--scope: {exc}") from None


def _cmd_breaker(args: argparse.Namespace) -> None:
    from pipeline.cli.render import render_breakers  # noqa: PLC0415
    from pipeline.gateway import kill_switch  # noqa: PLC0415

    config = _config(args)
    now = time.time()
    if args.breaker_command == "list":
        latest = asyncio.run(kill_switch.latest_commands(config.kafka))
        shown = [c for c in latest.values() if args.all or kill_switch.in_force(c, now)]
        print(render_breakers(shown, args.format))
        return
    scope = _scope(args.scope)
    if args.breaker_command == "trip":
        downgrade = dict(config.policy.downgrade)
        for pair in args.downgrade:
            source, sep, target = pair.partition("=")
            if not sep or not source or not target:
                raise SpendstreamError(f"--downgrade: expected FROM=TO, got {pair!r}")
            downgrade[source] = target
        try:
            ttl = duration_s(args.ttl) if args.ttl else None
            commands = [kill_switch.trip_command(scope, args.action, args.reason, ttl_s=ttl, downgrade=downgrade,
                                                 now_s=now)]
        except ValueError as exc:
            raise SpendstreamError(str(exc)) from None
    else:
        commands = kill_switch.reset_commands(scope, args.reason, now)
    asyncio.run(kill_switch.publish(config.kafka, commands))
    for command in commands:
        print(f"{command.breaker_id}: {command.state} ({command.action}) — {command.reason}")


def _cmd_gateway(args: argparse.Namespace) -> None:
    from pipeline.gateway.proxy import serve_gateway  # noqa: PLC0415

    config = _config(args)
    asyncio.run(serve_gateway(config.kafka, upstream=args.upstream, port=args.port,
                              approved_keys=frozenset(args.approved_key)))


def _cmd_run(args: argparse.Namespace) -> None:
    from pipeline.cli.runtime import run_all  # noqa: PLC0415

    config = _config(args)
    raise SystemExit(run_all(config, workers=args.workers, data_dir=Path(args.data_dir),
                             broker_port=None if args.kafka else args.broker_port,
                             config_path=args.config, log_level=args.log_level))


def _cmd_demo(args: argparse.Namespace) -> None:
    from pipeline.cli.demo import run_demo  # noqa: PLC0415

    run_demo(endpoint=args.endpoint, duration_s=args.duration, rate_per_s=args.rate, seed=args.seed,
             token=args.token, history_s=args.history)


COMMANDS = {"run": _cmd_run, "collector": _cmd_collector, "worker": _cmd_worker, "exporter": _cmd_exporter,
            "topics": _cmd_topics, "demo": _cmd_demo, "report": _cmd_report, "compact": _cmd_compact,
            "price": _cmd_price, "breaker": _cmd_breaker, "gateway": _cmd_gateway}


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, args.log_file)
    try:
        COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"spendstream: invalid configuration {exc.source}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None
    except (SpendstreamError, OSError) as exc:
        print(f"spendstream: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception:
        # into the (rotated) log the supervisor points at, not only to a stderr nobody reads
        log.exception("spendstream %s crashed", args.command)
        raise SystemExit(1) from None


def configure_logging(level: str, log_file: str | None, *, max_bytes: int = LOG_FILE_BYTES) -> None:
    handlers: list[logging.Handler] = []
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=LOG_FILES_KEPT))
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers or None, force=True)
