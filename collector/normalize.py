"""Map one OTLP span of any GenAI dialect to the fields of a UsageEvent. Pure: no I/O, no clock.

Follows the recipe in shared/reference/genai-semconv.md §5: which spans are usage, which
attribute wins for model, provider and each token meter, and which dialects report input
tokens exclusive of cache tokens.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Mapping
from typing import Final

import msgspec
import orjson
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from schemas.errors import PermanentError
from schemas.usage import TokenCounts

Attrs = Mapping[str, AnyValue]

#: Operation names that are priced, mapped to their canonical semconv name.
BILLABLE_OPERATIONS: Final[Mapping[str, str]] = {
    "chat": "chat",
    "text_completion": "text_completion",
    "generate_content": "generate_content",
    "embeddings": "embeddings",
    # legacy and ad-hoc spellings still in the wild (Langfuse, pre-2025 OpenLLMetry)
    "completion": "text_completion",
    "generate": "generate_content",
    "embedding": "embeddings",
}
_OPENINFERENCE_KINDS: Final[Mapping[str, str]] = {"LLM": "chat", "EMBEDDING": "embeddings"}
#: LiteLLM's call types (its `llm.request.type`): its `completion` is a chat call, not the legacy text completion
_LITELLM_CALL_TYPES: Final[Mapping[str, str]] = {
    "completion": "chat", "acompletion": "chat", "responses": "chat", "aresponses": "chat",
    "text_completion": "text_completion", "atext_completion": "text_completion",
    "embedding": "embeddings", "aembedding": "embeddings",
}
#: on every span of LiteLLM's `otel` callback
_LITELLM_MARKER: Final = "litellm.call_id"

_PROVIDER_ALIASES: Final[Mapping[str, str]] = {
    "xai": "x_ai",
    "az.ai.inference": "azure.ai.inference",
    "az.ai.openai": "azure.ai.openai",
    "vertex_ai": "gcp.vertex_ai",
    "gemini": "gcp.gemini",
    "google": "gcp.gemini",
    "bedrock": "aws.bedrock",
    "mistralai": "mistral_ai",
    "mistral": "mistral_ai",
}
#: server.address suffix -> provider, for spans that name no provider.
_PROVIDER_HOSTS: Final = (
    ("api.openai.com", "openai"),
    ("openai.azure.com", "azure.ai.openai"),
    ("api.anthropic.com", "anthropic"),
    ("generativelanguage.googleapis.com", "gcp.gemini"),
    ("aiplatform.googleapis.com", "gcp.vertex_ai"),
    ("amazonaws.com", "aws.bedrock"),
    ("api.mistral.ai", "mistral_ai"),
    ("api.groq.com", "groq"),
    ("api.deepseek.com", "deepseek"),
    ("api.x.ai", "x_ai"),
    ("api.cohere.com", "cohere"),
    ("api.cohere.ai", "cohere"),
    ("openrouter.ai", "openrouter"),
    ("api.perplexity.ai", "perplexity"),
    ("api.moonshot.ai", "moonshot_ai"),
    ("api.moonshot.cn", "moonshot_ai"),
    ("ml.cloud.ibm.com", "ibm.watsonx.ai"),
)

_INPUT: Final = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.token_count.prompt",
                 "ai.usage.promptTokens")
_OUTPUT: Final = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens", "llm.token_count.completion",
                  "ai.usage.completionTokens")
_TOKEN_TOTALS: Final = _INPUT + _OUTPUT
_CACHE_READ: Final = ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens",
                      "llm.token_count.prompt_details.cache_read", "ai.usage.cachedInputTokens")
_CACHE_WRITE: Final = ("gen_ai.usage.cache_write.input_tokens", "gen_ai.usage.cache_creation.input_tokens",
                       "gen_ai.usage.cache_creation_input_tokens", "llm.token_count.prompt_details.cache_write")
_REASONING: Final = ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens",
                     "llm.usage.reasoning_tokens", "llm.token_count.completion_details.reasoning",
                     "ai.usage.reasoningTokens")
_RESPONSE_MODEL: Final = ("gen_ai.response.model", "llm.response.model_name", "llm.model_name")
_REQUEST_MODEL: Final = ("gen_ai.request.model", "llm.request.model_name", "ai.model.id",
                         "langfuse.observation.model.name")
#: the modality breakdowns of the GenAI conventions (gen_ai.usage.<modality>.<input|output>_tokens, subsets of the
#: totals) and OpenInference's -> "<input|output>.<modality>"; carried on the event (extra), not priced apart
_MODALITY_TOKENS: Final[Mapping[str, str]] = {
    **{f"gen_ai.usage.{m}.input_tokens": f"input.{m}" for m in ("text", "image", "audio", "video")},
    **{f"gen_ai.usage.{m}.output_tokens": f"output.{m}" for m in ("text", "audio")},
    "llm.token_count.prompt_details.audio": "input.audio",
    "llm.token_count.completion_details.audio": "output.audio",
}
_MODALITY_NAMES: Final = frozenset(_MODALITY_TOKENS)
_SERVICE_TIER: Final = ("openai.response.service_tier", "openai.request.service_tier",
                        "gen_ai.openai.response.service_tier", "gen_ai.openai.request.service_tier")
_REPORTED_COST: Final = ("gen_ai.usage.cost", "llm.cost.total", "gen_ai.cost.total_cost")
_LANGFUSE_USAGE: Final = "langfuse.observation.usage_details"
_LITELLM_USAGE: Final = "metadata.usage_object"
_LITELLM_MODEL: Final = "litellm.provider.model"
_OPERATION: Final = "gen_ai.operation.name"
_REQUEST_TYPE: Final = "llm.request.type"  # OpenLLMetry's and LiteLLM's operation
_OPENINFERENCE_KIND: Final = "openinference.span.kind"
_SDK_NAME: Final = "telemetry.sdk.name"
_VERCEL_MODEL: Final = "ai.model.id"
_VERCEL_PROVIDER: Final = ("ai.model.provider", "gen_ai.system")
_LEGACY_MARKERS: Final = ("llm.request.type", "llm.usage.total_tokens", "gen_ai.usage.cache_read_input_tokens")
_SERVER_ADDRESS: Final = ("server.address",)
_PROVIDER: Final = ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system")
_ERROR_TYPE: Final = "error.type"
#: Every span attribute normalize_span reads: the collector converts only these (and the attribution
#: dimensions) of a span's attributes, as converting every protobuf value of every span is its biggest cost.
READ_KEYS: Final = frozenset({
    *_TOKEN_TOTALS, *_CACHE_READ, *_CACHE_WRITE, *_REASONING, *_RESPONSE_MODEL, *_REQUEST_MODEL,
    *_MODALITY_TOKENS, *_SERVICE_TIER, *_REPORTED_COST, _LANGFUSE_USAGE, _LITELLM_USAGE, _LITELLM_MARKER,
    _LITELLM_MODEL, _OPERATION, _REQUEST_TYPE, _OPENINFERENCE_KIND, _SDK_NAME, _VERCEL_MODEL, *_VERCEL_PROVIDER,
    *_LEGACY_MARKERS, *_SERVER_ADDRESS, *_PROVIDER, _ERROR_TYPE,
})


class InvalidSpan(PermanentError):
    """A usage span that cannot be priced as sent. `reason` is a stable code for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class SpanUsage(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What one usage span says about its model call, before attribution. (A Struct, not a dataclass: made
    for every call, and a frozen dataclass's __init__ costs a Python call per field; untracked by the cycle
    collector, as UsageEvent is.)"""

    operation: str
    provider: str | None
    request_model: str | None
    response_model: str | None
    tokens: TokenCounts
    dialect: str
    service_tier: str | None
    server_address: str | None
    error: bool
    reported_cost_usd: str | None
    #: "<input|output>.<modality>" -> tokens, where the span breaks its totals down by modality
    modality_tokens: Mapping[str, int]


def any_value_str(value: AnyValue) -> str | None:
    """The value as a string if it is a scalar, else None (arrays and maps are never identities)."""
    text = value.string_value  # the common case in one read: only a string value makes it non-empty
    if text:
        return text
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return str(value.int_value)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "double_value":
        return repr(value.double_value)
    return None


def _first_str(attrs: Attrs, names: tuple[str, ...], max_chars: int) -> str | None:
    for name in names:
        value = attrs.get(name)
        if value is not None:
            text = any_value_str(value)
            if text:
                return text[:max_chars]
    return None


def _to_int(name: str, value: AnyValue) -> int:
    count = value.int_value  # the common case in one read: only an integer value makes it non-zero
    if count:
        return count
    kind = value.WhichOneof("value")
    if kind == "int_value":
        return value.int_value
    if kind == "double_value" and value.double_value.is_integer():
        return int(value.double_value)
    if kind == "string_value":
        try:
            return int(value.string_value)
        except ValueError:
            pass
    raise InvalidSpan("invalid_token_count", f"{name} is not an integer")


def _operation(attrs: Attrs) -> str | None:
    """The canonical billable operation, "" for a known non-billable span, None if it names none."""
    for name in (_OPERATION, _REQUEST_TYPE):
        value = attrs.get(name)
        if value is not None:
            names = _LITELLM_CALL_TYPES if name == _REQUEST_TYPE and _LITELLM_MARKER in attrs \
                else BILLABLE_OPERATIONS
            return names.get(value.string_value.lower(), "")
    kind = attrs.get(_OPENINFERENCE_KIND)
    if kind is not None:
        return _OPENINFERENCE_KINDS.get(kind.string_value.upper(), "")
    if _LANGFUSE_USAGE in attrs:
        return "chat"
    return None


def _dialect(attrs: Attrs, resource: Attrs, scope_name: str) -> str:
    if _LITELLM_MARKER in attrs:
        return "litellm"
    if _OPENINFERENCE_KIND in attrs or "llm.token_count.prompt" in attrs:
        return "openinference"
    if _LANGFUSE_USAGE in attrs:
        return "langfuse"
    sdk = attrs.get(_SDK_NAME) or resource.get(_SDK_NAME)
    if scope_name.startswith("openlit") or (sdk is not None and sdk.string_value == "openlit"):
        return "openlit"
    if scope_name == "ai" or _VERCEL_MODEL in attrs:
        return "vercel_ai"
    if "gen_ai.usage.prompt_tokens" in attrs:
        if any(m in attrs for m in _LEGACY_MARKERS) or "traceloop" in scope_name:
            return "openllmetry_legacy"
        return "semconv_deprecated"
    return "semconv"


@functools.lru_cache(maxsize=1024)  # a handful of spellings and hosts, for every call
def normalize_provider(raw: str | None, server_address: str | None) -> str | None:
    """Canonical semconv provider name: deprecated spellings mapped, else inferred from the host."""
    if raw:
        name = raw.strip().lower()
        return _PROVIDER_ALIASES.get(name, name)
    if server_address:
        host = server_address.lower()
        for suffix, provider in _PROVIDER_HOSTS:
            if host.endswith(suffix):
                return provider
    return None


def _langfuse_tokens(attrs: Attrs) -> dict[str, int]:
    """Langfuse usage_details is a JSON object whose `input` already excludes cache tokens."""
    raw = attrs[_LANGFUSE_USAGE].string_value
    try:
        details = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidSpan("invalid_token_count", f"{_LANGFUSE_USAGE} is not JSON") from exc
    if not isinstance(details, dict):
        raise InvalidSpan("invalid_token_count", f"{_LANGFUSE_USAGE} is not a JSON object")

    def pick(*keys: str) -> int:
        for key in keys:
            value = details.get(key)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise InvalidSpan("invalid_token_count", f"{_LANGFUSE_USAGE}.{key} is not an integer")
                return value
        return 0

    return {
        "input": pick("input"),
        "output": pick("output"),
        "cache_read": pick("input_cached_tokens", "cache_read_input_tokens"),
        "cache_write": pick("input_cache_creation", "cache_creation_input_tokens"),
        "reasoning": pick("output_reasoning_tokens"),
    }


def _litellm_details(attrs: Attrs) -> dict[str, int]:
    """Cache and reasoning tokens of a LiteLLM span: LiteLLM writes them only inside `metadata.usage_object`, the
    Python repr of its OpenAI-style usage (a literal: `ast.literal_eval` evaluates no code). One that does not
    parse gives none, so the call is priced with its whole input uncached: dearer, never free."""
    value = attrs.get(_LITELLM_USAGE)
    try:
        usage = ast.literal_eval(value.string_value) if value is not None else None
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return {}
    if not isinstance(usage, dict):
        return {}

    def pick(*path: str) -> int:
        found: object = usage
        for key in path:
            found = found.get(key) if isinstance(found, dict) else None
        return found if isinstance(found, int) and not isinstance(found, bool) else 0

    return {
        "cache_read": pick("prompt_tokens_details", "cached_tokens"),
        "cache_write": pick("cache_creation_input_tokens") or pick("prompt_tokens_details", "cache_creation_tokens"),
        "reasoning": pick("completion_tokens_details", "reasoning_tokens"),
    }


def _litellm_model(attrs: Attrs, raw_provider: str | None, max_chars: int) -> str | None:
    """The model LiteLLM called (`openai/gpt-4o` -> `gpt-4o`), not the name the client asked for: that is a
    LiteLLM model group, an alias of the operator's choosing."""
    model = _first_str(attrs, (_LITELLM_MODEL,), max_chars)
    if model and raw_provider and model.startswith(raw_provider + "/"):
        return model[len(raw_provider) + 1:]
    return model


def _count(attrs: Attrs, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = attrs.get(name)
        if value is not None:
            return _to_int(name, value)
    return None


def _tokens(attrs: Attrs, dialect: str, provider: str | None, max_tokens: int) -> TokenCounts | None:
    """Token meters, or None when the span reports no input or output count at all."""
    if dialect == "langfuse":
        counts = _langfuse_tokens(attrs)
        input_is_exclusive = True
    else:
        input_count, output_count = _count(attrs, _INPUT), _count(attrs, _OUTPUT)
        if input_count is None and output_count is None:
            return None
        keys = attrs.keys()  # a meter most spans do not report is skipped by one test (in C) of all its names
        counts = {
            "input": input_count or 0,
            "output": output_count or 0,
            "cache_read": 0 if keys.isdisjoint(_CACHE_READ) else _count(attrs, _CACHE_READ) or 0,
            "cache_write": 0 if keys.isdisjoint(_CACHE_WRITE) else _count(attrs, _CACHE_WRITE) or 0,
            "reasoning": 0 if keys.isdisjoint(_REASONING) else _count(attrs, _REASONING) or 0,
        }
        if dialect == "litellm":
            counts.update(_litellm_details(attrs))
        # OpenLIT's Anthropic instrumentation reports Anthropic's own input_tokens, which exclude cache
        input_is_exclusive = dialect == "openlit" and provider == "anthropic"
    if min(counts.values()) < 0 or max(counts.values()) > max_tokens:  # two tests in C, not ten in Python
        meter, count = next((meter, n) for meter, n in counts.items() if n < 0 or n > max_tokens)
        raise InvalidSpan("invalid_token_count", f"{meter} token count {count} is outside 0..{max_tokens}")
    cached = counts["cache_read"] + counts["cache_write"]
    uncached = counts["input"] if input_is_exclusive else max(counts["input"] - cached, 0)
    return TokenCounts(
        input_uncached=uncached,
        cache_read=counts["cache_read"],
        cache_write=counts["cache_write"],
        output=counts["output"],
        reasoning=counts["reasoning"],
    )


def _modality_tokens(attrs: Attrs, max_tokens: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    if attrs.keys().isdisjoint(_MODALITY_NAMES):
        return counts  # most spans break nothing down: one set test instead of a lookup per name
    for name, meter in _MODALITY_TOKENS.items():
        value = attrs.get(name)
        if value is not None:
            count = _to_int(name, value)
            if count < 0 or count > max_tokens:
                raise InvalidSpan("invalid_token_count", f"{name} {count} is outside 0..{max_tokens}")
            counts[meter] = count
    return counts


def _vercel_provider(attrs: Attrs) -> str | None:
    value = attrs.get(_VERCEL_PROVIDER[0]) or attrs.get(_VERCEL_PROVIDER[1])  # e.g. "openai.chat"
    return value.string_value.split(".", 1)[0] if value is not None else None


def normalize_span(
    span: Span, attrs: Attrs, resource: Attrs, scope_name: str, *, max_tokens: int, max_chars: int
) -> SpanUsage | None:
    """Read the usage of one span; None if it is not a priceable model call.

    `attrs` and `resource` are the span's and its resource's attributes by key.
    Raises InvalidSpan when it is a model call that cannot be priced as sent (no model with
    tokens reported, negative or absurd token counts).
    """
    operation = _operation(attrs)
    if operation == "":
        return None  # agent, workflow, tool, retrieval...: they may carry sums of their children
    if operation is None and not any(name in attrs for name in _TOKEN_TOTALS):
        return None  # neither names an operation nor reports tokens: not a model call
    dialect = _dialect(attrs, resource, scope_name)
    # the names most spans do not carry are skipped by one test (in C) of all of them, not looked up one by one
    keys = attrs.keys()
    server_address = None if keys.isdisjoint(_SERVER_ADDRESS) else _first_str(attrs, _SERVER_ADDRESS, max_chars)
    raw_provider = _first_str(attrs, _PROVIDER, max_chars)
    if dialect == "vercel_ai":  # its gen_ai.system is e.g. "openai.chat"; ai.model.provider is the same
        raw_provider = _vercel_provider(attrs) or raw_provider
    provider = normalize_provider(raw_provider, server_address)
    tokens = _tokens(attrs, dialect, provider, max_tokens)
    if operation is None:
        operation = "chat"  # a legacy span with token counts (checked above) and no operation name
    request_model = _first_str(attrs, _REQUEST_MODEL, max_chars)
    response_model = None if keys.isdisjoint(_RESPONSE_MODEL) else _first_str(attrs, _RESPONSE_MODEL, max_chars)
    if dialect == "litellm":
        # its gen_ai.response.model is the model group the client named, not the model that answered
        request_model, response_model = _litellm_model(attrs, raw_provider, max_chars) or request_model, None
    if request_model is None and response_model is None:
        if tokens is None or tokens == TokenCounts():
            return None  # nothing was consumed and nothing names a model: no call to price
        raise InvalidSpan("missing_model", "span reports tokens but names no model")
    return SpanUsage(
        operation=operation,
        provider=provider,
        request_model=request_model,
        response_model=response_model,
        tokens=tokens or TokenCounts(),
        dialect=dialect,
        service_tier=None if keys.isdisjoint(_SERVICE_TIER) else _first_str(attrs, _SERVICE_TIER, max_chars),
        server_address=server_address,
        error=_ERROR_TYPE in attrs or span.status.code == Status.STATUS_CODE_ERROR,
        reported_cost_usd=None if keys.isdisjoint(_REPORTED_COST) else _first_str(attrs, _REPORTED_COST, 64),
        modality_tokens=_modality_tokens(attrs, max_tokens),
    )
