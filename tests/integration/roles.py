"""Pipeline roles as real subprocesses, and a producer that feeds them over a few seconds."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from aiokafka import AIOKafkaProducer

from pipeline.kafka.broker import EmbeddedBroker


def produce_slowly(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], seconds: float) -> None:
    async def main() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for index, (key, value) in enumerate(messages):
                await producer.send(topic, key=key, value=value)
                if index % 20 == 0:
                    await asyncio.sleep(seconds * 20 / len(messages))
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(main())


def role(name: str, broker: EmbeddedBroker, config: Path, tmp: Path, port: int,
         instance: str = "") -> subprocess.Popen[bytes]:
    """`spendstream <name>`; the exporter writes under tmp/data; `instance` names the log of one of several."""
    log = (tmp / f"{name}{instance}.log").open("ab")
    data = ["--data-dir", str(tmp / "data")] if name == "exporter" else []
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", name, "--kafka", broker.bootstrap_servers, "--config", str(config),
         *data, "--metrics-port", str(port), "--log-level", "info"],
        stdout=log, stderr=subprocess.STDOUT)
