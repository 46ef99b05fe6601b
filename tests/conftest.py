"""Shared fixtures: one real embedded broker per session (per xdist worker), fresh topics per test; and the order
tests start in."""

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


#: markers of the tests that run real processes and wait out windows and timeouts, slowest kind first. `make test`
#: hands whole files to pytest-xdist workers in collection order (--dist loadfile --no-loadscope-reorder): started
#: first, the long files overlap, and the quick unit files fill the gaps at the end instead of one long file
#: running alone after the rest
SLOWEST_FIRST = ("failover", "e2e", "integration")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return next((i for i, name in enumerate(SLOWEST_FIRST) if item.get_closest_marker(name)), len(SLOWEST_FIRST))

    items.sort(key=rank)  # stable: a file's tests stay together and in order
