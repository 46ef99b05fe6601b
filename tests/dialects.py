"""One model call as each instrumentation generation really writes it (shared/reference/genai-semconv.md §2f),
with the UsageEvent fields the collector must derive from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class Dialect:
    name: str
    attrs: dict[str, Any]
    expected: dict[str, Any]  # UsageEvent fields; "tokens" as a dict
    scope: str = "test"
    resource: dict[str, Any] | None = None


DIALECTS = [
    Dialect("semconv_v1_41", {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 200,
        "gen_ai.usage.cache_read.input_tokens": 400, "gen_ai.usage.cache_creation.input_tokens": 100,
        "gen_ai.usage.reasoning.output_tokens": 50, "openai.response.service_tier": "flex",
        "server.address": "api.openai.com",
    }, {"operation": "chat", "provider": "openai", "request_model": "gpt-4o",
        "response_model": "gpt-4o-2024-08-06", "dialect": "semconv", "service_tier": "flex",
        "tokens": {"input_uncached": 500, "cache_read": 400, "cache_write": 100, "output": 200, "reasoning": 50}}),
    Dialect("semconv_genai_main", {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-sonnet-4-5", "gen_ai.usage.input_tokens": 1500,
        "gen_ai.usage.output_tokens": 100, "gen_ai.usage.cache_read.input_tokens": 1000,
        "gen_ai.usage.cache_write.input_tokens": 200,
    }, {"operation": "chat", "provider": "anthropic", "request_model": "claude-sonnet-4-5", "response_model": None,
        "dialect": "semconv",
        "tokens": {"input_uncached": 300, "cache_read": 1000, "cache_write": 200, "output": 100, "reasoning": 0}}),
    # the conventions' own repository (semantic-conventions-genai): modality breakdowns, subsets of the totals
    Dialect("semconv_genai_modalities", {
        "gen_ai.operation.name": "generate_content", "gen_ai.provider.name": "gcp.gemini",
        "gen_ai.request.model": "gemini-2.5-flash", "gen_ai.usage.input_tokens": 1200,
        "gen_ai.usage.output_tokens": 300, "gen_ai.usage.cache_read.input_tokens": 200,
        "gen_ai.usage.reasoning.output_tokens": 100, "gen_ai.usage.text.input_tokens": 900,
        "gen_ai.usage.image.input_tokens": 300, "gen_ai.usage.text.output_tokens": 300,
    }, {"operation": "generate_content", "provider": "gcp.gemini", "request_model": "gemini-2.5-flash",
        "dialect": "semconv",
        "extra": {"tokens.input.text": "900", "tokens.input.image": "300", "tokens.output.text": "300"},
        "tokens": {"input_uncached": 1000, "cache_read": 200, "cache_write": 0, "output": 300, "reasoning": 100}}),
    Dialect("semconv_deprecated", {
        "gen_ai.system": "az.ai.openai", "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.usage.prompt_tokens": 700, "gen_ai.usage.completion_tokens": 70,
        "gen_ai.openai.request.service_tier": "default",
    }, {"operation": "chat", "provider": "azure.ai.openai", "request_model": "gpt-4o-mini",
        "dialect": "semconv_deprecated", "service_tier": "default",
        "tokens": {"input_uncached": 700, "cache_read": 0, "cache_write": 0, "output": 70, "reasoning": 0}}),
    Dialect("openai_v2_default", {
        "gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18", "gen_ai.usage.input_tokens": 33,
        "gen_ai.usage.output_tokens": 9, "gen_ai.response.id": "chatcmpl-1",
    }, {"operation": "chat", "provider": "openai", "response_model": "gpt-4o-mini-2024-07-18",
        "dialect": "semconv",
        "tokens": {"input_uncached": 33, "cache_read": 0, "cache_write": 0, "output": 9, "reasoning": 0}}),
    Dialect("openllmetry_new", {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic", "llm.request.type": "chat",
        "gen_ai.request.model": "claude-haiku-4-5", "gen_ai.response.model": "claude-haiku-4-5-20251001",
        "gen_ai.usage.input_tokens": 1500, "gen_ai.usage.output_tokens": 100, "gen_ai.usage.total_tokens": 1600,
        "gen_ai.usage.cache_read.input_tokens": 1000, "gen_ai.usage.cache_creation.input_tokens": 200,
        "gen_ai.usage.reasoning_tokens": 30,
    }, {"operation": "chat", "provider": "anthropic", "response_model": "claude-haiku-4-5-20251001",
        "dialect": "semconv",
        "tokens": {"input_uncached": 300, "cache_read": 1000, "cache_write": 200, "output": 100, "reasoning": 30}},
        scope="opentelemetry.instrumentation.anthropic"),
    Dialect("openllmetry_legacy", {
        "llm.request.type": "completion", "gen_ai.system": "Anthropic", "gen_ai.request.model": "claude-2.1",
        "gen_ai.usage.prompt_tokens": 1500, "gen_ai.usage.completion_tokens": 100, "llm.usage.total_tokens": 1600,
        "gen_ai.usage.cache_read_input_tokens": 1000, "gen_ai.usage.cache_creation_input_tokens": 200,
        "llm.usage.reasoning_tokens": 5,
    }, {"operation": "text_completion", "provider": "anthropic", "request_model": "claude-2.1",
        "dialect": "openllmetry_legacy",
        "tokens": {"input_uncached": 300, "cache_read": 1000, "cache_write": 200, "output": 100, "reasoning": 5}}),
    Dialect("openlit_openai", {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "telemetry.sdk.name": "openlit",
        "gen_ai.request.model": "gpt-4.1", "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 10,
        "gen_ai.usage.cache_read.input_tokens": 400, "gen_ai.client.token.usage": 1010, "gen_ai.usage.cost": 0.0021,
    }, {"operation": "chat", "provider": "openai", "dialect": "openlit", "extra": {"reported_cost_usd": "0.0021"},
        "tokens": {"input_uncached": 600, "cache_read": 400, "cache_write": 0, "output": 10, "reasoning": 0}}),
    Dialect("openlit_anthropic_exclusive", {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-sonnet-4-5", "gen_ai.usage.input_tokens": 300,
        "gen_ai.usage.output_tokens": 100, "gen_ai.usage.cache_read.input_tokens": 1000,
        "gen_ai.usage.cache_creation.input_tokens": 200,
    }, {"operation": "chat", "provider": "anthropic", "dialect": "openlit",
        "tokens": {"input_uncached": 300, "cache_read": 1000, "cache_write": 200, "output": 100, "reasoning": 0}},
        scope="openlit.instrumentation.anthropic"),
    Dialect("openinference", {
        "openinference.span.kind": "LLM", "llm.model_name": "claude-3-5-sonnet-20241022", "llm.provider": "anthropic",
        "llm.system": "anthropic", "llm.token_count.prompt": 1500, "llm.token_count.completion": 100,
        "llm.token_count.total": 1600, "llm.token_count.prompt_details.cache_read": 1000,
        "llm.token_count.prompt_details.cache_write": 200, "llm.token_count.completion_details.reasoning": 20,
        "llm.cost.total": 0.0123,
    }, {"operation": "chat", "provider": "anthropic", "response_model": "claude-3-5-sonnet-20241022",
        "dialect": "openinference", "extra": {"reported_cost_usd": "0.0123"},
        "tokens": {"input_uncached": 300, "cache_read": 1000, "cache_write": 200, "output": 100, "reasoning": 20}}),
    Dialect("langfuse", {
        "langfuse.observation.type": "generation", "langfuse.observation.model.name": "gpt-4o",
        "langfuse.observation.usage_details": orjson.dumps({
            "input": 300, "output": 100, "input_cached_tokens": 1000, "input_cache_creation": 200,
            "output_reasoning_tokens": 20}).decode(),
        "langfuse.observation.cost_details": '{"input": 0.001, "output": 0.002, "total": 0.003}',
    }, {"operation": "chat", "provider": None, "request_model": "gpt-4o", "dialect": "langfuse",
        "tokens": {"input_uncached": 300, "cache_read": 1000, "cache_write": 200, "output": 100, "reasoning": 20}}),
    Dialect("vercel_ai", {
        "ai.operationId": "ai.generateText.doGenerate", "ai.model.id": "gpt-4o-mini",
        "ai.model.provider": "openai.chat",
        "gen_ai.system": "openai.chat", "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 100,
        "ai.usage.cachedInputTokens": 400, "ai.usage.reasoningTokens": 10,
    }, {"operation": "chat", "provider": "openai", "request_model": "gpt-4o-mini", "dialect": "vercel_ai",
        "tokens": {"input_uncached": 600, "cache_read": 400, "cache_write": 0, "output": 100, "reasoning": 10}},
        scope="ai"),
    Dialect("litellm_proxy", {  # LiteLLM's `otel` callback, on its proxy, calling the model group `fast`
        "litellm.call_id": "3a9c4b0b-8c2b-4d0f-9991-020b0ea1b1b2", "llm.request.type": "acompletion",
        "gen_ai.system": "openai", "gen_ai.request.model": "fast", "gen_ai.response.model": "fast",
        "litellm.model_group": "fast", "litellm.provider.model": "openai/gpt-4o-mini",
        "gen_ai.usage.input_tokens": 1234, "gen_ai.usage.output_tokens": 56, "gen_ai.usage.total_tokens": 1290,
        "metadata.usage_object": "{'completion_tokens': 56, 'prompt_tokens': 1234, 'total_tokens': 1290, "
                                 "'completion_tokens_details': {'reasoning_tokens': 6, 'audio_tokens': None}, "
                                 "'prompt_tokens_details': {'audio_tokens': None, 'cached_tokens': 1024}}",
        "metadata.user_api_key_alias": "ads-key", "metadata.user_api_key_team_alias": "ads",
        "metadata.user_api_key_team_id": "team-ads", "gen_ai.cost.total_cost": 0.002365,
    }, {"operation": "chat", "provider": "openai", "request_model": "gpt-4o-mini", "response_model": None,
        "dialect": "litellm", "extra": {"reported_cost_usd": "0.002365"},
        "tokens": {"input_uncached": 210, "cache_read": 1024, "cache_write": 0, "output": 56, "reasoning": 6}}),
]


def assert_matches(event_dict: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        assert event_dict[key] == value, f"{key}: {event_dict[key]!r} != {value!r}"
