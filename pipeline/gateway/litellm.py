"""LiteLLM's proxy obeys spendstream's breakers: a LiteLLM custom callback (`pip install spendstream[litellm]`).

Its pre-call hook asks the BreakerBoard about every request, as the caller LiteLLM itself
verified: the virtual key's alias, its team, and the key's and team's metadata and tags, never
what the client claims in headers or in the body. Then

- block: LiteLLM's own rate-limit error, so the client gets 429 with the breaker's reason (and
  `Retry-After` when the breaker expires),
- approval required: 403, unless the key's or its team's metadata says `spendstream_approved: true`,
- downgrade: the request's model is rewritten to the cheaper one, which LiteLLM then routes.

LiteLLM's config.yaml (deploy/litellm/config.yaml is the documented one):

    litellm_settings:
      callbacks: ["pipeline.gateway.litellm.breakers", "otel"]

with `SPENDSTREAM_CONFIG` (a spendstream.yaml whose `kafka:` section is used) and/or the settings'
variables (`SPENDSTREAM_KAFKA_BOOTSTRAP_SERVERS`, ...) in LiteLLM's environment.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from litellm.exceptions import RateLimitType
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import UserAPIKeyAuth
from litellm.proxy.common_utils.proxy_rate_limit_error import ProxyRateLimitError

from pipeline.gateway.board import Decision, epoch_s
from pipeline.gateway.client import BreakerClient
from pipeline.gateway.litellm_decisions import Caller, Refusal, attribution_of, obey
from schemas.config import KafkaConfig, load_config
from schemas.config_env import env_overrides


def caller_of(auth: UserAPIKeyAuth) -> Caller:
    return Caller(key_alias=auth.key_alias or auth.key_name, team_alias=auth.team_alias, team_id=auth.team_id,
                  metadata=auth.metadata or {}, team_metadata=auth.team_metadata or {})


def http_error(refusal: Refusal) -> HTTPException:
    detail = {"error": {"type": "spendstream_blocked" if refusal.status == 429 else "approval_required",
                        "message": refusal.message, "breaker": refusal.breaker_id}}
    if refusal.status == 429:
        headers = {"retry-after": str(refusal.retry_after_s)} if refusal.retry_after_s else None
        # LiteLLM's own 429: its rate-limit metrics and callbacks count it as the budget limit it is
        blocked: HTTPException = ProxyRateLimitError(detail=detail, headers=headers,
                                                     rate_limit_type=RateLimitType.BUDGET)
        return blocked
    return HTTPException(status_code=refusal.status, detail=detail)


def kafka_from_env(environ: Mapping[str, str] = os.environ) -> KafkaConfig:
    """The `kafka:` settings by the rule every spendstream command follows: the file `$SPENDSTREAM_CONFIG`
    names, then the environment's settings (`SPENDSTREAM_KAFKA_BOOTSTRAP_SERVERS`, ...)."""
    path = environ.get("SPENDSTREAM_CONFIG")
    return load_config(Path(path) if path else None, env_overrides(environ)).kafka


def _expiry(client: BreakerClient, decision: Decision) -> float | None:
    return next((epoch_s(c.expires_at) for c in client.board.in_force() if c.breaker_id == decision.breaker_id), None)


class SpendstreamBreakers(CustomLogger):  # type: ignore[misc]  # mypy skips LiteLLM (pyproject.toml)
    def __init__(self) -> None:
        super().__init__()
        self._client: BreakerClient | None = None
        self._starting = asyncio.Lock()

    async def _started(self) -> BreakerClient:
        """The client, started on the first request: LiteLLM loads callbacks before its event loop runs."""
        async with self._starting:
            if self._client is None:
                client = BreakerClient(kafka_from_env())
                await client.start()  # a failure fails this request; the next one tries again
                self._client = client
        return self._client

    async def async_pre_call_hook(self, user_api_key_dict: UserAPIKeyAuth, cache: object, data: dict[str, Any],
                                  call_type: str) -> dict[str, Any]:
        model = data.get("model")
        if not isinstance(model, str):
            return data  # a call that names no model (files, batches): nothing to decide
        client = await self._started()
        caller = caller_of(user_api_key_dict)
        decision = client.decide(attribution_of(caller), model)
        outcome = obey(decision, caller, _expiry(client, decision) if decision.verdict == "block" else None,
                       time.time())
        if isinstance(outcome, Refusal):
            raise http_error(outcome)
        data["model"] = outcome
        return data


#: the instance LiteLLM's config names
breakers = SpendstreamBreakers()
