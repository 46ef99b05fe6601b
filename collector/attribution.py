"""Who pays for a call: attribution dimensions from span and resource attributes. Pure.

An authenticated ingest token binds identity: its dimensions override whatever the span
claims, so a span cannot spend another team's budget. Missing required dimensions land in
the explicit `unallocated` bucket (or make the span rejected, if configured).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from collector.normalize import Attrs, any_value_str
from schemas.config import UNALLOCATED, AttributionConfig


@dataclass(frozen=True, slots=True)
class Attribution:
    values: Mapping[str, str]
    key: str
    missing: tuple[str, ...]
    #: dimensions the span claimed differently from what its ingest token allows
    spoofed: tuple[str, ...]

    @property
    def allocated(self) -> bool:
        return not self.missing


@functools.lru_cache(maxsize=65_536)
def hash_user_id(user_id: str, salt: str) -> str:
    """A stable pseudonym for a user id: the same user groups together, the id is not readable."""
    return "u_" + hashlib.sha256((salt + user_id).encode("utf-8", "surrogatepass")).hexdigest()[:20]


def attribution_key(values: Mapping[str, str], key_dimensions: tuple[str, ...]) -> str:
    """The Kafka key of a call: `team=a|use_case=b|...`, so one scope stays on one partition."""
    return "|".join(f"{dim}={values.get(dim, '')}" for dim in key_dimensions)


def dimension_values(attrs: Attrs, config: AttributionConfig, max_chars: int) -> dict[str, str]:
    """The dimensions one attribute map names (first configured name wins). Called once per resource."""
    values: dict[str, str] = {}
    for dim, names in config.dimensions.items():
        for name in names:
            hit = attrs.get(name)
            if hit is not None:
                text = any_value_str(hit)
                if text:
                    values[dim] = text[:max_chars]
                    break
    return values


def attribute(
    span_attrs: Attrs,
    resource_values: Mapping[str, str],
    config: AttributionConfig,
    identity: Mapping[str, str] | None,
    max_chars: int,
) -> Attribution:
    """Attribute one call. Span attributes win over the resource's; the token's identity wins over both.

    `resource_values` is `dimension_values()` of the span's resource.
    """
    values = {**resource_values, **dimension_values(span_attrs, config, max_chars)}
    spoofed: list[str] = []
    for dim, bound in (identity or {}).items():
        claimed = values.get(dim)
        if claimed is not None and claimed != bound:
            spoofed.append(dim)
        values[dim] = bound
    if config.hash_user_ids and "user" in values:
        values["user"] = hash_user_id(values["user"], config.user_id_salt)
    missing = tuple(dim for dim in config.required if dim not in values)
    for dim in missing:
        values[dim] = UNALLOCATED
    return Attribution(
        values=values,
        key=attribution_key(values, config.key_dimensions),
        missing=missing,
        spoofed=tuple(spoofed),
    )
