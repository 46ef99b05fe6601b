"""Who sells, runs and bills a model call, and which model it was: the FOCUS party columns and the
1.5-draft "AI Model Billing" SkuPriceDetails properties (docs/topics.md has the table per provider).

Pure: no I/O. Keyed by the genai-prices provider id the catalog resolved (`ResolvedPrice.provider_id`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Parties:
    """FOCUS ServiceProviderName (who sells the model access), HostProviderName (who runs it) and
    InvoiceIssuerName (who bills it)."""

    service_provider: str
    host_provider: str
    invoice_issuer: str


#: genai-prices provider id -> the name FOCUS exports of that seller use. The cloud marketplaces sell, run
#: and bill the models of other developers (Anthropic on Bedrock and Vertex, OpenAI on Azure).
SELLERS: Final[Mapping[str, str]] = {
    "openai": "OpenAI", "anthropic": "Anthropic", "azure": "Microsoft", "aws": "AWS", "google": "Google",
    "mistral": "Mistral AI", "x-ai": "xAI", "deepseek": "DeepSeek", "cohere": "Cohere", "groq": "Groq",
    "together": "Together AI", "openrouter": "OpenRouter", "perplexity": "Perplexity",
}


def parties_of(provider_id: str, provider_name: str, *, self_hosted: bool, organisation: str) -> Parties:
    """The parties of a call priced under `provider_id` (genai-prices id, or the span's provider for a model with
    no public price). A self-hosted model (priced only by an override) is sold, run and billed by the
    organisation itself. A seller that does not say who runs the model is its own host (FOCUS 1.3
    HostProviderName)."""
    if self_hosted:
        return Parties(organisation, organisation, organisation)
    seller = SELLERS.get(provider_id, provider_name)
    return Parties(seller, seller, seller)


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """The FOCUS 1.5-draft model properties: ModelDeveloper, ModelFamily, ModelId, ModelVersion."""

    developer: str
    family: str
    model_id: str
    version: str


#: model id (lower case, without a vendor or region prefix) -> its developer, first match wins
_DEVELOPERS: Final[tuple[tuple[re.Pattern[str], str], ...]] = tuple((re.compile(p), d) for p, d in (
    (r"^claude", "Anthropic"),
    (r"^(gpt|o\d|chatgpt|text-embedding|davinci|babbage|dall-e|whisper|tts|codex|computer-use)", "OpenAI"),
    (r"^(gemini|gemma|palm|text-bison|chat-bison|textembedding-gecko|imagen)", "Google"),
    (r"^(meta-)?llama", "Meta"),
    (r"^(mistral|mixtral|codestral|ministral|magistral|pixtral|devstral|open-mistral)", "Mistral AI"),
    (r"^(command|embed-|rerank|c4ai)", "Cohere"),
    (r"^deepseek", "DeepSeek"),
    (r"^grok", "xAI"),
    (r"^(nova|titan)", "Amazon"),
    (r"^(qwen|qwq)", "Alibaba"),
    (r"^phi", "Microsoft"),
    (r"^kimi", "Moonshot AI"),
))
#: region and vendor prefixes of namespaced model ids ("us.anthropic.claude-…" on Bedrock, "openai/gpt-4o" on
#: routers, "models/gemini-…" on Vertex)
_PREFIX: Final = re.compile(r"^(?:us|eu|apac|global|regional|anthropic|openai|meta|mistral|mistralai|google|"
                            r"amazon|cohere|deepseek|ai21|x-ai|xai|qwen|models|publishers)[./]")
#: model id -> its family as the developer names it, first match wins ("{}" is the matched group, title-cased)
_FAMILIES: Final[tuple[tuple[re.Pattern[str], str], ...]] = tuple((re.compile(p), f) for p, f in (
    (r"^claude-(?:[\d.-]+-)?(opus|sonnet|haiku)", "Claude {}"),
    (r"^claude-instant", "Claude Instant"),
    (r"^gpt-4o-mini", "GPT-4o mini"),
    (r"^gpt-4o", "GPT-4o"),
    (r"^gpt-4\.1", "GPT-4.1"),
    (r"^gpt-4\.5", "GPT-4.5"),
    (r"^gpt-5", "GPT-5"),
    (r"^gpt-4", "GPT-4"),
    (r"^gpt-3\.5", "GPT-3.5"),
    (r"^gpt-oss", "gpt-oss"),
    (r"^o\d", "o-series"),
    (r"^text-embedding", "text-embedding"),
    (r"^gemini-[\d.]+-(flash-lite|flash|pro)", "Gemini {}"),
    (r"^gemma", "Gemma"),
    (r"^(?:meta-)?llama", "Llama"),
    (r"^(mistral-large|mistral-medium|mistral-small|codestral|ministral|magistral|pixtral|devstral)", "{}"),
    (r"^command", "Command"),
    (r"^deepseek-(chat|reasoner|r1|v3)", "DeepSeek {}"),
    (r"^grok", "Grok"),
    (r"^nova", "Amazon Nova"),
    (r"^titan", "Amazon Titan"),
))


def bare_model_id(model_id: str) -> str:
    """A model id without a vendor or region prefix ("us.anthropic.claude-3-5-haiku" -> "claude-3-5-haiku")."""
    bare = model_id.lower()
    while (match := _PREFIX.match(bare)) is not None:
        bare = bare[match.end():]
    return bare


def model_identity(model_id: str, response_model: str, *, publisher: str, developer: str | None = None,
                   family: str | None = None) -> ModelIdentity:
    """The model properties of a call: `model_id` is the catalog's id (the price), `response_model` the model the
    provider says answered (the version), `publisher` the catalog's publisher of the price (the developer when no
    rule names one). `developer` and `family` come from a `pricing.overrides` entry and win."""
    bare = bare_model_id(model_id)
    if developer is None:
        developer = next((d for pattern, d in _DEVELOPERS if pattern.match(bare)), publisher)
    if family is None:
        family = bare
        for pattern, template in _FAMILIES:
            match = pattern.match(bare)
            if match:
                family = template.format(*(g.replace("-", " ").title() for g in match.groups()))
                break
    return ModelIdentity(developer=developer, family=family, model_id=model_id, version=response_model)
