"""Who a gateway's caller is (only what the gateway verified) and what the gateway is told (identity.py)."""

from __future__ import annotations

import orjson
import pytest

from pipeline.gateway.board import Decision
from pipeline.gateway.identity import Caller, answer, bearer, identify, model_of
from schemas.config import GatewayConfig, config_from_dict
from schemas.errors import ConfigError

REQUIRED = ("team", "use_case", "env")
GATEWAY = GatewayConfig(keys={"sk-search-1": {"team": "search", "env": "prod", "key": "search-bot"},
                              "sk-vip-0001": {"team": "ads", "key": "vip"}},
                        identity_headers={"team": "x-auth-team", "cost_center": "x-auth-cc"}, approved_keys=("vip",))
CLAIMS = {"x-team": "ads", "x-key": "vip", "x-env": "dev", "x-use-case": "copy"}


def test_a_key_is_its_configured_identity_whatever_the_client_claims() -> None:
    caller = identify({"authorization": "Bearer sk-search-1", **CLAIMS}, GATEWAY, REQUIRED)
    assert caller == Caller({"team": "search", "env": "prod", "key": "search-bot"}, approved=False)
    assert identify({"authorization": "bearer  sk-vip-0001 "}, GATEWAY, REQUIRED) == \
        Caller({"team": "ads", "key": "vip"}, approved=True)


def test_headers_the_gateway_sets_identify_but_a_key_wins() -> None:
    assert identify({"x-auth-team": "ads", "x-auth-cc": "cc-7", **CLAIMS}, GATEWAY, REQUIRED) == \
        Caller({"team": "ads", "cost_center": "cc-7"}, approved=False)
    caller = identify({"authorization": "Bearer sk-search-1", "x-auth-team": "ads", "x-auth-cc": "cc-7"},
                      GATEWAY, REQUIRED)
    assert caller is not None and caller.attribution["team"] == "search" and caller.attribution["cost_center"] == "cc-7"


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer sk-unknown"}, {"authorization": "Basic c2stc2"},
                                     {"authorization": "Bearer "}, CLAIMS])
def test_an_unknown_caller_is_refused_or_unallocated(headers: dict[str, str]) -> None:
    assert identify(headers, GATEWAY, REQUIRED) is None
    lenient = GatewayConfig(keys=GATEWAY.keys, unknown_keys="unallocated")
    assert identify(headers, lenient, REQUIRED) == Caller(dict.fromkeys(REQUIRED, "unallocated"), approved=False)


def test_bearer_and_model_of() -> None:
    assert bearer({"authorization": "Bearer abc"}) == "abc"
    assert bearer({"authorization": "Token abc"}) is None
    assert model_of(b'{"model": "gpt-4o", "messages": []}') == "gpt-4o"
    assert model_of(b"not json") is None and model_of(b"[1]") is None and model_of(b'{"model": 4}') is None


def test_answers() -> None:
    caller = Caller({"team": "search"}, approved=False)
    blocked = answer(caller, Decision("block", "gpt-4o", "manual|team=search", "runaway — stop"), 100.0, 160.4)
    assert blocked.status == 429 and blocked.headers["retry-after"] == "60"
    assert blocked.headers["x-spendstream-reason"] == "runaway %E2%80%94 stop"  # headers are ASCII
    assert blocked.headers["x-spendstream-breaker"] == "manual|team=search"
    assert orjson.loads(blocked.body)["error"]["message"] == "runaway — stop"
    assert "retry-after" not in answer(caller, Decision("block", "m", "b", "r"), 100.0, None).headers  # until reset
    assert answer(caller, Decision("block", "m", "b", "r"), 100.0, 99.0).headers["retry-after"] == "1"
    assert answer(caller, Decision("approval_required", "m", "b", "r"), 0, None).status == 403
    assert answer(caller._replace(approved=True), Decision("approval_required", "m", "b", "r"), 0, None).status == 200
    downgraded = answer(caller, Decision("downgrade", "gpt-4o-mini", "b", "over budget"), 0, None)
    assert downgraded.status == 200 and downgraded.headers["x-spendstream-model"] == "gpt-4o-mini"
    assert answer(caller, Decision("allow", "gpt-4o"), 0, None) == (200, {"x-spendstream-decision": "allow"}, b"")
    assert answer(None, None, 0, None).status == 401


def test_gateway_config_is_checked() -> None:
    config = config_from_dict({"gateway": {"keys": {"sk-search-1": {"team": "search", "key": "bot"}},
                                           "unknown_keys": "unallocated", "approved_keys": ["bot"]}})
    assert config.gateway.approved_keys == ("bot",) and config.gateway.unknown_keys == "unallocated"
    with pytest.raises(ConfigError) as error:
        config_from_dict({"gateway": {"keys": {"sk-search-1": {"tema": "search"}}, "approved_keys": ["bot"],
                                      "identity_headers": {"team": "x-auth-team", "teem": "x-t"}}})
    assert error.value.problems == ["gateway.keys.sk-s…: unknown dimension 'tema'",
                                    "gateway.identity_headers: unknown dimension 'teem'",
                                    "gateway.approved_keys: 'bot' is no key's `key` in gateway.keys"]
    with pytest.raises(ConfigError, match="a key has no blanks or commas"):
        config_from_dict({"gateway": {"keys": {"sk-search-1 ": {"team": "search"}}}})
    with pytest.raises(ConfigError, match="unknown_keys"):
        config_from_dict({"gateway": {"unknown_keys": "allow"}})


@pytest.mark.parametrize("headers", [
    {"authorization": "Bearer sk-search-1,Bearer sk-vip-0001"},  # two Authorization headers, joined
    {"authorization": "Bearer sk-search-1, sk-vip-0001"},
    {"authorization": "Bearer sk-search-1 sk-vip-0001"},
    {"authorization": "Bearer sk-vip-0001", "x-auth-team": "search,ads"}])  # an identity header given twice
def test_ambiguous_credentials_are_refused_even_where_unknown_callers_pass(headers: dict[str, str]) -> None:
    lenient = GatewayConfig(keys=GATEWAY.keys, identity_headers=GATEWAY.identity_headers, unknown_keys="unallocated")
    assert identify(headers, GATEWAY, REQUIRED) is None
    assert identify(headers, lenient, REQUIRED) is None


def test_the_bearer_scheme_in_any_case_and_blanks() -> None:
    for value in ("Bearer sk-vip-0001", "BEARER\tsk-vip-0001", " bearer   sk-vip-0001\t"):
        assert bearer({"authorization": value}) == "sk-vip-0001"
    assert bearer({"authorization": "Bearer"}) is None and bearer({"authorization": "Bearersk-vip-0001"}) is None
