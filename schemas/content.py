"""Which span attributes carry prompt or completion text: the one definition the collector strips from
forwarded spans (`collector/enrich.py`) and the config refuses as an attribution source. Such text never
leaves the collector."""

from __future__ import annotations

from typing import Final

#: prompt and completion content, on spans and span events, by every generation and library dialect
#: (reference/genai-semconv.md): exact keys ...
CONTENT_KEYS: Final = frozenset({
    "gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions", "gen_ai.tool.definitions",
    "gen_ai.tool.call.arguments", "gen_ai.tool.call.result", "gen_ai.content", "gen_ai.event.content",
    "input.value", "output.value", "ai.prompt", "ai.response.text", "ai.response.object", "ai.response.toolCalls",
    "langfuse.observation.input", "langfuse.observation.output", "traceloop.entity.input",
    "traceloop.entity.output",
})
#: ... and key prefixes (indexed or nested forms, e.g. gen_ai.prompt.0.content, llm.input_messages.0...)
CONTENT_PREFIXES: Final = ("gen_ai.prompt", "gen_ai.completion", "llm.prompts", "llm.input_messages",
                           "llm.output_messages", "ai.prompt.", "gen_ai.input.messages", "gen_ai.output.messages",
                           "gen_ai.system_instructions", "gen_ai.tool.definitions", "input.value", "output.value")


def is_content(key: str) -> bool:
    return key in CONTENT_KEYS or key.startswith(CONTENT_PREFIXES)
