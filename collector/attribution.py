"""Who pays for a call: attribution dimensions from span and resource attributes. Pure.

An authenticated ingest token binds identity (`TokenIdentity`): the dimensions it binds
override whatever the span claims, and a dimension it does not bind may be claimed freely
except for a value another token binds, so a span cannot spend another team's budget or
another token's key. Missing required dimensions land in the explicit `unallocated` bucket
(or make the span rejected, if configured). User ids are pseudonymised with a keyed HMAC.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import msgspec

from collector.normalize import Attrs, any_value_str
from schemas.config import UNALLOCATED, AttributionConfig


class Attribution(msgspec.Struct, frozen=True, gc=False):
    """Who pays for a call. (A Struct: with many distinct users one is made for nearly every call, and a frozen
    dataclass's __init__ costs a Python call per field; it holds only text, so it can be in no cycle.)"""

    values: Mapping[str, str]
    key: str
    missing: tuple[str, ...]
    #: dimensions the span claimed differently from what its ingest token allows
    spoofed: tuple[str, ...]

    @property
    def allocated(self) -> bool:
        return not self.missing


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """What an authenticated ingest token may claim.

    `bound`: dimension -> the value the token binds; it overrides any claim.
    `foreign`: for each dimension the token does not bind, the values other tokens bind;
    a span of this token claiming one of them is refused that value (counted as spoofed).
    """

    bound: Mapping[str, str]
    foreign: Mapping[str, frozenset[str]] = field(default_factory=dict)


def token_identities(tokens: Mapping[str, Mapping[str, str]], max_chars: int) -> dict[str, TokenIdentity]:
    """The TokenIdentity of each configured ingest token (values cut to `max_chars`, as claims are)."""
    bound_by: dict[str, dict[str, set[str]]] = {}  # dimension -> value -> tokens binding it
    for token, identity in tokens.items():
        for dim, value in identity.items():
            bound_by.setdefault(dim, {}).setdefault(value[:max_chars], set()).add(token)
    identities = {}
    for token, identity in tokens.items():
        foreign = {
            dim: frozenset(value for value, holders in values.items() if token not in holders)
            for dim, values in bound_by.items()
            if dim not in identity
        }
        identities[token] = TokenIdentity(bound={d: v[:max_chars] for d, v in identity.items()},
                                          foreign={d: v for d, v in foreign.items() if v})
    return identities


#: sets of names a DimensionReader remembers the order of (a request's spans mostly carry a few)
MAX_ORDERS: Final = 1_024
#: Prefix of an HMAC pseudonym; the unkeyed SHA-256 ones of earlier versions started with `u_`.
USER_HASH_PREFIX = "uh_"


@functools.lru_cache(maxsize=65_536)
def hash_user_id(user_id: str, key: bytes) -> str:
    """A stable pseudonym for a user id: HMAC-SHA256 under a secret key, 128 bits, hex.

    The same user groups together; without the key nobody can test a guessed id against it.
    """
    digest = hmac.new(key, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return USER_HASH_PREFIX + digest[:32]


def attribution_key(values: Mapping[str, str], key_dimensions: tuple[str, ...]) -> str:
    """The Kafka key of a call: `team=a|use_case=b|...`, so one scope stays on one partition."""
    return "|".join([f"{dim}={values.get(dim, '')}" for dim in key_dimensions])


class DimensionReader:
    """Reads the attribution dimensions an attribute map names: for each dimension, the first of its configured
    names whose value is a non-empty scalar, in the order of `config.dimensions`.

    A span carries a handful of attributes and the configured names are a few dozen, so only the names it
    carries are looked at (one set intersection, in C), not every configured name in turn; the order to read
    them in is worked out once for each set of names (the spans of a request mostly carry the same few). Made
    for one request: it remembers the first MAX_ORDERS sets of names it met.
    """

    def __init__(self, config: AttributionConfig) -> None:
        # (rank, dimension, name) of each place a name is configured (a name may serve two dimensions); ranks
        # follow the configuration, so sorting by rank gives each dimension's names in priority, dimension after
        # dimension
        places: dict[str, list[tuple[int, str, str]]] = {}
        rank = 0
        for dim, names in config.dimensions.items():
            for name in names:
                places.setdefault(name, []).append((rank, dim, name))
                rank += 1
        self._places = places
        self._names = frozenset(places)
        self._orders: dict[frozenset[str], tuple[tuple[str, str], ...]] = {}

    def _order(self, present: frozenset[str]) -> tuple[tuple[str, str], ...]:
        """(dimension, name) of the names present, in the order they are tried; remembered for the first
        MAX_ORDERS sets (2**names are possible: a request's spans could each carry another)."""
        places = sorted([place for name in present for place in self._places[name]])
        order = tuple([(dim, name) for _, dim, name in places])
        if len(self._orders) < MAX_ORDERS:
            self._orders[present] = order
        return order

    def read(self, attrs: Attrs, max_chars: int) -> dict[str, str]:
        values: dict[str, str] = {}
        present = self._names.intersection(attrs)
        if not present:
            return values
        for dim, name in self._orders.get(present) or self._order(present):
            if dim not in values:
                text = any_value_str(attrs[name])
                if text:
                    values[dim] = text[:max_chars]
        return values


#: (the resource's dimension values, the span's claims): what an Attribution is settled from
SettledKey = tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]


class AttributionMemory:
    """Attributions settled for one identity, by SettledKey. Alone (no `budget`), one resource's for one request,
    as big as the request; in a SettledAttributions, bounded by its budget on every insert."""

    def __init__(self, budget: SettledAttributions | None = None) -> None:
        self._budget = budget
        self._settled: dict[SettledKey, Attribution] = {}
        self.get = self._settled.get

    def put(self, key: SettledKey, attribution: Attribution) -> None:
        if self._budget is not None:
            self._budget.take(key, attribution)
        self._settled[key] = attribution

    def __len__(self) -> int:
        return len(self._settled)

    def clear(self) -> None:
        self._settled.clear()


class SettledAttributions:
    """Attributions kept from one request to the next: the calls of a service mostly repeat a few teams, use cases,
    keys and users, and settling one (merge, token binding, user-id HMAC, Kafka key) costs more than the rest of
    its span's attribution. One memory per ingest identity (the token's binding changes the outcome); made for
    one configuration and user-id key (a collector's).

    Bounded by one budget for all identities, checked on every insert: `capacity` entries and `max_chars`
    characters of the texts they hold (claimed values are up to `max_value_chars` each, and any text may take 4
    bytes a character); past either, every memory is forgotten whole and settled again. At the defaults about
    20-30 MB at most, whatever the spans claim. Shared by the event loop and the decode thread: each step is one
    dict operation, a lost entry is settled again, and the counts may be off by a racing insert or two.
    """

    def __init__(self, capacity: int = 16_384, max_chars: int = 2_000_000) -> None:
        self._capacity = capacity
        self._max_chars = max_chars
        # id(identity) -> (the identity, its memory); the identity is held so that its id cannot be reused
        self._by_identity: dict[int, tuple[TokenIdentity | None, AttributionMemory]] = {}
        self._entries = 0
        self._chars = 0

    def of(self, identity: TokenIdentity | None) -> AttributionMemory:
        """The memory of the calls made with this identity (None: no ingest token)."""
        entry = self._by_identity.get(id(identity))
        if entry is None or entry[0] is not identity:
            if len(self._by_identity) >= 64:  # a collector has a few configured identities; tests make many
                self._forget()
                self._by_identity.clear()
            entry = self._by_identity[id(identity)] = (identity, AttributionMemory(self))
        return entry[1]

    def take(self, key: SettledKey, attribution: Attribution) -> None:
        """Count an entry about to be kept; forget everything first if it would not fit."""
        resource, claims = key
        chars = len(attribution.key) + sum([len(name) + len(value) for name, value in resource + claims])
        if self._entries >= self._capacity or self._chars + chars > self._max_chars:
            self._forget()
        self._entries += 1
        self._chars += chars

    def _forget(self) -> None:
        for _, memory in list(self._by_identity.values()):
            memory.clear()
        self._entries = self._chars = 0


class ResourceAttribution:
    """Attributes the calls of one resource. Span attributes win over the resource's; the token's identity wins
    over both.

    The resource, the request's ingest token and the config are fixed, so a call's attribution depends only on
    the dimensions its span claims; the spans of one request mostly claim the same few, and each distinct claim
    is settled once (its Attribution, `values` included, is shared by those calls: read it, never change it).
    """

    def __init__(self, resource: Attrs, dimensions: DimensionReader, config: AttributionConfig,
                 identity: TokenIdentity | None, max_chars: int, *, user_key: bytes | None = None,
                 settled: AttributionMemory | None = None) -> None:
        """`resource`: the resource's attributes; `dimensions` reads `config`'s; `user_key`: the HMAC key for user
        ids; `settled`: attributions settled before with this identity, config and key (`SettledAttributions`),
        else this resource's own."""
        self._dimensions = dimensions
        self._resource_values = dimensions.read(resource, max_chars)
        self._resource_key = tuple(self._resource_values.items())
        self._config = config
        self._identity = identity
        self._max_chars = max_chars
        self._user_key = user_key
        self._settled = AttributionMemory() if settled is None else settled

    def of(self, span_attrs: Attrs) -> Attribution:
        """The attribution of the call a span with these attributes made."""
        claims = self._dimensions.read(span_attrs, self._max_chars)
        seen = (self._resource_key, tuple(claims.items()))
        who = self._settled.get(seen)
        if who is None:
            who = self._settle(claims)
            self._settled.put(seen, who)
        return who

    def _settle(self, claims: dict[str, str]) -> Attribution:
        """A claim of a value another token binds, on a dimension this token does not bind, is dropped (as if
        the span had not named it) and counted in `spoofed`. With `config.hash_user_ids`, the user id is
        replaced by its HMAC under `user_key`, or dropped when there is no key."""
        config, identity = self._config, self._identity
        values = {**self._resource_values, **claims}
        spoofed: list[str] = []
        if identity is not None:
            for dim, bound in identity.bound.items():
                claimed = values.get(dim)
                if claimed is not None and claimed != bound:
                    spoofed.append(dim)
                values[dim] = bound
            for dim, taken in identity.foreign.items():
                if values.get(dim) in taken:
                    spoofed.append(dim)
                    del values[dim]
        if config.hash_user_ids and "user" in values:
            if self._user_key:
                values["user"] = hash_user_id(values["user"], self._user_key)
            else:
                del values["user"]
        missing = tuple([dim for dim in config.required if dim not in values])
        for dim in missing:
            values[dim] = UNALLOCATED
        return Attribution(
            values=values,
            key=attribution_key(values, config.key_dimensions),
            missing=missing,
            spoofed=tuple(spoofed),
        )
