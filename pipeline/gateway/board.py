"""BreakerBoard: the breakers in force, and what they mean for one request. Pure, no I/O.

`decide(attribution, model)` is a few dict lookups: commands are indexed by the dimensions of
their scope, so the cost grows with the number of scope shapes in force, not with the number
of breakers. Every open breaker whose scope matches applies; the strictest wins
(block > approval required > downgrade > allow). An expired command no longer applies: if
spendstream goes quiet, gateways fail open. Scope values match whatever their case and surrounding
blanks: a block on `team=search` also refuses `SEARCH` and ` Search `.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Final, Literal, NamedTuple

from schemas.breaker import BreakerCommand
from schemas.policy import Scope

Verdict = Literal["allow", "block", "downgrade", "approval_required"]
_STRICTNESS: Final[Mapping[str, int]] = {"allow": 0, "downgrade": 1, "approval_required": 2, "block": 3}
MAX_PROBE_EVERY: Final = 1_000_000_000


class Decision(NamedTuple):
    verdict: Verdict
    model: str  # the model to call: the requested one, or its downgrade
    breaker_id: str | None = None  # the breaker that decided, if any
    reason: str = ""


class _Entry(NamedTuple):
    command: BreakerCommand
    expires_s: float | None
    probe_every: int  # half-open: every n-th request passes; 0: none


def epoch_s(text: str | None) -> float | None:
    return datetime.fromisoformat(text).timestamp() if text else None


def fold(value: str) -> str:
    """The form scope values are matched in: `Search ` and `search` are one team."""
    return value.strip().casefold()


def _index_of(commands: Iterable[BreakerCommand]) -> dict[tuple[str, ...], dict[tuple[str, ...], list[_Entry]]]:
    index: dict[tuple[str, ...], dict[tuple[str, ...], list[_Entry]]] = {}
    for command in commands:
        scope = Scope.parse(command.scope)
        # at most one probe in MAX_PROBE_EVERY requests: a ratio near 0 must not make 1 / ratio infinite
        probe_every = round(min(1 / command.probe_ratio, MAX_PROBE_EVERY)) \
            if command.state == "half_open" and command.probe_ratio else 0
        entry = _Entry(command, epoch_s(command.expires_at), probe_every)
        index.setdefault(scope.dims, {}).setdefault(tuple(fold(v) for _, v in scope.items), []).append(entry)
    return index


class BreakerBoard:
    def __init__(self) -> None:
        self._commands: dict[str, BreakerCommand] = {}
        #: scope dimensions -> scope values -> entries
        self._index: dict[tuple[str, ...], dict[tuple[str, ...], list[_Entry]]] = {}
        self._requests = 0

    def apply(self, command: BreakerCommand) -> None:
        """The latest command of a breaker replaces the one before; a closed breaker is dropped. All or nothing: a
        command that cannot be indexed raises and leaves the board as it was."""
        commands = dict(self._commands)
        if command.state == "closed":
            commands.pop(command.breaker_id, None)
        else:
            commands[command.breaker_id] = command
        self._index = _index_of(commands.values())
        self._commands = commands

    def expires_s(self, breaker_id: str) -> float | None:
        """When the breaker lifts by itself (Unix time); None: until reset, or not on the board."""
        command = self._commands.get(breaker_id)
        return epoch_s(command.expires_at) if command else None

    def in_force(self) -> list[BreakerCommand]:
        return list(self._commands.values())

    def decide(self, attribution: Mapping[str, str], model: str, now_s: float) -> Decision:
        """The strictest decision of the breakers in force for this caller at `now_s` (Unix time)."""
        self._requests += 1
        best = Decision("allow", model)
        for dims, scopes in self._index.items():
            entries = scopes.get(tuple(fold(attribution.get(d, "")) for d in dims))
            for entry in entries or ():
                decision = self._apply(entry, attribution, model, now_s)
                if _STRICTNESS[decision.verdict] > _STRICTNESS[best.verdict]:
                    best = decision
        return best

    def _apply(self, entry: _Entry, attribution: Mapping[str, str], model: str, now: float) -> Decision:
        command = entry.command
        if entry.expires_s is not None and now >= entry.expires_s:
            return Decision("allow", model)
        if entry.probe_every and self._requests % entry.probe_every == 0:
            return Decision("allow", model, command.breaker_id, "half-open: let through as a probe")
        env_class = "prod" if fold(attribution.get("env", "")) in map(fold, command.prod_envs) else "non_prod"
        action = command.env_actions.get(env_class, command.action)
        if action == "block":
            return Decision("block", model, command.breaker_id, command.reason)
        if action == "approved_only":
            return Decision("approval_required", model, command.breaker_id, command.reason)
        if action == "downgrade" and command.downgrade.get(model):
            return Decision("downgrade", command.downgrade[model], command.breaker_id, command.reason)
        return Decision("allow", model)  # "none", or a downgrade with no cheaper model for this one
