"""Create the topics of the public contract, idempotently, before any client produces (see `pipeline.kafka.broker`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from schemas import topics as contract
from schemas.config import KafkaConfig
from schemas.errors import TransientError
from schemas.topics import TopicNames

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


class TopicSetupError(TransientError):
    """Topics could not be created; the message names the topic and the broker's reason."""


async def ensure_topics(kafka: KafkaConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """Create every contract topic of this deployment that is missing. Returns topic -> "created" | "exists".

    Names, partitions, replication and connection security all come from `kafka`.
    """
    bootstrap_servers = kafka.bootstrap_servers
    names = TopicNames(kafka.topic_prefix)
    admin = AIOKafkaAdminClient(**kafka.client_options(environ), request_timeout_ms=10_000)
    try:
        await admin.start()
    except KafkaError as exc:
        await admin.close()
        raise TopicSetupError(f"cannot reach Kafka at {bootstrap_servers}: {exc}") from exc
    try:
        wanted = [
            NewTopic(names.name(topic), kafka.partitions, kafka.replication_factor,
                     topic_configs={"cleanup.policy": "compact"} if topic in contract.COMPACTED else {})
            for topic in contract.ALL
        ]
        response = await admin.create_topics(wanted)
    except KafkaError as exc:
        raise TopicSetupError(f"creating topics on {bootstrap_servers} failed: {exc}") from exc
    finally:
        await admin.close()
    result: dict[str, str] = {}
    for topic, code, message in response.topic_errors:
        if code == 0:
            result[topic] = "created"
        elif code == _TOPIC_ALREADY_EXISTS:
            result[topic] = "exists"
        else:
            raise TopicSetupError(f"creating topic {topic} failed: error {code} {message or ''}".strip())
    log.info("topics ready: %s", ", ".join(f"{t} ({s})" for t, s in sorted(result.items())))
    return result
