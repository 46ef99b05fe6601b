"""Decision cost of `spendstream authz`: HTTP and Envoy gRPC under load, against the bare board, and how long
a `breaker trip` takes to become a 429 at NGINX.

    .venv/bin/python bench/authz.py [--seconds 5] [--concurrency 32] [--breakers 200] [--trips 5]
                                    [--compare DIR] [--rounds 1]

Starts an embedded broker, `spendstream authz` (its own process) and Debian's NGINX running
deploy/nginx/spendstream.conf in front of a fake model server. `--breakers` manual breakers of
assorted scopes are in force (one of them on the callers' team, a downgrade, so every answer
is worked out in full). Measures, in the same run:

- the baseline: `BreakerBoard.decide` alone on the same breakers, decisions/s on one core;
- HTTP `/check` and gRPC `Authorization/Check` with `--concurrency` requests in flight for
  `--seconds` each: decisions/s, p50/p99 latency, and their ratio to the baseline; and the CPU
  time authz itself spent per decision (all its threads, from /proc): on a shared machine the
  load generator in this process and the neighbours move the wall-clock figures, far less that;
- with `--compare DIR` (another checkout, e.g. `git worktree add /tmp/base <rev>`), the same for
  the authz of that checkout, against the same broker and breakers: before and after in one run;
- trip to 429: from starting `spendstream breaker trip` (a new process, as an operator runs
  it) to the first 429 NGINX answers a caller polling it, `--trips` times (reset in between).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from http.server import ThreadingHTTPServer
from pathlib import Path

import aiohttp
import grpc
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.gateway import kill_switch
from pipeline.gateway.board import BreakerBoard
from pipeline.gateway.ext_authz import check_stub
from pipeline.gateway.ext_authz import ext_authz_pb2 as ext_authz
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.topics import ensure_topics
from schemas.breaker import BreakerCommand
from schemas.config import KafkaConfig
from schemas.policy import Scope
from tests.e2e.running import SPENDSTREAM, read_until
from tests.integration.test_gateways_obey import Upstream, nginx_conf
from tests.support import free_port

KEY = "sk-bench-caller-1"
IDENTITY = {"team": "bench", "use_case": "load", "env": "prod", "key": "bench-caller"}
BODY = b'{"model": "gpt-4o", "messages": []}'


def breakers(count: int) -> list[BreakerCommand]:
    """`count` breakers over four scope shapes; one downgrades the callers' team."""
    now = time.time()
    shapes = ["team=t{i}", "key=k{i},env=prod", "use_case=u{i}", "team=t{i},use_case=u{i}"]
    commands = [kill_switch.trip_command(Scope.parse(shapes[i % 4].format(i=i)), "block", "bench", ttl_s=None,
                                         downgrade={}, now_s=now) for i in range(count - 1)]
    commands.append(kill_switch.trip_command(Scope.parse("team=bench"), "downgrade", "bench", ttl_s=None,
                                             downgrade={"gpt-4o": "gpt-4o-mini"}, now_s=now))
    return commands


def cpu_s(pid: int) -> float:
    """CPU seconds a process has used, all its threads (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(label: str, authz: subprocess.Popen[str], ports: tuple[int, int], bare: float, *,
            seconds: float, concurrency: int) -> None:
    for name, run, port in (("HTTP /check", http_load, ports[0]), ("gRPC Check", grpc_load, ports[1])):
        before = cpu_s(authz.pid)
        rate, latencies = asyncio.run(run(port, seconds, concurrency))
        cpu_us = (cpu_s(authz.pid) - before) / len(latencies) * 1e6
        cuts = statistics.quantiles(latencies, n=100)
        print(f"{label}{name}: {rate:,.0f} decisions/s, p50 {cuts[49] * 1e3:.2f} ms, p99 {cuts[98] * 1e3:.2f} ms "
              f"({bare / rate:,.0f}x the bare board's cost); authz CPU {cpu_us:,.0f} µs per decision "
              f"({cpu_us * bare / 1e6:,.1f}x the bare board's)")


def bare_board(commands: list[BreakerCommand], seconds: float) -> float:
    board = BreakerBoard()
    for command in commands:
        board.apply(command)
    assert board.decide(IDENTITY, "gpt-4o", time.time()).verdict == "downgrade"
    done, start, now = 0, time.perf_counter(), time.time()
    while time.perf_counter() - start < seconds:
        for _ in range(1000):
            board.decide(IDENTITY, "gpt-4o", now)
        done += 1000
    return done / (time.perf_counter() - start)


async def load(call: Callable[[], Awaitable[None]], seconds: float, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - began)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - start), latencies


async def http_load(port: int, seconds: float, concurrency: int) -> tuple[float, list[float]]:
    url = f"http://127.0.0.1:{port}/check"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def call() -> None:
            async with session.post(url, data=BODY, headers={"authorization": f"Bearer {KEY}"}) as answer:
                assert answer.headers["x-spendstream-model"] == "gpt-4o-mini"

        return await load(call, seconds, concurrency)


async def grpc_load(port: int, seconds: float, concurrency: int) -> tuple[float, list[float]]:
    request = ext_authz.CheckRequest()
    request.attributes.request.http.headers["authorization"] = f"Bearer {KEY}"
    request.attributes.request.http.body = BODY.decode()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = check_stub(channel)

        async def call() -> None:
            answer = await stub(request, timeout=10)
            assert answer.HasField("ok_response")

        return await load(call, seconds, concurrency)


def trip_to_429(bootstrap: str, config: Path, nginx_port: int) -> tuple[float, float]:
    """Seconds from starting `spendstream breaker trip` to NGINX's first 429 for a caller polling it, and to the
    command's exit (its start-up and the broker's acknowledgement)."""
    seen, seen_at = threading.Event(), []
    request = urllib.request.Request(f"http://127.0.0.1:{nginx_port}/v1/chat/completions", data=BODY,
                                     headers={"authorization": f"Bearer {KEY}", "content-type": "application/json",
                                              "x-spendstream-model": "gpt-4o"})

    def poll() -> None:
        while not seen.is_set():
            try:
                urllib.request.urlopen(request, timeout=10).read()
            except urllib.error.HTTPError as exc:
                if exc.code == 429:
                    seen_at.append(time.perf_counter())
                    seen.set()
            except (OSError, http.client.HTTPException):  # a connection dropped under load: ask again
                continue

    start = time.perf_counter()
    threading.Thread(target=poll, daemon=True).start()
    common = ["--kafka", bootstrap, "--config", str(config), "--scope", "key=bench-caller"]
    subprocess.run([*SPENDSTREAM, "breaker", "trip", *common, "--action", "block", "--reason", "bench"], check=True,
                   capture_output=True)
    cli = time.perf_counter() - start
    if not seen.wait(60):
        raise AssertionError("NGINX never answered 429")
    took = seen_at[0] - start
    subprocess.run([*SPENDSTREAM, "breaker", "reset", *common], check=True, capture_output=True)
    seen.clear()
    while not seen.wait(0.1):  # the reset has reached NGINX once a call goes through again
        try:
            urllib.request.urlopen(request, timeout=10).read()
            break
        except urllib.error.HTTPError:
            continue
    return took, cli


Service = tuple[subprocess.Popen[str], tuple[int, int]]


def start_authz(checkout: Path, bootstrap: str, config: Path, log: Path) -> Service:
    """`spendstream authz` of a checkout (`python -m pipeline` imports from its working directory)."""
    ports = free_port(), free_port()
    with log.open("w") as out:
        process = subprocess.Popen([*SPENDSTREAM, "authz", "--kafka", bootstrap, "--config", str(config),
                                    "--port", str(ports[0]), "--grpc-port", str(ports[1]), "--log-level", "warning"],
                                   stdout=out, stderr=subprocess.STDOUT, text=True, cwd=checkout,
                                   env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return process, ports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--breakers", type=int, default=200)
    parser.add_argument("--trips", type=int, default=5)
    parser.add_argument("--compare", help="a checkout of another revision: its authz is measured too")
    parser.add_argument("--rounds", type=int, default=1, help="measure each authz this many times, in turns")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        broker = EmbeddedBroker(free_port(), log_file=tmp / "broker.log")
        broker.start()
        kafka = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic_prefix="bench.")
        asyncio.run(ensure_topics(kafka, {}))
        commands = breakers(args.breakers)
        asyncio.run(kill_switch.publish(kafka, commands))
        config = tmp / "spendstream.yaml"
        config.write_text(yaml.safe_dump({"kafka": {"topic_prefix": "bench."}, "gateway": {"keys": {KEY: IDENTITY}}}))
        server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream().handler())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        checkouts = {"": Path(__file__).resolve().parent.parent}
        if args.compare:
            checkouts[f"[{args.compare}] "] = Path(args.compare).resolve()
        services = {label: start_authz(checkout, broker.bootstrap_servers, config, tmp / f"authz{i}.log")
                    for i, (label, checkout) in enumerate(checkouts.items())}
        http_port = services[""][1][0]
        nginx_port = free_port()
        conf = nginx_conf(tmp, listen=nginx_port, authz=http_port, upstream=server.server_address[1])
        nginx = subprocess.Popen(["nginx", "-p", str(tmp), "-c", str(conf)], text=True)
        try:
            for i, (process, _) in enumerate(services.values()):
                read_until(process, tmp / f"authz{i}.log", "authz on", timeout_s=60)
            bare = bare_board(commands, args.seconds)
            print(f"{args.breakers} breakers in force, {args.concurrency} requests in flight, "
                  f"{args.seconds:g}s each")
            print(f"BreakerBoard.decide (bare, baseline): {bare:,.0f} decisions/s ({1e6 / bare:.1f} µs each)")
            for _ in range(args.rounds):  # in turns: the machine's load moves while they run
                for label, (process, ports) in services.items():
                    measure(label, process, ports, bare, seconds=args.seconds, concurrency=args.concurrency)
            trips, clis = zip(*(trip_to_429(broker.bootstrap_servers, config, nginx_port)
                                for _ in range(args.trips)), strict=True)
            print(f"`breaker trip` to first 429 at NGINX ({args.trips} trips): median {statistics.median(trips):.2f}s, "
                  f"max {max(trips):.2f}s (the command itself, start to exit: median {statistics.median(clis):.2f}s)")
        finally:
            for process in [nginx, *(p for p, _ in services.values())]:
                process.terminate()
                process.wait(10)
            server.shutdown()
            broker.stop()


if __name__ == "__main__":
    main()
