"""The pure ingest path: dialects, which spans count, attribution, tokens, invalid input."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, ClassVar

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from collector.attribution import (
    MAX_ORDERS,
    DimensionReader,
    SettledAttributions,
    TokenIdentity,
    token_identities,
)
from collector.ingest import IngestResult, NestedCallFilter, ingest_request
from schemas.config import AttributionConfig, Config
from tests.dialects import DIALECTS, Dialect, assert_matches
from tests.support import make_request, make_span

CONFIG = Config()


USER_KEY = b"k" * 32


def ingest(spans: Iterable[Span], config: Config = CONFIG, identity: TokenIdentity | None = None,
           resource: Mapping[str, Any] | None = None, scope: str = "test", nested: NestedCallFilter | None = None,
           user_key: bytes | None = USER_KEY) -> IngestResult:
    return ingest_request(make_request(spans, resource, scope), config, identity, nested or NestedCallFilter(),
                          user_key=user_key)


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_each_dialect_normalises_to_the_same_meters(dialect: Dialect) -> None:
    result = ingest([make_span(dialect.attrs)], scope=dialect.scope)
    assert result.rejected_spans == 0
    [event] = result.events
    assert_matches(event.to_dict(), dialect.expected)


@pytest.mark.parametrize("operation", ["invoke_agent", "invoke_workflow", "execute_tool", "create_agent",
                                       "retrieval", "fetch_response", "handle_conversation_turn", "plan"])
def test_agent_workflow_and_tool_spans_are_never_usage(operation: str) -> None:
    span = make_span({"gen_ai.operation.name": operation, "gen_ai.request.model": "gpt-4o",
                      "gen_ai.usage.input_tokens": 5000, "gen_ai.usage.output_tokens": 900})
    result = ingest([span])
    assert result.events == []
    assert result.outcomes["not_usage"] == 1


def test_plain_http_span_is_not_usage() -> None:
    result = ingest([make_span({"http.request.method": "GET"})])
    assert result.events == [] and result.rejected_spans == 0


def test_double_instrumented_call_counts_once_innermost_wins() -> None:
    trace = os.urandom(16)
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
             "gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 10}
    outer = make_span(attrs, trace_id=trace, span_id=b"\x00" * 7 + b"\x01")
    inner = make_span({**attrs, "gen_ai.provider.name": "openai"}, trace_id=trace, span_id=b"\x00" * 7 + b"\x02",
                      parent=outer.span_id)
    result = ingest([outer, inner])
    [event] = result.events
    assert event.span_id == inner.span_id.hex()
    assert result.outcomes["nested_duplicate"] == 1


def test_wrapper_arriving_in_a_later_request_is_still_skipped() -> None:
    nested = NestedCallFilter()
    trace = os.urandom(16)
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 1}
    outer = make_span(attrs, trace_id=trace)
    inner = make_span(attrs, trace_id=trace, parent=outer.span_id)
    assert len(ingest([inner], nested=nested).events) == 1
    assert ingest([outer], nested=nested).events == []


def test_sibling_calls_in_one_trace_all_count() -> None:
    trace = os.urandom(16)
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 1}
    agent = make_span({"gen_ai.operation.name": "invoke_agent"}, trace_id=trace)
    calls = [make_span(attrs, trace_id=trace, parent=agent.span_id) for _ in range(3)]
    assert len(ingest([agent, *calls]).events) == 3


def test_usage_events_are_left_out_of_the_cycle_collectors_work() -> None:
    """The collector makes thousands a second: tracked, they made it collect the whole heap ever more often."""
    [event] = ingest([make_span(DIALECTS[0].attrs)]).events
    assert not gc.is_tracked(event) and not gc.is_tracked(event.tokens)


def test_event_id_is_trace_and_span_id() -> None:
    span = make_span(DIALECTS[0].attrs)
    [event] = ingest([span]).events
    assert event.id == f"{span.trace_id.hex()}-{span.span_id.hex()}"
    assert event.start_time_unix_nano == span.start_time_unix_nano


@pytest.mark.parametrize("tokens", [-1, 1_000_000_001])
def test_negative_or_absurd_token_counts_are_rejected_and_dead_lettered(tokens: int) -> None:
    good = make_span(DIALECTS[0].attrs)
    bad = make_span({**DIALECTS[0].attrs, "gen_ai.usage.output_tokens": tokens})
    result = ingest([good, bad])
    assert [e.span_id for e in result.events] == [good.span_id.hex()]
    assert result.rejected_spans == 1
    [letter] = result.dead_letters
    assert letter.reason == "invalid_token_count"
    assert str(tokens) in letter.detail and "output" in letter.detail
    assert "token count" in result.error_message


def test_non_integer_token_count_is_rejected() -> None:
    result = ingest([make_span({**DIALECTS[0].attrs, "gen_ai.usage.input_tokens": "many"})])
    assert result.rejected_spans == 1 and result.dead_letters[0].reason == "invalid_token_count"


def test_missing_model_with_tokens_is_rejected() -> None:
    attrs = {k: v for k, v in DIALECTS[0].attrs.items() if "model" not in k}
    result = ingest([make_span(attrs)])
    assert result.events == []
    assert result.dead_letters[0].reason == "missing_model"
    assert "names no model" in result.error_message


def test_failed_call_without_model_or_tokens_is_not_usage() -> None:
    result = ingest([make_span({"gen_ai.operation.name": "chat", "error.type": "timeout"})])
    assert result.events == [] and result.rejected_spans == 0


def test_error_flag_from_error_type() -> None:
    [event] = ingest([make_span({**DIALECTS[0].attrs, "error.type": "rate_limited"})]).events
    assert event.error is True


def test_huge_values_are_cut_not_fatal() -> None:
    huge = "x" * 1_000_000
    [event] = ingest([make_span({**DIALECTS[0].attrs, "gen_ai.request.model": huge, "team.name": huge})]).events
    assert len(event.request_model or "") == CONFIG.collector.max_value_chars
    assert len(event.attribution["team"]) == CONFIG.collector.max_value_chars


def test_provider_inferred_from_server_address() -> None:
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "mistral-large-latest",
             "gen_ai.usage.input_tokens": 3, "server.address": "api.mistral.ai"}
    [event] = ingest([make_span(attrs)]).events
    assert event.provider == "mistral_ai"


class TestAttribution:
    resource: ClassVar = {"service.name": "support-bot", "team.name": "support", "deployment.environment.name": "prod"}

    def test_span_attributes_win_over_resource(self) -> None:
        span = make_span({**DIALECTS[0].attrs, "feature.name": "rag", "team.name": "search"})
        [event] = ingest([span], resource=self.resource).events
        assert event.attribution["team"] == "search"
        assert event.attribution["use_case"] == "rag"
        assert event.attribution["app"] == "support-bot"
        assert event.attribution_key == "team=search|use_case=rag|env=prod|app=support-bot|key="
        assert event.allocated

    def test_calls_of_one_resource_each_keep_their_own_claims(self) -> None:
        """Each distinct claim is settled once per resource and shared: the spans between must not blur them."""
        claims = [{"team.name": "search"}, {"team.name": "ads", "feature.name": "rag"}, {}, {"team.name": "search"},
                  {"team": "ads"}]  # the last: another name of the same dimension, the same claim
        spans = [make_span({**DIALECTS[0].attrs, **claim}) for claim in claims]
        events = ingest(spans, resource=self.resource).events
        assert [(e.attribution["team"], e.attribution["use_case"]) for e in events] == [
            ("search", "unallocated"), ("ads", "rag"), ("support", "unallocated"), ("search", "unallocated"),
            ("ads", "unallocated")]
        assert events[0].attribution == events[3].attribution and events[0].attribution_key == events[3].attribution_key

    def test_each_dimension_takes_its_first_configured_name_with_a_value(self) -> None:
        dimensions = {"team": ("a", "b"), "use_case": ("b",), "env": ("c", "d"), "app": ("e",)}
        config = replace(CONFIG, attribution=AttributionConfig(dimensions=dimensions, required=(),
                                                               key_dimensions=("team", "use_case", "env", "app")))
        attrs = {**DIALECTS[0].attrs, "d": "prod", "c": "", "b": "shared", "a": "", "e": 7}
        [event] = ingest([make_span(attrs)], config=config, resource={}).events
        assert list(event.attribution.items()) == [("team", "shared"), ("use_case", "shared"), ("env", "prod"),
                                                   ("app", "7")]

    def test_missing_required_dimension_goes_to_unallocated(self) -> None:
        [event] = ingest([make_span(DIALECTS[0].attrs)], resource={"service.name": "x"}).events
        assert event.attribution["team"] == "unallocated"
        assert event.attribution["use_case"] == "unallocated"
        assert not event.allocated

    def test_missing_dimension_rejected_when_configured(self) -> None:
        config = replace(CONFIG, attribution=AttributionConfig(on_missing="reject"))
        result = ingest([make_span(DIALECTS[0].attrs)], config=config, resource={"service.name": "x"})
        assert result.events == [] and result.dead_letters[0].reason == "missing_attribution"

    def test_ingest_token_identity_overrides_and_counts_spoofing(self) -> None:
        span = make_span({**DIALECTS[0].attrs, "feature.name": "rag", "team.name": "finance"})
        result = ingest([span], identity=TokenIdentity({"team": "support", "key": "support-rag"}),
                        resource=self.resource)
        [event] = result.events
        assert event.attribution["team"] == "support"
        assert event.attribution["key"] == "support-rag"
        assert result.outcomes["spoofed"] == 1

    def test_user_ids_are_hashed_by_default_and_stable(self) -> None:
        spans = [make_span({**DIALECTS[0].attrs, "enduser.id": "alice@example.com"}) for _ in range(2)]
        first, second = ingest(spans).events
        assert "alice" not in first.attribution["user"]
        assert first.attribution["user"] == second.attribution["user"]
        assert first.attribution["user"].startswith("uh_")

    def test_user_id_hash_is_keyed(self) -> None:
        import hashlib  # noqa: PLC0415
        import hmac  # noqa: PLC0415

        span = make_span({**DIALECTS[0].attrs, "enduser.id": "alice@example.com"})
        [one] = ingest([span]).events
        [other] = ingest([span], user_key=b"another key, 32 bytes long......").events
        assert one.attribution["user"] != other.attribution["user"]
        # HMAC-SHA256 under the key, first 128 bits: anyone with the key (and only they) can recompute it
        expected = hmac.new(USER_KEY, b"alice@example.com", hashlib.sha256).hexdigest()[:32]
        assert one.attribution["user"] == f"uh_{expected}"
        # the unkeyed hash of earlier versions (sha256 of salt + id) is not what comes out
        assert hashlib.sha256(b"alice@example.com").hexdigest()[:20] not in one.attribution["user"]

    def test_user_ids_are_dropped_without_a_key(self) -> None:
        [event] = ingest([make_span({**DIALECTS[0].attrs, "enduser.id": "alice@example.com"})], user_key=None).events
        assert "user" not in event.attribution

    def test_user_ids_kept_when_hashing_is_off(self) -> None:
        config = replace(CONFIG, attribution=AttributionConfig(hash_user_ids=False))
        [event] = ingest([make_span({**DIALECTS[0].attrs, "enduser.id": "u-42"})], config=config,
                         user_key=None).events
        assert event.attribution["user"] == "u-42"

    def test_attributions_are_kept_from_one_request_to_the_next_per_identity_and_resource(self) -> None:
        """A collector settles each attribution once (SettledAttributions), not once per request; what it keeps
        must not leak from one ingest token, or one resource, to another."""
        settled = SettledAttributions()
        claim = {**DIALECTS[0].attrs, "feature.name": "rag", "enduser.id": "alice"}
        alpha, beta = TokenIdentity({"team": "alpha"}), TokenIdentity({"team": "beta"})

        def call(identity: TokenIdentity | None, resource: dict[str, str]) -> Mapping[str, str]:
            [event] = ingest_request(make_request([make_span(claim)], resource), CONFIG, identity,
                                     NestedCallFilter(), user_key=USER_KEY, settled=settled).events
            return event.attribution

        first, again = call(alpha, self.resource), call(alpha, self.resource)
        assert again is first  # settled once, by the first request
        assert call(beta, self.resource)["team"] == "beta"
        assert call(None, self.resource)["team"] == "support"
        assert call(None, {**self.resource, "service.name": "other-bot"})["app"] == "other-bot"
        assert call(alpha, self.resource) is first

    def test_kept_attributions_are_bounded(self) -> None:
        settled = SettledAttributions(capacity=2)
        for use_case in ("a", "b", "c"):
            ingest_request(make_request([make_span({**DIALECTS[0].attrs, "feature.name": use_case})]), CONFIG, None,
                           NestedCallFilter(), user_key=USER_KEY, settled=settled)
        assert len(settled.of(None)) <= 2

    def test_kept_attributions_are_bounded_within_a_request_and_across_identities(self) -> None:
        # one request of many distinct claims: the bound holds on every insert, not once a request
        settled = SettledAttributions(capacity=10)
        spans = [make_span({**DIALECTS[0].attrs, "feature.name": f"uc-{n}"}) for n in range(50)]
        ingest_request(make_request(spans), CONFIG, None, NestedCallFilter(), user_key=USER_KEY, settled=settled)
        assert 0 < len(settled.of(None)) <= 10
        # one budget for every identity: two tokens together stay within it
        identities = token_identities({"tok-a-secret": {"team": "a"}, "tok-b-secret": {"team": "b"}}, 256)
        for identity in identities.values():
            ingest_request(make_request(spans), CONFIG, identity, NestedCallFilter(), user_key=USER_KEY,
                           settled=settled)
        assert sum(len(settled.of(identity)) for identity in [None, *identities.values()]) <= 10

    def test_kept_attributions_are_bounded_by_the_text_they_hold(self) -> None:
        settled = SettledAttributions(max_chars=3_000)
        spans = [make_span({**DIALECTS[0].attrs, "feature.name": f"{n:03d}" + "\U0001f600" * 250})
                 for n in range(40)]
        result = ingest_request(make_request(spans), CONFIG, None, NestedCallFilter(), user_key=USER_KEY,
                                settled=settled)
        assert len(result.events) == 40
        assert len(settled.of(None)) <= 3_000 // 256  # ~256 characters each

    def test_a_reader_remembers_the_order_of_a_bounded_number_of_name_sets(self) -> None:
        reader = DimensionReader(CONFIG.attribution)
        names = sorted({name for dim_names in CONFIG.attribution.dimensions.values() for name in dim_names})[:12]
        for n in range(2 ** len(names)):  # each span of a request could carry another set of configured names
            reader.read({name: AnyValue(string_value="x") for i, name in enumerate(names) if n >> i & 1}, 256)
        assert len(reader._orders) == MAX_ORDERS


class TestTokenBinding:
    """A token's spans cannot charge a value another token binds, on any dimension."""

    tokens: ClassVar = {"tok-a-secret": {"team": "a"},
                        "tok-b-secret": {"team": "b", "key": "key-b", "cost_center": "cc-b"},
                        "tok-c-secret": {"team": "c", "key": "key-c"}}
    identities = token_identities(tokens, 256)

    def test_identities_know_what_other_tokens_bind(self) -> None:
        a = self.identities["tok-a-secret"]
        assert a.bound == {"team": "a"}
        assert a.foreign == {"key": {"key-b", "key-c"}, "cost_center": {"cc-b"}}
        assert self.identities["tok-c-secret"].foreign == {"cost_center": {"cc-b"}}

    def test_claims_of_another_tokens_values_are_dropped(self) -> None:
        span = make_span({**DIALECTS[0].attrs, "team.name": "b", "gen_ai.virtual_key": "key-b",
                          "cost_center": "cc-b", "feature.name": "rag"})
        result = ingest([span], identity=self.identities["tok-a-secret"])
        [event] = result.events
        assert event.attribution["team"] == "a"
        assert "key" not in event.attribution
        assert "cost_center" not in event.attribution
        assert event.attribution["use_case"] == "rag"  # bound by nobody: free to claim
        assert result.outcomes["spoofed"] == 1

    def test_unbound_values_stay_free_to_claim(self) -> None:
        span = make_span({**DIALECTS[0].attrs, "gen_ai.virtual_key": "key-a-own", "cost_center": "cc-a"})
        [event] = ingest([span], identity=self.identities["tok-a-secret"]).events
        assert event.attribution["key"] == "key-a-own"
        assert event.attribution["cost_center"] == "cc-a"

    def test_a_value_two_tokens_share_is_theirs(self) -> None:
        identities = token_identities({"t1-secret": {"team": "x", "key": "shared"},
                                       "t2-secret": {"team": "y", "key": "shared"},
                                       "t3-secret": {"team": "z"}}, 256)
        assert identities["t1-secret"].foreign == {}
        assert identities["t3-secret"].foreign == {"key": {"shared"}}

    def test_required_dimension_claimed_from_another_token_is_unallocated(self) -> None:
        config = replace(CONFIG, attribution=AttributionConfig(required=("team", "use_case", "env", "key")))
        span = make_span({**DIALECTS[0].attrs, "gen_ai.virtual_key": "key-c"})
        [event] = ingest([span], config=config, identity=self.identities["tok-a-secret"]).events
        assert event.attribution["key"] == "unallocated"
        assert not event.allocated


YEAR_2200_NS = 7_258_118_400 * 10**9
NOW_NS = 1_795_000_000 * 10**9


@pytest.mark.parametrize(("start_ns", "why"), [
    (YEAR_2200_NS, "after it arrived"),
    (2**64 - 1, "after it arrived"),
    (NOW_NS - 3601 * 10**9, "before it arrived"),
    (0, "before it arrived"),
])
def test_a_call_stamped_outside_the_event_time_bounds_is_dead_lettered(start_ns: int, why: str) -> None:
    good, bad = make_span(DIALECTS[0].attrs, start_ns=NOW_NS - 10**9), make_span(DIALECTS[0].attrs, start_ns=start_ns)
    result = ingest_request(make_request([good, bad]), CONFIG, None, NestedCallFilter(), received_ns=NOW_NS)
    assert [e.span_id for e in result.events] == [good.span_id.hex()]
    [letter] = result.dead_letters
    assert letter.reason == "invalid_timestamp" and why in letter.detail
    assert result.outcomes["rejected:invalid_timestamp"] == 1


def test_the_bounds_are_inclusive_and_configurable() -> None:
    config = replace(CONFIG, collector=replace(CONFIG.collector, max_lateness_s=60, max_skew_s=0))
    spans = [make_span(DIALECTS[0].attrs, start_ns=NOW_NS - 60 * 10**9), make_span(DIALECTS[0].attrs, start_ns=NOW_NS),
             make_span(DIALECTS[0].attrs, start_ns=NOW_NS + 1)]
    result = ingest_request(make_request(spans), config, None, NestedCallFilter(), received_ns=NOW_NS)
    assert len(result.events) == 2 and result.dead_letters[0].reason == "invalid_timestamp"


class TestUserIdKey:
    """The collector takes the HMAC key from the environment variable the config names."""

    def test_the_key_comes_from_the_named_variable(self) -> None:
        from collector.app import user_id_key  # noqa: PLC0415

        config = replace(CONFIG, attribution=AttributionConfig(user_id_key_env="MY_KEY"))
        assert user_id_key(config, {"MY_KEY": "s" * 32, "SPENDSTREAM_USER_ID_KEY": "other" * 8}) == b"s" * 32

    def test_unset_means_no_key_and_a_warning(self, caplog: pytest.LogCaptureFixture) -> None:
        from collector.app import user_id_key  # noqa: PLC0415

        assert user_id_key(CONFIG, {}) is None
        assert "SPENDSTREAM_USER_ID_KEY is not set" in caplog.text

    def test_a_short_key_is_refused(self) -> None:
        from collector.app import user_id_key  # noqa: PLC0415
        from schemas.errors import ConfigError  # noqa: PLC0415

        with pytest.raises(ConfigError, match="at least 16"):
            user_id_key(CONFIG, {"SPENDSTREAM_USER_ID_KEY": "short"})

    def test_no_key_needed_when_hashing_is_off(self) -> None:
        from collector.app import user_id_key  # noqa: PLC0415

        config = replace(CONFIG, attribution=AttributionConfig(hash_user_ids=False))
        assert user_id_key(config, {"SPENDSTREAM_USER_ID_KEY": "short"}) is None


def test_litellm_spans_are_attributed_to_the_virtual_key_and_its_team() -> None:
    [litellm] = [d for d in DIALECTS if d.name == "litellm_proxy"]
    [event] = ingest([make_span(litellm.attrs)]).events
    assert (event.attribution["team"], event.attribution["key"]) == ("ads", "ads-key")
