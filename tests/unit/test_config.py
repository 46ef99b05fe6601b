"""spendstream.yaml: the DESIGN example loads; every mistake is named with its key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.config import Config, load_config
from schemas.errors import ConfigError

TESTDATA = Path(__file__).parent / "testdata"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spendstream.yaml"
    path.write_text(text)
    return path


def test_design_example_loads() -> None:
    config = load_config(TESTDATA / "valid.yaml")
    assert config.billing_currency == "EUR"
    assert config.fx == {"USD": 0.92}
    assert config.ingest_tokens["tok_support_rag"] == {"team": "customer-support", "key": "support-rag"}
    assert config.attribution.required == ("team", "use_case", "env")
    assert config.policy.budgets[0].amount == 2000


def test_no_file_gives_defaults() -> None:
    assert load_config(None) == Config()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


@pytest.mark.parametrize(("text", "expected"), [
    ("billing_currency: EUR\nfx: {USD: 0.9}\nbilling_curency: USD\n", "billing_curency (line 3): unknown key"),
    ("attribution:\n  required: [team]\n  on_missing: drop\n", "attribution.on_missing (line 3)"),
    ("collector:\n  grpc_port: 99999\n", "collector.grpc_port (line 2)"),
    ("collector:\n  max_token_count: -1\n", "collector.max_token_count (line 2)"),
    ("budgets:\n  - scope: {team: search}\n    amount: -5\n", "budgets[0].amount (line 3)"),
    ("budgets:\n  - scope: {team: search}\n    amount: 5\n    alerts: [0.5, 1.5]\n", "budgets[0].alerts[1] (line 4)"),
    ("budgets:\n  - scope: {team: search}\n    amount: 5\n    treshold: 1\n", "budgets[0].treshold (line 4)"),
    ("kafka:\n  partitions: many\n", "kafka.partitions (line 2)"),
    ("billing_currency: EUR\n", "fx: billing_currency is EUR but fx has no USD rate"),
    ("attribution:\n  required: [team, squad]\n", "attribution.required (line 2): unknown dimension 'squad'"),
    ("attribution:\n  dimensions:\n    team: [gen_ai.input.messages]\n", "content attribute"),
    # the same definition of content the forwarding strips (schemas/content.py), not a shorter list of its own
    ("attribution:\n  dimensions:\n    team: [traceloop.entity.input]\n", "content attribute"),
    ("key: [unclosed\n", "not valid YAML"),
    ("budgets:\n  - scope: {squad: x}\n    amount: 5\n", "budgets[0].scope (line 2): unknown dimension 'squad'"),
    ("budgets:\n  - scope: {team: x}\n    amount: 0\n", "budgets[0].amount (line 3): must be above 0"),
    ("keys:\n  - key: k\n    budget: {soft_limit: 9, hard_limit: 5}\n", "keys[0].budget.soft_limit (line 3)"),
    ("velocity:\n  spike_ratio: high\n", "velocity.spike_ratio (line 2)"),
    ("breaker:\n  cool_down: 5 minutes\n", "breaker.cool_down (line 2)"),
    ("budgets:\n  - scope: {team: x}\n    amount: 5\n    on_exhausted: {prod: explode}\n",
     "budgets[0].on_exhausted.prod (line 4)"),
    ("keys:\n  - key: k\n    limits: {requests_per_minute: -1}\n", "keys[0].limits.requests_per_minute (line 3)"),
    ("keys:\n  - key: k\n    limits: {requests_per_minute: 5, action: shout}\n", "keys[0].limits.action (line 3)"),
    ("breaker:\n  expire_after: 7w\n", "breaker.expire_after (line 2)"),
    ("collector:\n  tls: {cert_file: server.pem}\n", "collector.tls (line 2): 'key_file' is a required property"),
    ("collector:\n  tls: {cert_file: a, key_file: b, min_version: '1.1'}\n", "collector.tls.min_version (line 2)"),
    ("collector:\n  tls: {cert_file: a, key_file: b, ca_file: c}\n", "collector.tls.ca_file (line 2): unknown key"),
    ("collector:\n  max_request_bytes: 2048\n  max_inflight_bytes: 1024\n",
     "collector.max_inflight_bytes (line 3): 1024 is below collector.max_request_bytes"),
    ("attribution:\n  user_id_salt: pepper\n", "attribution.user_id_salt (line 2): no longer used"),
    ("exporter:\n  max_buffered_rows: 10\n", "exporter.max_buffered_rows (line 2): 10 is less than the minimum"),
    ("exporter:\n  compact_every_s: -1\n", "exporter.compact_every_s (line 2)"),
])
def test_mistakes_are_named_with_key_and_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert any(expected in problem for problem in info.value.problems), info.value.problems


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "kafka:\n  partitions: 0\ncollector:\n  http_port: -1\n"))
    assert len(info.value.problems) == 2


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "missing.yaml")


def test_exporter_and_focus_sections() -> None:
    from schemas.config import config_from_dict  # noqa: PLC0415

    assert config_from_dict({}).exporter.max_buffered_rows == 100_000
    config = config_from_dict({"exporter": {"rollup": "day", "flush_seconds": 2, "max_buffered_rows": 5000,
                                            "compact_every_s": 600},
                               "focus": {"billing_account_id": "acme"}, "billing_currency": "EUR",
                               "fx": {"USD": 0.92}})
    assert config.exporter.rollup == "day" and config.focus.billing_account_id == "acme"
    assert (config.exporter.max_buffered_rows, config.exporter.compact_every_s) == (5000, 600)
    assert str(config.usd_rate) == "0.92"
    with pytest.raises(ConfigError, match=r"exporter.rollup: 'week' is not one of"):
        config_from_dict({"exporter": {"rollup": "week"}})
    with pytest.raises(ConfigError, match=r"focus.*unknown key\(s\) 'account'"):
        config_from_dict({"focus": {"account": "x"}})


def test_limits_name_their_action_and_durations_take_days(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "breaker:\n  expire_after: 7d\nkeys:\n  - key: k\n    limits: "
                                         "{requests_per_minute: 120, tokens_per_minute: 200000, action: alert_only}\n"
                                         "  - key: j\n    limits: {requests_per_minute: 5}\n"))
    assert config.policy.breaker.expire_after_s == 7 * 86_400
    assert config.policy.limits["key=k"].action == "alert_only"
    assert config.policy.limits["key=j"].action is None  # breaker.action


def test_collector_listens_on_loopback_unless_told_and_takes_a_tls_block(tmp_path: Path) -> None:
    from schemas.config import TlsConfig  # noqa: PLC0415

    assert Config().collector.host == "127.0.0.1"
    assert Config().collector.tls is None
    config = load_config(write(tmp_path, "collector:\n  host: 0.0.0.0\n  tls:\n    cert_file: /tls/server.pem\n"
                                         "    key_file: /tls/server.key\n    client_ca_file: /tls/ca.pem\n"))
    assert config.collector.host == "0.0.0.0"
    assert config.collector.tls == TlsConfig(cert_file="/tls/server.pem", key_file="/tls/server.key",
                                             client_ca_file="/tls/ca.pem", min_version="1.2")
