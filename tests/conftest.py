"""Shared fixtures: one real embedded broker per session, fresh topics per test."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.topics import ensure_topics
from schemas.config import KafkaConfig
from schemas.topics import TopicNames
from tests.support import free_port


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log_file = Path(tmp_path_factory.mktemp("broker")) / "broker.log"
    embedded = EmbeddedBroker(free_port(), log_file=log_file)
    embedded.start()
    yield embedded
    embedded.stop()


def new_topics(bootstrap: str, partitions: int = 2) -> TopicNames:
    names = TopicNames(f"t{uuid.uuid4().hex[:10]}.")
    asyncio.run(ensure_topics(KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=names.prefix,
                                          partitions=partitions), {}))
    return names


@pytest.fixture
def topics(broker: EmbeddedBroker) -> TopicNames:
    return new_topics(broker.bootstrap_servers)
