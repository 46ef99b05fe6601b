"""What every command does before its work: SPENDSTREAM_* variables (one rule derived from the config schema,
typed, errors naming the variable), config discovery (--config, $SPENDSTREAM_CONFIG, ./spendstream.yaml), the JSON
log format, and the flags every command takes before or after its name."""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from pathlib import Path

import pytest

from pipeline.cli.startup import configure_logging, find_config, load
from schemas.config import _SECTIONS, Config, load_config
from schemas.config_env import env_overrides, env_settings, unknown_env
from schemas.errors import ConfigError, SpendstreamError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_scalar_setting_has_its_variable_by_the_one_rule() -> None:
    names = env_settings()
    for section, kind in _SECTIONS.items():
        for field in dataclasses.fields(kind):
            if field.type in ("str", "int", "float", "bool", "str | None") or field.type.startswith("Literal["):
                assert f"SPENDSTREAM_{section}_{field.name}".upper() in names, f"{section}.{field.name}"
    assert names["SPENDSTREAM_KAFKA_BOOTSTRAP_SERVERS"].path == ("kafka", "bootstrap_servers")
    assert names["SPENDSTREAM_COLLECTOR_TLS_CERT_FILE"].path == ("collector", "tls", "cert_file")
    assert names["SPENDSTREAM_BILLING_CURRENCY"].path == ("billing_currency",)
    assert names["SPENDSTREAM_ATTRIBUTION_REQUIRED"].path == ("attribution", "required")  # a list of strings
    # maps and lists of objects are file only; the variables that are no setting stay free
    assert not {"SPENDSTREAM_FX", "SPENDSTREAM_BUDGETS", "SPENDSTREAM_INGEST_TOKENS", "SPENDSTREAM_PRICING_OVERRIDES",
                "SPENDSTREAM_ATTRIBUTION_DIMENSIONS", "SPENDSTREAM_CONFIG", "SPENDSTREAM_USER_ID_KEY"} & set(names)


def test_the_rule_is_documented() -> None:
    docs = DOCS.read_text()
    for name in ("SPENDSTREAM_KAFKA_BOOTSTRAP_SERVERS", "SPENDSTREAM_COLLECTOR_TLS_CERT_FILE", "SPENDSTREAM_CONFIG"):
        assert name in docs


def test_values_are_typed_as_the_schema_says() -> None:
    overrides = env_overrides({
        "SPENDSTREAM_KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9092,kafka-2:9092", "SPENDSTREAM_KAFKA_PARTITIONS": "24",
        "SPENDSTREAM_COLLECTOR_PUBLISH_TIMEOUT_S": "2.5", "SPENDSTREAM_ATTRIBUTION_HASH_USER_IDS": "false",
        "SPENDSTREAM_ATTRIBUTION_REQUIRED": "team, env", "SPENDSTREAM_FOCUS_VERSION": "1.2",
        "SPENDSTREAM_VELOCITY_MAX_PER_MIN": "3", "SPENDSTREAM_KAFKA_SSL_CAFILE": "/etc/ca.pem",
        "SPENDSTREAM_USER_ID_KEY": "a secret, not a setting", "PATH": "/usr/bin",
    })
    assert overrides == {
        "kafka": {"bootstrap_servers": "kafka-1:9092,kafka-2:9092", "partitions": 24, "ssl_cafile": "/etc/ca.pem"},
        "collector": {"publish_timeout_s": 2.5}, "attribution": {"hash_user_ids": False, "required": ["team", "env"]},
        "focus": {"version": "1.2"}, "velocity": {"max_per_min": 3},
    }


@pytest.mark.parametrize(("name", "value", "message"), [
    ("SPENDSTREAM_KAFKA_PARTITIONS", "twelve", "SPENDSTREAM_KAFKA_PARTITIONS='twelve': expected an integer "
                                               "(sets kafka.partitions)"),
    ("SPENDSTREAM_COLLECTOR_PUBLISH_TIMEOUT_S", "soon", "expected a number (sets collector.publish_timeout_s)"),
    ("SPENDSTREAM_ATTRIBUTION_HASH_USER_IDS", "maybe", "expected true or false"),
    ("SPENDSTREAM_KAFKA_COMPRESSION", "brotli", "'brotli' is not one of"),
    ("SPENDSTREAM_BREAKER_COOL_DOWN", "5 minutes", "does not match"),
    ("SPENDSTREAM_ATTRIBUTION_REQUIRED", "Team", "does not match"),
])
def test_a_bad_value_is_an_error_naming_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        env_overrides({name: value})
    assert caught.value.source == "environment"
    (problem,) = caught.value.problems
    assert problem.startswith(f"{name}=") and message in problem


def test_every_bad_variable_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        env_overrides({"SPENDSTREAM_KAFKA_PARTITIONS": "x", "SPENDSTREAM_METRICS_PORT": "y"})
    assert len(caught.value.problems) == 2


def test_the_environment_wins_over_the_file_and_keeps_its_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "spendstream.yaml"
    path.write_text("kafka:\n  bootstrap_servers: file:9092\n  partitions: 3\ncollector:\n  tls: null\n")
    config = load_config(path, env_overrides({"SPENDSTREAM_KAFKA_BOOTSTRAP_SERVERS": "env:9092",
                                              "SPENDSTREAM_COLLECTOR_TLS_CERT_FILE": "/tls/cert.pem",
                                              "SPENDSTREAM_COLLECTOR_TLS_KEY_FILE": "/tls/key.pem"}))
    assert config.kafka.bootstrap_servers == "env:9092" and config.kafka.partitions == 3
    assert config.collector.tls is not None and config.collector.tls.cert_file == "/tls/cert.pem"
    assert load_config(None, env_overrides({"SPENDSTREAM_METRICS_PORT": "9999"})).metrics.port == 9999
    assert load_config(None, {}) == Config()


def test_cross_field_rules_still_hold_for_the_environment() -> None:
    with pytest.raises(ConfigError, match="max_inflight_bytes"):
        load_config(None, env_overrides({"SPENDSTREAM_COLLECTOR_MAX_INFLIGHT_BYTES": "1"}))


def test_a_near_miss_is_pointed_out() -> None:
    assert unknown_env({"SPENDSTREAM_KAFKA_BOOTSTRAP_SERVER": "x", "SPENDSTREAM_USER_ID_KEY": "k",
                        "SPENDSTREAM_KAFKA_PARTITIONS": "3"}) == \
        {"SPENDSTREAM_KAFKA_BOOTSTRAP_SERVER": "SPENDSTREAM_KAFKA_BOOTSTRAP_SERVERS"}


# --- discovery ---------------------------------------------------------------------------------------------------

def test_discovery_order(tmp_path: Path) -> None:
    named, local = tmp_path / "named.yaml", tmp_path / "spendstream.yaml"
    named.write_text("{}\n")
    assert find_config(None, {}, tmp_path) == (None, "no --config, $SPENDSTREAM_CONFIG or ./spendstream.yaml")
    local.write_text("{}\n")
    assert find_config(None, {}, tmp_path) == (local, "found in the working directory")
    assert find_config(None, {"SPENDSTREAM_CONFIG": str(named)}, tmp_path) == (named, "$SPENDSTREAM_CONFIG")
    assert find_config("flag.yaml", {"SPENDSTREAM_CONFIG": str(named)}, tmp_path) == (Path("flag.yaml"), "--config")


def test_a_config_variable_naming_no_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SpendstreamError, match=r"\$SPENDSTREAM_CONFIG names .*missing.yaml, which is not a file"):
        find_config(None, {"SPENDSTREAM_CONFIG": str(tmp_path / "missing.yaml")}, tmp_path)


def test_the_start_up_line_names_the_file_and_the_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "spendstream.yaml").write_text("metrics:\n  port: 9000\n")
    monkeypatch.chdir(tmp_path)
    config, path, line = load(None, {"SPENDSTREAM_KAFKA_PARTITIONS": "5"})
    assert path == tmp_path / "spendstream.yaml" and config.metrics.port == 9000 and config.kafka.partitions == 5
    assert line == f"config: {path} (found in the working directory); from the environment: " \
                   "SPENDSTREAM_KAFKA_PARTITIONS"


# --- log format --------------------------------------------------------------------------------------------------

def test_json_log_lines_from_our_loggers_libraries_and_warnings(tmp_path: Path) -> None:
    log_file = tmp_path / "role.log"
    logging.captureWarnings(False)  # an earlier test's configure_logging left it on, under pytest's own capture
    configure_logging("info", None)
    configure_logging("info", str(log_file), "json")
    try:
        assert len(logging.getLogger().handlers) == 1, "the handler installed before is replaced"
        logging.getLogger("spendstream").info("config: %s", "x.yaml")
        logging.getLogger("aiokafka.consumer").warning("rebalance")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("spendstream").exception("crashed")
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # whatever filters the tests before left
            warnings.warn("old option", UserWarning, stacklevel=1)
        logging.getLogger("spendstream").debug("below the level")
    finally:
        logging.basicConfig(force=True)
        logging.captureWarnings(False)
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [(e["level"], e["logger"]) for e in entries] == [
        ("INFO", "spendstream"), ("WARNING", "aiokafka.consumer"), ("ERROR", "spendstream"),
        ("WARNING", "py.warnings")]
    assert entries[0]["message"] == "config: x.yaml" and entries[0]["time"].endswith("+00:00")
    assert "RuntimeError: boom" in entries[2]["exception"]


# --- global flags ------------------------------------------------------------------------------------------------

GLOBALS = ["--config", "c.yaml", "--log-level", "debug", "--log-file", "x.log", "--log-format", "json"]


@pytest.mark.parametrize("command", [["run"], ["collector"], ["worker"], ["exporter"], ["topics"], ["demo"],
                                     ["report"], ["compact"], ["breaker", "list"], ["gateway", "--upstream", "u"],
                                     ["price", "gpt-4o", "--input", "1", "--output", "1"]])
def test_global_flags_before_or_after_the_command(command: list[str]) -> None:
    from pipeline.cli.main import _parser  # noqa: PLC0415

    before, after = _parser().parse_args([*GLOBALS, *command]), _parser().parse_args([*command, *GLOBALS])
    assert before == after
    assert (before.config, before.log_level, before.log_file, before.log_format) == ("c.yaml", "debug", "x.log", "json")
    plain = _parser().parse_args(command)
    assert (plain.config, plain.log_level, plain.log_file, plain.log_format) == (None, None, None, "text")


def test_a_command_that_declares_a_global_flag_itself_keeps_the_order_free() -> None:
    import argparse  # noqa: PLC0415

    from pipeline.cli.main import _add_globals, _share_globals  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    _add_globals(parser, default=None)
    own = parser.add_subparsers(dest="command").add_parser("reprice")
    own.add_argument("--config", metavar="FILE", help="its own words")
    _share_globals(parser)
    assert parser.parse_args(["--config", "a.yaml", "reprice"]).config == "a.yaml"
    assert parser.parse_args(["reprice", "--config", "b.yaml"]).config == "b.yaml"


def test_run_notices_follow_the_log_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.startup import notice  # noqa: PLC0415

    log_file = tmp_path / "run.log"
    configure_logging("info", None)
    notice("worker-1 was killed by SIGKILL; starting it again in 1 s")
    configure_logging("info", str(log_file), "json")
    try:
        notice("the embedded broker was killed by SIGKILL")
    finally:
        logging.basicConfig(force=True)
    assert capsys.readouterr().err == "spendstream: worker-1 was killed by SIGKILL; starting it again in 1 s\n"
    (entry,) = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert (entry["level"], entry["message"]) == ("WARNING", "the embedded broker was killed by SIGKILL")
