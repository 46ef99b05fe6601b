"""Topic names of the public contract (DESIGN §3). A deployment may prefix them all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

USAGE: Final = "genai.usage"
COST_FOCUS: Final = "genai.cost.focus"
SPEND: Final = "genai.spend"
ALERTS: Final = "genai.alerts"
BREAKER_COMMANDS: Final = "genai.breaker.commands"
DEADLETTER: Final = "genai.deadletter"
#: internal: stage 2's state per scope, read back when a worker takes over a partition
GUARDRAIL_STATE: Final = "genai.guardrails.state"

ALL: Final = (USAGE, COST_FOCUS, SPEND, ALERTS, BREAKER_COMMANDS, DEADLETTER, GUARDRAIL_STATE)
#: Topics that keep only the latest value per key.
COMPACTED: Final = frozenset({BREAKER_COMMANDS, GUARDRAIL_STATE})


@dataclass(frozen=True, slots=True)
class TopicNames:
    """The concrete topic names of one deployment, with its prefix applied."""

    prefix: str = ""

    def name(self, topic: str) -> str:
        return f"{self.prefix}{topic}"

    @property
    def usage(self) -> str:
        return self.name(USAGE)

    @property
    def cost_focus(self) -> str:
        return self.name(COST_FOCUS)

    @property
    def deadletter(self) -> str:
        return self.name(DEADLETTER)

    @property
    def spend(self) -> str:
        return self.name(SPEND)

    @property
    def alerts(self) -> str:
        return self.name(ALERTS)

    @property
    def breaker_commands(self) -> str:
        return self.name(BREAKER_COMMANDS)

    @property
    def guardrail_state(self) -> str:
        return self.name(GUARDRAIL_STATE)

    def all(self) -> list[str]:
        return [self.name(t) for t in ALL]
