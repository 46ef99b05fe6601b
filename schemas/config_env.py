"""Settings from environment variables, one rule for all of them, derived from the config schema.

Every scalar setting `section.key` (and `section.sub.key`, `top_key`) can be set with
`SPENDSTREAM_SECTION_KEY`, upper-cased, dots as underscores: `kafka.bootstrap_servers` is
`SPENDSTREAM_KAFKA_BOOTSTRAP_SERVERS`. Lists of strings are comma-separated; an empty value
sets a setting that may be null to null. Maps and lists of objects (budgets, fx, ingest
tokens, ...) are set in the file only. A variable wins over the file; a command-line flag
wins over both. Values are typed as the schema says, and a bad one is an error naming the
variable. `SPENDSTREAM_CONFIG` names the file itself (pipeline/cli).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

import jsonschema

from schemas.config import config_schema
from schemas.errors import ConfigError

ENV_PREFIX: Final = "SPENDSTREAM_"
_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})


@dataclass(frozen=True, slots=True)
class EnvSetting:
    path: tuple[str, ...]  # the key path in spendstream.yaml
    schema: Mapping[str, Any]  # the leaf's JSON Schema, references resolved


def _resolve(node: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    return defs[ref.rsplit("/", 1)[1]] if ref else node


def _leaves(node: Mapping[str, Any], path: tuple[str, ...], defs: Mapping[str, Any]) -> Iterator[EnvSetting]:
    node = _resolve(node, defs)
    if "properties" in node:
        for key, child in node["properties"].items():
            yield from _leaves(child, (*path, key), defs)
        return
    types = node.get("type")
    if types in ("object", None) and "enum" not in node:
        return  # a map: file only
    if types == "array":
        items = _resolve(node["items"], defs)
        if items.get("type") != "string":
            return  # a list of objects: file only
    yield EnvSetting(path, node)


@cache
def env_settings() -> Mapping[str, EnvSetting]:
    """Variable name -> the setting it overrides, for every setting the rule covers."""
    schema = config_schema()
    return {ENV_PREFIX + "_".join(s.path).upper(): s for s in _leaves(schema, (), schema["$defs"])}


def _types(schema: Mapping[str, Any]) -> tuple[str, ...]:
    declared = schema.get("type", "string")  # an enum without a type: ours are all strings
    return tuple(declared) if isinstance(declared, list) else (declared,)


def _convert(text: str, schema: Mapping[str, Any]) -> Any:
    """The typed value of a variable's text. Raises ValueError saying what was expected."""
    types = _types(schema)
    if text == "" and "null" in types:
        return None
    if "boolean" in types:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError("expected true or false")
    if "integer" in types:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected an integer") from None
    if "number" in types:
        try:
            return int(text) if text.strip().lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if "array" in types:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings the environment sets, as a nested mapping shaped like spendstream.yaml.

    Raises ConfigError naming each variable whose value does not fit its setting.
    """
    settings = env_settings()
    defs = config_schema()["$defs"]
    overrides: dict[str, Any] = {}
    problems = []
    for name in sorted(n for n in environ if n in settings):
        setting = settings[name]
        where = ".".join(setting.path)
        try:
            value = _convert(environ[name], setting.schema)
        except ValueError as exc:
            problems.append(f"{name}={environ[name]!r}: {exc} (sets {where})")
            continue
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator({**setting.schema, "$defs": defs}).iter_errors(value))
        if error is not None:
            problems.append(f"{name}={environ[name]!r}: {error.message} (sets {where})")
            continue
        _set(overrides, setting.path, value)
    if problems:
        raise ConfigError(problems, "environment")
    return overrides


def unknown_env(environ: Mapping[str, str]) -> dict[str, str | None]:
    """Variables that look like settings (SPENDSTREAM_<section>_...) but are none -> the closest setting's name."""
    settings = env_settings()
    sections = {ENV_PREFIX + s.path[0].upper() + "_" for s in settings.values() if len(s.path) > 1}
    suspects = [n for n in environ if n not in settings and n.startswith(tuple(sections))]
    return {n: next(iter(difflib.get_close_matches(n, settings, n=1)), None) for n in sorted(suspects)}

