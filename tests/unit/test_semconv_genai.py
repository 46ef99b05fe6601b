"""Every token, provider and operation name the GenAI semantic conventions define today, against the collector.

The names are those of open-telemetry/semantic-conventions-genai (stability "development"),
model/gen-ai/registry.yaml at commit 002c8a6ea1c8: `gen_ai.provider.name`, `gen_ai.operation.name`
and the `gen_ai.usage.*` attributes. When the conventions add a name, add it here first.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from collector.ingest import IngestResult, NestedCallFilter, ingest_request
from pipeline.pricing.catalog import PriceCatalog, UnpricedError
from pipeline.pricing.price import price_usage
from schemas.config import Config
from tests.support import make_request, make_span

PROVIDERS = ("openai", "gcp.gen_ai", "gcp.vertex_ai", "gcp.gemini", "anthropic", "cohere", "azure.ai.inference",
             "azure.ai.openai", "ibm.watsonx.ai", "aws.bedrock", "perplexity", "x_ai", "deepseek", "groq",
             "mistral_ai", "moonshot_ai")
#: the providers genai-prices publishes no prices for: their calls are dead-lettered, never priced at 0
UNPRICED_PROVIDERS = {"ibm.watsonx.ai"}
USAGE_OPERATIONS = {"chat": "chat", "generate_content": "generate_content", "text_completion": "text_completion",
                    "embeddings": "embeddings"}
#: spans that wrap or sit beside model calls; an agent or workflow span may carry the sum of its calls' tokens
NEVER_USAGE_OPERATIONS = ("retrieval", "create_agent", "invoke_agent", "execute_tool", "invoke_workflow", "plan",
                          "search_memory", "create_memory", "update_memory", "upsert_memory", "delete_memory",
                          "create_memory_store", "delete_memory_store")
MODALITY_TOKENS = {
    "gen_ai.usage.text.input_tokens": "input.text", "gen_ai.usage.image.input_tokens": "input.image",
    "gen_ai.usage.audio.input_tokens": "input.audio", "gen_ai.usage.video.input_tokens": "input.video",
    "gen_ai.usage.text.output_tokens": "output.text", "gen_ai.usage.audio.output_tokens": "output.audio",
}
CONFIG = Config()


def ingest(attrs: dict[str, object]) -> IngestResult:
    return ingest_request(make_request([make_span(attrs)], None, "test"), CONFIG, None, NestedCallFilter(),
                          user_key=b"k" * 32)


def call(**extra: object) -> dict[str, object]:
    return {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.provider.name": "openai",
            "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 100, **extra}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_provider_name_is_kept_as_the_conventions_spell_it(provider: str) -> None:
    [event] = ingest(call(**{"gen_ai.provider.name": provider})).events
    assert event.provider == provider


def test_every_provider_reaches_its_price_list_or_is_known_to_have_none() -> None:
    from genai_prices import data_snapshot  # noqa: PLC0415

    from pipeline.pricing.catalog import PROVIDER_IDS  # noqa: PLC0415

    published = {p.id for p in data_snapshot.get_snapshot().providers}
    missing = {p for p in PROVIDERS if PROVIDER_IDS.get(p, p) not in published}
    assert missing == UNPRICED_PROVIDERS


def test_a_moonshot_call_is_priced_at_moonshots_prices() -> None:
    catalog = PriceCatalog.from_config(CONFIG)
    [event] = ingest(call(**{"gen_ai.provider.name": "moonshot_ai", "gen_ai.request.model": "kimi-k2"})).events
    priced = price_usage(event, catalog)
    assert priced.list_cost > Decimal(0)
    [watsonx] = ingest(call(**{"gen_ai.provider.name": "ibm.watsonx.ai",
                               "gen_ai.request.model": "ibm/granite-3-8b-instruct"})).events
    with pytest.raises(UnpricedError):
        price_usage(watsonx, catalog)


@pytest.mark.parametrize(("host", "provider"), [("api.perplexity.ai", "perplexity"), ("api.moonshot.ai", "moonshot_ai"),
                                                ("us-south.ml.cloud.ibm.com", "ibm.watsonx.ai")])
def test_the_newer_providers_are_found_from_the_host(host: str, provider: str) -> None:
    attrs = call(**{"server.address": host})
    del attrs["gen_ai.provider.name"]
    [event] = ingest(attrs).events
    assert event.provider == provider


@pytest.mark.parametrize(("operation", "canonical"), USAGE_OPERATIONS.items())
def test_the_model_call_operations_are_usage(operation: str, canonical: str) -> None:
    [event] = ingest(call(**{"gen_ai.operation.name": operation})).events
    assert event.operation == canonical


@pytest.mark.parametrize("operation", NEVER_USAGE_OPERATIONS)
def test_agent_planning_memory_and_tool_operations_are_never_usage(operation: str) -> None:
    result = ingest(call(**{"gen_ai.operation.name": operation}))  # even when they report tokens
    assert result.events == [] and result.outcomes["not_usage"] == 1


def test_modality_breakdowns_ride_along_without_changing_the_meters() -> None:
    breakdown = {"gen_ai.usage.text.input_tokens": 700, "gen_ai.usage.image.input_tokens": 200,
                 "gen_ai.usage.audio.input_tokens": 60, "gen_ai.usage.video.input_tokens": 40,
                 "gen_ai.usage.text.output_tokens": 80, "gen_ai.usage.audio.output_tokens": 20}
    assert set(breakdown) == set(MODALITY_TOKENS)
    [event] = ingest(call(**breakdown)).events
    assert event.extra == {f"tokens.{MODALITY_TOKENS[name]}": str(count) for name, count in breakdown.items()}
    [plain] = ingest(call()).events
    assert event.tokens == plain.tokens and plain.extra == {}


def test_openinference_audio_tokens_too() -> None:
    attrs = {"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o-audio-preview", "llm.provider": "openai",
             "llm.token_count.prompt": 500, "llm.token_count.completion": 50,
             "llm.token_count.prompt_details.audio": 300, "llm.token_count.completion_details.audio": 40}
    [event] = ingest(attrs).events
    assert event.extra == {"tokens.input.audio": "300", "tokens.output.audio": "40"}


@pytest.mark.parametrize("count", [-1, 10**12, "many"])
def test_a_bad_modality_count_is_dead_lettered(count: object) -> None:
    result = ingest(call(**{"gen_ai.usage.audio.input_tokens": count}))
    assert result.events == [] and result.rejected_spans == 1
