"""What the LiteLLM callback (pipeline/gateway/litellm.py) makes of one request. Pure: no LiteLLM, no I/O.

Who the caller is comes from what LiteLLM verified (a virtual key's alias, its team, the key's and
the team's metadata and tags); what to do with the call from the board's decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pipeline.gateway.board import Decision

#: the dimensions a key's (else its team's) metadata or `dim:value` tags give; key and team come from LiteLLM itself
METADATA_DIMENSIONS = ("use_case", "env", "app", "cost_center")
#: key or team metadata that lets a caller through an `approved_only` breaker
APPROVED = "spendstream_approved"


@dataclass(frozen=True, slots=True)
class Caller:
    """What LiteLLM verified about the caller (its `UserAPIKeyAuth`)."""

    key_alias: str | None = None
    team_alias: str | None = None
    team_id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    team_metadata: Mapping[str, Any] = field(default_factory=dict)


class Refusal(NamedTuple):
    status: int  # 429 blocked, 403 approval required
    message: str
    breaker_id: str | None
    retry_after_s: int | None = None


def _tag_values(tags: object) -> dict[str, str]:
    """`env:prod`-style tags as dimension values; other tags say nothing about attribution."""
    if not isinstance(tags, Sequence) or isinstance(tags, str):
        return {}
    pairs = (str(tag).split(":", 1) for tag in tags if ":" in str(tag))
    return {dim: value for dim, value in pairs if dim in METADATA_DIMENSIONS and value}


def _metadata_values(metadata: Mapping[str, Any]) -> dict[str, str]:
    values = _tag_values(metadata.get("tags"))
    values.update({dim: str(metadata[dim]) for dim in METADATA_DIMENSIONS if metadata.get(dim)})
    return values


def attribution_of(caller: Caller) -> dict[str, str]:
    """The caller's attribution: the key's own metadata wins over its team's."""
    values = {**_metadata_values(caller.team_metadata), **_metadata_values(caller.metadata)}
    team = caller.team_alias or caller.team_id
    if team:
        values["team"] = team
    if caller.key_alias:
        values["key"] = caller.key_alias
    return values


def is_approved(caller: Caller) -> bool:
    return any(metadata.get(APPROVED) is True for metadata in (caller.metadata, caller.team_metadata))


def obey(decision: Decision, caller: Caller, expires_s: float | None, now_s: float) -> Refusal | str:
    """What to do with the request: refuse it, or call the returned model (the requested one, or its downgrade)."""
    if decision.verdict == "block":
        retry = max(int(expires_s - now_s) + 1, 1) if expires_s is not None else None
        return Refusal(429, decision.reason or "blocked by spendstream", decision.breaker_id, retry)
    if decision.verdict == "approval_required" and not is_approved(caller):
        return Refusal(403, decision.reason or "approval required by spendstream", decision.breaker_id)
    return decision.model
