"""Kafka connection security from config: every producer and consumer gets the same aiokafka options."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from pipeline.kafka.consumer import group_consumer
from pipeline.kafka.producer import BatchProducer
from schemas.config import KafkaConfig, load_config
from schemas.errors import ConfigError

SASL = KafkaConfig(bootstrap_servers="kafka:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                   sasl_username="spendstream", sasl_password_env="KAFKA_PASSWORD")


def test_plaintext_by_default() -> None:
    assert KafkaConfig().client_options({}) == {"bootstrap_servers": "127.0.0.1:9092",
                                                "security_protocol": "PLAINTEXT"}


def test_sasl_ssl_reads_the_password_from_the_environment() -> None:
    options = SASL.client_options({"KAFKA_PASSWORD": "pw"})
    assert options["sasl_plain_password"] == "pw"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert isinstance(options["ssl_context"], ssl.SSLContext)


def test_producer_and_consumers_use_the_configured_security(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_PASSWORD", "pw")
    producer = BatchProducer.of(SASL, {"KAFKA_PASSWORD": "pw"})
    assert producer._options["sasl_plain_password"] == "pw"
    assert producer._options["security_protocol"] == "SASL_SSL"

    async def consumer_client() -> tuple[str, str, str]:
        consumer = group_consumer(SASL, "g", "t", max_poll_records=10)  # aiokafka binds it to a running loop
        return consumer._client._sasl_plain_password, consumer._client._security_protocol, consumer._group_id

    assert asyncio.run(consumer_client()) == ("pw", "SASL_SSL", "g")


def test_missing_password_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="KAFKA_PASSWORD is not set"):
        SASL.client_options({})


def test_sasl_without_credentials_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "spendstream.yaml"
    path.write_text("kafka:\n  security_protocol: SASL_SSL\n")
    with pytest.raises(ConfigError, match=r"kafka.security_protocol \(line 2\): SASL_SSL needs kafka.sasl_mechanism"):
        load_config(path)
