"""Who is calling and what the gateway should answer. Pure, no I/O: the authz service and the example gateway share it.

The caller is whoever the gateway verified: the virtual key in `Authorization: Bearer` mapped by
`gateway.keys`, or the headers the gateway sets from its own authentication
(`gateway.identity_headers`). What a client says about itself (`x-team`, …) is never read. A key's
identity wins over the headers; a caller with neither is refused or, with
`gateway.unknown_keys: unallocated`, charged to `unallocated`.

Repeated headers arrive joined with `,` (Envoy joins them, `joined` does it for the HTTP service): a
request with two keys or two values of an identity header is ambiguous and refused whatever
`unknown_keys` says, so nobody picks which of its credentials is read, nor escapes a key's
breaker into `unallocated` by adding a second one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Final, NamedTuple
from urllib.parse import quote

import orjson
from multidict import MultiMapping

from pipeline.gateway.board import Decision
from schemas.config import UNALLOCATED, GatewayConfig

#: the request header naming the model when the gateway cannot pass the body (NGINX auth_request); in the
#: answer, the model to call instead (a downgrade)
MODEL_HEADER: Final = "x-spendstream-model"
DECISION_HEADER: Final = "x-spendstream-decision"
REASON_HEADER: Final = "x-spendstream-reason"
BREAKER_HEADER: Final = "x-spendstream-breaker"
_REFUSALS: Final[Mapping[str, tuple[int, str]]] = {
    "unknown_key": (401, "unknown_key"), "block": (429, "spendstream_blocked"),
    "approval_required": (403, "approval_required"), "unavailable": (503, "spendstream_unavailable")}


class Caller(NamedTuple):
    attribution: Mapping[str, str]
    approved: bool  # an `approved_only` breaker lets it through


class Answer(NamedTuple):
    status: int  # 200 go on, 401 unknown caller, 403 approval required, 429 blocked
    headers: Mapping[str, str]
    body: bytes  # an OpenAI-style error for a refusal, else empty


class Ambiguous(ValueError):
    """More than one credential, or one that parses two ways."""


def joined(headers: MultiMapping[str], names: Iterable[str]) -> dict[str, str]:
    """The headers of `names` (lower-case) as one value each, repeats joined with `,` as Envoy joins them."""
    return {name: ",".join(values) for name in names if (values := headers.getall(name, []))}


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token of `Authorization: Bearer <token>` (header names lower-case; scheme in any case, any blanks).
    Raises Ambiguous for two tokens (repeated headers arrive joined with `,`)."""
    words = headers.get("authorization", "").replace(",", " , ").split()
    if not words or words[0].lower() != "bearer":
        return None
    if len(words) > 2:
        raise Ambiguous("more than one credential")
    return words[1] if len(words) == 2 else None


def _identity_header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name, "").strip()
    if "," in value:
        raise Ambiguous(f"{name} given more than once")
    return value


def identify(headers: Mapping[str, str], gateway: GatewayConfig, required: tuple[str, ...]) -> Caller | None:
    """The verified caller of a request (header names lower-case), or None: unknown and `unknown_keys: deny`, or
    ambiguous."""
    try:
        secret = bearer(headers)
        attribution = {dim: value for dim, header in gateway.identity_headers.items()
                       if (value := _identity_header(headers, header.lower()))}
    except Ambiguous:
        return None
    known = gateway.keys.get(secret) if secret else None
    attribution |= known or {}
    if not attribution:
        if gateway.unknown_keys == "deny":
            return None
        attribution = dict.fromkeys(required, UNALLOCATED)
    return Caller(attribution, known is not None and known.get("key") in gateway.approved_keys)


def model_of(body: bytes) -> str | None:
    """The `model` of an OpenAI-style JSON body; None if there is none."""
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def answer(caller: Caller | None, decision: Decision | None, now_s: float, expires_s: float | None) -> Answer:
    """What the gateway is told. `decision` is None only when `caller` is (the board was not asked);
    `expires_s` is when the deciding breaker lifts by itself, for `Retry-After`."""
    if caller is None or decision is None:
        return _refusal("unknown_key", "unknown, missing or ambiguous virtual key", None, None)
    if decision.verdict == "block":
        retry = None if expires_s is None else max(1, round(expires_s - now_s))
        return _refusal("block", decision.reason, decision.breaker_id, retry)
    if decision.verdict == "approval_required" and not caller.approved:
        return _refusal("approval_required", decision.reason, decision.breaker_id, None)
    if decision.verdict == "allow":
        return _ALLOWED
    headers: dict[str, str] = {DECISION_HEADER: decision.verdict}
    if decision.verdict == "downgrade":
        headers |= {MODEL_HEADER: decision.model, REASON_HEADER: _header_text(decision.reason),
                    BREAKER_HEADER: decision.breaker_id or ""}
    return Answer(200, headers, b"")


def _refusal(kind: str, reason: str, breaker: str | None, retry_after_s: int | None) -> Answer:
    status, error_type = _REFUSALS[kind]
    headers = {DECISION_HEADER: kind, REASON_HEADER: _header_text(reason), "content-type": "application/json"}
    if breaker:
        headers[BREAKER_HEADER] = breaker
    if retry_after_s is not None:
        headers["retry-after"] = str(retry_after_s)
    body = orjson.dumps({"error": {"type": error_type, "code": error_type, "message": reason, "breaker": breaker}})
    return Answer(status, headers, body)


def _header_text(text: str) -> str:
    """Header values are ASCII: a reason's other characters are percent-encoded UTF-8."""
    return quote(text, safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~")  # no quotes or backslashes: NGINX writes it into JSON


#: most answers: built once
_ALLOWED: Final = Answer(200, MappingProxyType({DECISION_HEADER: "allow"}), b"")
#: every answer once the command follower died, with `gateway.follower_lost: refuse`
UNAVAILABLE: Final = _refusal("unavailable", "spendstream lost its breaker commands: decisions would be stale",
                              None, None)
