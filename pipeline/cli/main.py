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
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from pipeline.cli.startup import LOG_FILE_BYTES, LOG_FILES_KEPT, LOG_FORMATS, configure_logging, load, version
from schemas.codec import parse_utc
from schemas.config import Config
from schemas.errors import ConfigError, SpendstreamError
from schemas.policy import Scope, duration_s

log = logging.getLogger("spendstream")
#: where `run` keeps state and logs, and where the exporter writes and `report` reads the FOCUS files
DEFAULT_DATA_DIR = "./spendstream-data"


def _config(args: argparse.Namespace) -> Config:
    return _load(args)[0]


def _load(args: argparse.Namespace, *, announce: bool = True) -> tuple[Config, Path | None]:
    """The config (file, then environment) with command-line flags applied on top, and the file it came from;
    logs the start-up line naming them unless `announce` is off (`run` shows it in its banner)."""
    config, path, line = load(args.config)
    if announce:
        log.info("%s", line)
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
    return replace(config, kafka=kafka, collector=collector, metrics=metrics), path


#: flags every command takes, before or after its name
_GLOBAL_FLAGS: dict[str, dict[str, Any]] = {
    "--config": {"metavar": "FILE", "help": "spendstream.yaml (default: $SPENDSTREAM_CONFIG, then ./spendstream.yaml, "
                 "then built-in defaults); SPENDSTREAM_* variables override it (docs/configuration.md)"},
    "--log-level": {"choices": ["debug", "info", "warning", "error"],
                    "help": "default info (warning for report, price and demo)"},
    "--log-file": {"metavar": "FILE", "help": f"log to FILE instead of stderr, rotated at {LOG_FILE_BYTES // 2**20} "
                   f"MB ({LOG_FILES_KEPT} kept)"},
    "--log-format": {"choices": LOG_FORMATS, "help": "text (default) or json: one object a line, the same for every "
                     "role"},
}


def _add_globals(p: argparse.ArgumentParser, *, default: object) -> None:
    """`default` is argparse.SUPPRESS on the subcommands, so a flag given before the subcommand is not reset by
    the subcommand's parser; a subcommand that declares one of them itself keeps its own, with that default."""
    for flag, options in _GLOBAL_FLAGS.items():
        own = p._option_string_actions.get(flag)
        if own is None:
            p.add_argument(flag, default=default, **options)
        else:
            own.default = default


def _share_globals(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_globals(sub, default=argparse.SUPPRESS)
                _share_globals(sub)


def _add_common(p: argparse.ArgumentParser, *, kafka: bool = True) -> None:
    if kafka:
        p.add_argument("--kafka", metavar="HOST:PORT",
                       help="Kafka bootstrap servers (overrides kafka.bootstrap_servers)")
    _add_log_level(p, "info")


def _add_host(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address the OTLP receivers listen on (overrides collector.host; default "
                   "127.0.0.1, this machine only; 0.0.0.0 listens on every interface)")


def _add_log_level(p: argparse.ArgumentParser, default: str) -> None:
    p.set_defaults(default_log_level=default)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spendstream", description="Real-time cost control for generative-AI traffic (OTLP in, Kafka out)."
    )
    parser.add_argument("--version", action="version", version=f"spendstream {version()}")
    _add_globals(parser, default=None)
    parser.set_defaults(log_format="text", default_log_level="info")
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
    run.add_argument("--authz-port", type=int, default=9480, help="spendstream authz's HTTP port; Envoy's gRPC is "
                     "the next one (default 9480)")
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

    reprice = sub.add_parser("reprice", help="price the calls dead-lettered as unpriced that now have a price "
                             "(an override, a newer pricing.catalog_file); --restate: correct past rows after a "
                             "contracted price changed")
    _add_common(reprice)
    reprice.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                         help=f"where the exporter writes (default {DEFAULT_DATA_DIR})")
    reprice.add_argument("--since", required=True, help="calls that started from this UTC date or date-time on")
    reprice.add_argument("--until", help="calls that started before this UTC date or date-time (default: now)")
    reprice.add_argument("--restate", action="store_true",
                         help="instead: FOCUS correction rows (ChargeClass Correction) for the rows in the files "
                              "whose price differs from today's catalog and overrides")

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
    _add_log_level(price, "warning")

    breaker = sub.add_parser("breaker", help="the kill switch: trip, reset or list circuit breakers")
    breaker_sub = breaker.add_subparsers(dest="breaker_command", required=True, metavar="ACTION")
    trip = breaker_sub.add_parser("trip", help="open a manual breaker for a scope")
    _add_common(trip)
    trip.add_argument("--scope", required=True, help="global, or dimension=value[,dimension=value…], "
                      "e.g. team=search or key=support-rag,env=prod (values in any case: Search is search)")
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
    gateway.add_argument("--upstream-key-env", metavar="VAR", default="OPENAI_API_KEY",
                         help="environment variable holding the upstream's API key, sent instead of the client's "
                              "virtual key (default OPENAI_API_KEY)")

    authz = sub.add_parser("authz", help="breaker decisions for NGINX auth_request, Traefik forwardAuth and Envoy "
                           "ext_authz (HTTP and gRPC)")
    _add_common(authz)
    authz.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    authz.add_argument("--port", type=int, default=9480, help="HTTP port: /check, /healthz, /metrics (default 9480)")
    authz.add_argument("--grpc-port", type=int, default=9481, help="Envoy ext_authz gRPC port (default 9481)")

    topics = sub.add_parser("topics", help="create the topics (idempotent)")
    _add_common(topics)
    topics.add_argument("--partitions", type=int, help="partitions per topic (default kafka.partitions)")

    demo = sub.add_parser("demo", help="send realistic GenAI traffic through the OpenTelemetry SDK")
    demo.add_argument("--endpoint", help="OTLP/gRPC endpoint (default: $OTEL_EXPORTER_OTLP_ENDPOINT, with "
                      "$OTEL_EXPORTER_OTLP_HEADERS, else localhost:4317)")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds of traffic (default 30)")
    demo.add_argument("--rate", type=float, default=40.0, help="model calls per second, steady traffic (default 40)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    demo.add_argument("--token", help="ingest token to send as 'Authorization: Bearer'")
    demo.add_argument("--history", type=float, default=180.0, help="seconds of normal traffic to replay with past "
                      "timestamps first, so velocity has a baseline (default 180; 0: none)")
    _add_log_level(demo, "warning")
    _share_globals(parser)
    return parser


def _serve_until_signal(coro_factory: object, *,
                        run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await coro_factory(stop)  # type: ignore[operator]

    run(main())


def _cmd_collector(args: argparse.Namespace) -> None:
    from collector.app import serve  # noqa: PLC0415
    from pipeline.observability.endpoint import serve_metrics  # noqa: PLC0415

    config = _config(args)
    serve_metrics(config.metrics.port)
    _serve_until_signal(lambda stop: serve(config, stop))


def _cmd_worker(args: argparse.Namespace) -> None:
    from pipeline.cli.worker import run_worker  # noqa: PLC0415
    from pipeline.observability.endpoint import serve_metrics  # noqa: PLC0415

    config, config_path = _load(args)
    serve_metrics(args.metrics_port if args.metrics_port is not None else config.metrics.port + 1)
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


def _utc_ns(flag: str, value: str) -> int:
    try:
        return int(parse_utc(value).timestamp()) * 1_000_000_000
    except ValueError:
        raise SpendstreamError(f"{flag}: not a date or date-time: {value!r} (use e.g. 2026-11-01)") from None


def _cmd_reprice(args: argparse.Namespace) -> None:
    from pipeline.cli.reprice import describe, describe_restatement, reprice, restate  # noqa: PLC0415

    config = _config(args)
    since = _utc_ns("--since", args.since)
    until = _utc_ns("--until", args.until) if args.until else None
    if args.restate:
        print(describe_restatement(asyncio.run(restate(config, Path(args.data_dir), since, until)),
                                   config.billing_currency))
    else:
        print(describe(asyncio.run(reprice(config, Path(args.data_dir), since, until))))


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
        # the breakers in force under another spelling of the scope are closed too
        latest = asyncio.run(kill_switch.latest_commands(config.kafka))
        commands = kill_switch.reset_commands(scope, args.reason, now, latest.values())
    asyncio.run(kill_switch.publish(config.kafka, commands))
    for command in commands:
        print(f"{command.breaker_id}: {command.state} ({command.action}) — {command.reason}")


def _cmd_gateway(args: argparse.Namespace) -> None:
    from pipeline.gateway.proxy import serve_gateway  # noqa: PLC0415

    config = _config(args)
    asyncio.run(serve_gateway(config, upstream=args.upstream, port=args.port,
                              upstream_key=os.environ.get(args.upstream_key_env)))


def _cmd_authz(args: argparse.Namespace) -> None:
    import uvloop  # noqa: PLC0415

    from pipeline.gateway.authz import serve_authz  # noqa: PLC0415

    config = _config(args)
    # uvloop: the event loop and socket writes are most of a decision's cost (py-spy, bench/authz.py)
    _serve_until_signal(lambda stop: serve_authz(config, host=args.host, http_port=args.port,
                                                 grpc_port=args.grpc_port, stop=stop), run=uvloop.run)


def _cmd_run(args: argparse.Namespace) -> None:
    from pipeline.cli.runtime import run_all  # noqa: PLC0415
    from pipeline.pricing.catalog import PriceCatalog  # noqa: PLC0415

    config, path = _load(args, announce=False)
    PriceCatalog.from_config(config)  # a bad pricing section stops the start, not each worker in a restart loop
    raise SystemExit(run_all(config, workers=args.workers, data_dir=Path(args.data_dir),
                             broker_port=None if args.kafka else args.broker_port,
                             config_path=str(path) if path else None, log_level=args.log_level,
                             log_format=args.log_format, authz_port=args.authz_port))


def _cmd_demo(args: argparse.Namespace) -> None:
    from pipeline.cli.demo import run_demo  # noqa: PLC0415

    run_demo(endpoint=args.endpoint, duration_s=args.duration, rate_per_s=args.rate, seed=args.seed,
             token=args.token, history_s=args.history)


COMMANDS = {"run": _cmd_run, "collector": _cmd_collector, "worker": _cmd_worker, "exporter": _cmd_exporter,
            "topics": _cmd_topics, "demo": _cmd_demo, "report": _cmd_report, "compact": _cmd_compact,
            "price": _cmd_price, "reprice": _cmd_reprice, "breaker": _cmd_breaker, "gateway": _cmd_gateway,
            "authz": _cmd_authz}


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    args.log_level = args.log_level or args.default_log_level
    configure_logging(args.log_level, args.log_file, args.log_format)
    try:
        COMMANDS[args.command](args)
    except ConfigError as exc:
        _fail(args, "\n  ".join([f"invalid configuration {exc.source}:", *exc.problems]), 2)
    except (SpendstreamError, OSError) as exc:
        _fail(args, str(exc), 1)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception:
        # into the (rotated) log the supervisor points at, not only to a stderr nobody reads
        log.exception("spendstream %s crashed", args.command)
        raise SystemExit(1) from None



def _fail(args: argparse.Namespace, message: str, code: int) -> NoReturn:
    if args.log_format == "json":
        log.error("%s", message)  # in the format of every other line, for whatever collects them
    else:
        print(f"spendstream: {message}", file=sys.stderr)
    raise SystemExit(code)
