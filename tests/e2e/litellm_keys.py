"""The virtual keys of the LiteLLM tests, without LiteLLM's database.

LiteLLM keeps virtual keys in Postgres (through Prisma, whose engine it downloads on first use:
not possible here). Its `custom_auth` hook is the supported way to verify keys without it: this
one answers what LiteLLM's key table would for each key (alias, team, metadata), so LiteLLM and
the spendstream callback see the same `UserAPIKeyAuth` a database-backed key gives them.
"""

from __future__ import annotations

from fastapi import HTTPException, Request
from litellm.proxy._types import UserAPIKeyAuth

KEYS = {
    "sk-ads": UserAPIKeyAuth(key_alias="ads-key", team_id="team-ads", team_alias="ads",
                             metadata={"env": "prod", "tags": ["use_case:copy"]}),
    "sk-search": UserAPIKeyAuth(key_alias="search-key", team_id="team-search", team_alias="search",
                                metadata={"env": "prod"}),
    "sk-vip": UserAPIKeyAuth(key_alias="vip-key", team_id="team-ads", team_alias="ads",
                             metadata={"env": "prod", "spendstream_approved": True}),
}


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    key = KEYS.get(api_key.removeprefix("Bearer ").strip())
    if key is None:
        # an HTTPException, not any error: LiteLLM looks at any other one as a possible database error
        raise HTTPException(status_code=401, detail="unknown virtual key")
    return key.model_copy(update={"api_key": api_key})
