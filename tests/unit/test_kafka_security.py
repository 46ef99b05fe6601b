"""Kafka connection security from config: aiokafka options and faust credentials say the same thing."""

from __future__ import annotations

import ssl
from pathlib import Path

import faust
import pytest

from pipeline.app import broker_credentials
from schemas.config import KafkaConfig, load_config
from schemas.errors import ConfigError

SASL = KafkaConfig(bootstrap_servers="kafka:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                   sasl_username="spendstream", sasl_password_env="KAFKA_PASSWORD")


def test_plaintext_by_default() -> None:
    assert KafkaConfig().client_options({}) == {"bootstrap_servers": "127.0.0.1:9092",
                                                "security_protocol": "PLAINTEXT"}
    assert broker_credentials(KafkaConfig(), {}) is None


def test_sasl_ssl_reads_the_password_from_the_environment() -> None:
    options = SASL.client_options({"KAFKA_PASSWORD": "pw"})
    assert options["sasl_plain_password"] == "pw"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    credentials = broker_credentials(SASL, {"KAFKA_PASSWORD": "pw"})
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.username == "spendstream" and credentials.password == "pw"


def test_missing_password_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="KAFKA_PASSWORD is not set"):
        SASL.client_options({})


def test_sasl_without_credentials_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "spendstream.yaml"
    path.write_text("kafka:\n  security_protocol: SASL_SSL\n")
    with pytest.raises(ConfigError, match=r"kafka.security_protocol \(line 2\): SASL_SSL needs kafka.sasl_mechanism"):
        load_config(path)
