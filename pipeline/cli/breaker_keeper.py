"""Breakers that outlive the embedded broker: `spendstream run` keeps the commands in force in the data dir.

The embedded broker keeps nothing across a restart, so a kill switch tripped before a restart would
be gone after it. The runtime follows `genai.breaker.commands` in a thread and writes the commands
in force to `<data-dir>/state/breakers.jsonl` (atomically, when they change); on the next start,
before any role runs, the ones not yet expired are published again. With Apache Kafka the compacted
topic itself is durable and none of this runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

from pipeline.gateway.board import epoch_s
from pipeline.gateway.client import BreakerClient
from pipeline.gateway.kill_switch import in_force, is_reset, publish
from pipeline.guardrails.state import month_of
from schemas.breaker import BreakerCommand, decode_command
from schemas.config import KafkaConfig
from schemas.errors import SchemaError

log = logging.getLogger(__name__)
SNAPSHOT_EVERY_S = 1.0


def snapshot_path(data_dir: Path) -> Path:
    return data_dir / "state" / "breakers.jsonl"


def holds_this_month(command: BreakerCommand, now_s: float) -> bool:
    """An operator's reset issued this (UTC) month: it holds the scope's budget breakers closed for the rest of
    their period, so a restart must tell stage 2 again (the embedded broker forgets `genai.spend`)."""
    issued = epoch_s(command.issued_at)
    return is_reset(command) and issued is not None and month_of(int(issued)) == month_of(int(now_s))


def kept(command: BreakerCommand, now_s: float) -> bool:
    """What a snapshot keeps: the commands in force and this month's resets."""
    return in_force(command, now_s) or holds_this_month(command, now_s)


def read_snapshot(path: Path, now_s: float) -> list[BreakerCommand]:
    """The commands of a snapshot still in force at `now_s` and this month's resets (published again, they tell
    stage 2 of the reset once more); an unreadable line is skipped with a warning."""
    if not path.exists():
        return []
    commands = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            command = decode_command(line)
        except SchemaError as exc:
            log.warning("%s line %d skipped: %s", path, number, exc)
            continue
        if kept(command, now_s):
            commands.append(command)
    return commands


def write_snapshot(path: Path, commands: list[BreakerCommand]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as out:
        out.write(b"".join(c.encode() + b"\n" for c in sorted(commands, key=lambda c: c.breaker_id)))
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(path)


def restore_breakers(kafka: KafkaConfig, data_dir: Path) -> int:
    """Publish the snapshot's commands still in force; returns how many."""
    commands = read_snapshot(snapshot_path(data_dir), time.time())
    if commands:
        asyncio.run(publish(kafka, commands))
        log.info("restored %d breakers in force from %s", len(commands), snapshot_path(data_dir))
    return len(commands)


class BreakerKeeper:
    """Follows the commands topic in its own thread and keeps the snapshot up to date."""

    def __init__(self, kafka: KafkaConfig, data_dir: Path) -> None:
        self._kafka = kafka
        self._path = snapshot_path(data_dir)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="breaker-keeper", daemon=True)

    def start(self) -> None:
        logging.getLogger("aiokafka").setLevel(logging.WARNING)  # the supervisor's console is for people
        self._thread.start()

    def stop(self) -> None:
        """Take a last snapshot and stop."""
        self._stop.set()
        self._thread.join(timeout=10)

    async def _run(self) -> None:
        resets: dict[str, BreakerCommand] = {}  # the board drops closed breakers: the resets are kept here

        def keep_reset(command: BreakerCommand) -> None:
            if is_reset(command):
                resets[command.breaker_id] = command
            else:  # tripped again: the reset no longer describes the breaker (and must not close it on restart)
                resets.pop(command.breaker_id, None)

        client = BreakerClient(self._kafka, also=keep_reset)
        await client.start()
        written: list[bytes] | None = None
        try:
            while True:
                now_s = time.time()
                commands = client.board.in_force() + [c for c in resets.values() if holds_this_month(c, now_s)]
                encoded = sorted(c.encode() for c in commands)
                if encoded != written:
                    write_snapshot(self._path, commands)
                    written = encoded
                if self._stop.is_set():
                    return
                await asyncio.sleep(SNAPSHOT_EVERY_S)
        finally:
            await client.stop()
