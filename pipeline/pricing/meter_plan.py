"""Meter plans: one price compiled into the function that prices a call's token counts.

A price (catalog.ResolvedPrice) says, for each range of input tokens (long-context tiers), which meters bill
which of a call's units at which rates. Walking that structure for every call cost more than the arithmetic,
so each price is compiled once into a Python function that does only the arithmetic: the units each meter
bills, one Decimal product per cost, one PricedLine per meter used. The function's source is generated from
the plan's shape (which units each meter bills, whether a contracted price differs, the tier thresholds) and
compiled once per shape; the prices themselves are the constants of each price's copy of that code, never written
into the source (it names each by a placeholder string, which the copy's constants replace).

Pure: no I/O.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from types import CodeType, FunctionType
from typing import Any, Final, NamedTuple, cast

import msgspec

from schemas.usage import UsageEvent

#: the genai-prices usage keys a UsageEvent reports, as the generated functions take them
REPORTED_USAGE: Final = ("input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens",
                         "output_reasoning_tokens", "requests")
#: what a meter bills, as (its REPORTED_USAGE total, the totals of the meters it includes): the total less those
#: (genai-prices' leaf decomposition), as source over the counts the function reads (_COUNTS; `ti`: input with
#: cache reads and writes, as genai-prices' `input_tokens` counts them; `iu`: uncached input). The meters of
#: REPORTED_USAGE nest one level deep at most, so these are all there are.
_UNITS_SOURCE: Final[Mapping[tuple[int, ...], str]] = {
    (0,): "ti", (1,): "cr", (2,): "cw", (3,): "out", (4,): "rs", (5,): "rq",
    (0, 1): "iu + cw", (0, 2): "iu + cr", (0, 1, 2): "iu", (3, 4): "out - rs",
}


class PricedLine(msgspec.Struct, frozen=True, gc=False):
    """One meter of one call. Prices are per `per` units; costs are exact Decimals.

    A msgspec Struct is made in C, as fast as a plain tuple, where a NamedTuple or dataclass runs Python code
    per instance (gc=False: it holds text, numbers and Decimals, never a cycle)."""

    meter: str  # genai-prices usage key, e.g. "cache_read_tokens"
    quantity: int
    per: int
    list_price: Decimal  # USD
    contract_price: Decimal  # in the contract currency
    list_cost: Decimal
    contract_cost: Decimal
    tier: int | None  # the input-token threshold whose rate applies, if any


class MeterStep(NamedTuple):
    """One meter of a price, at the rates for one range of input tokens."""

    units: tuple[int, ...]  # what it bills: a key of _UNITS_SOURCE
    usage_key: str
    per: int
    list_price: Decimal  # per `per` units
    contract_price: Decimal
    #: the prices of one unit: exact (a Decimal division by a power of ten), so `list_unit * units` equals
    #: genai-prices' `list_price * units / per` with one operation instead of two
    list_unit: Decimal
    contract_unit: Decimal | None  # None: the contracted price is the list price
    tier: int | None  # the threshold of the list tier in force, if any


#: a call -> its lines (from its token counts and requests). Raises UnpricedError: `invalid_usage` (units a
#: meter includes exceed its total), `unpriced_meter` (see compile_plan).
PriceLines = Callable[[UsageEvent], tuple[PricedLine, ...]]


class UnpricedError(Exception):
    """A call the catalog cannot price. `reason` is a stable code for the dead-letter record."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def compile_plan(model_id: str, brackets: Sequence[tuple[int | None, Sequence[MeterStep]]],
                 unbilled: Sequence[int]) -> PriceLines:
    """The function that prices a call by `brackets`: (threshold, the meters for input above it), highest first,
    the last with threshold None (input up to the lowest threshold). A call with any units of `unbilled`
    (REPORTED_USAGE positions; a price with no meter for them, which would bill them at 0) is refused."""
    constants: list[object] = [model_id]

    def constant(value: object) -> str:  # the placeholder of `value` in the source
        constants.append(value)
        return f"'c{len(constants) - 1}'"

    body = []
    for index in unbilled:
        units = _UNITS_SOURCE[(index,)]
        body += [f"if {units}:", f"    raise unbilled('c0', {index}, {units})"]
    for number, (threshold, steps) in enumerate(brackets):
        if threshold is not None:
            body.append(f"{'el' if number else ''}if ti > {constant(threshold)}:")
        elif number:
            body.append("else:")
        indent = "    " if len(brackets) > 1 else ""
        sources = [_step_source(position, step, constant) for position, step in enumerate(steps)]
        body += [indent + line for lines, _ in sources for line in lines]
        body += [indent + line for line in _lines_tree([count for _, count in sources])]
    # read only the counts the plan uses (most bill no reasoning or requests), those it derives from last
    used = set(re.findall(r"\b[a-z]+\b", "\n".join(body)))
    counts = [f"{name} = {value}" for name, value in _COUNTS.items()
              if name in used or (name in _INPUT and "ti" in used)]
    source = "\n".join(["def price_lines(event):", "    tokens = event.tokens",
                        *("    " + line for line in counts + body)])
    code = _CODE.get(source)
    if code is None:
        namespace: dict[str, Any] = {}
        exec(compile(source, "<meter plan>", "exec"), namespace)  # our own source: no data is ever written in it
        code = _CODE[source] = namespace["price_lines"].__code__
    # the prices are constants of each price's copy of the code: a constant is read with no lookup at all, where a
    # global costs a dictionary check and a closure cell a copy into every call's frame
    names = {f"c{i}": value for i, value in enumerate(constants)}
    consts = tuple(names.get(c, c) if type(c) is str else c for c in code.co_consts)
    return cast(PriceLines, FunctionType(code.replace(co_consts=consts), _GLOBALS, "price_lines"))


#: the counts a plan's source reads, as it computes them from a UsageEvent; `ti` from the three of _INPUT
_COUNTS: Final = {"iu": "tokens.input_uncached", "cr": "tokens.cache_read", "cw": "tokens.cache_write",
                  "ti": "iu + cr + cw", "out": "tokens.output", "rs": "tokens.reasoning", "rq": "event.requests"}
_INPUT: Final = frozenset({"iu", "cr", "cw"})
#: generated source -> its code: one per plan shape, a few dozen for the whole catalog
_CODE: dict[str, CodeType] = {}


def _step_source(position: int, step: MeterStep, constant: Callable[[object], str]) -> tuple[list[str], str]:
    """The source that sets `line<position>` when the meter bills units (raising if its units are negative), and
    the name of its count."""
    units = _UNITS_SOURCE[step.units]
    # a count the meter bills whole is read as it is; a difference is worked out once
    leaf, assign = (units, []) if units.isidentifier() else (f"leaf{position}", [f"leaf{position} = {units}"])
    # the total a refusal names; the input total is worked out there, so that calls with no tiers never add it up
    total = _UNITS_SOURCE[step.units[:1]]
    total = _COUNTS["ti"] if total == "ti" else total
    key = constant(step.usage_key)
    unit = constant(step.list_unit)
    contract_cost = "cost" if step.contract_unit is None else f"{constant(step.contract_unit)} * {leaf}"
    return [*assign,
            f"if {leaf} > 0:",
            f"    cost = {unit} * {leaf}",
            f"    line{position} = Line({key}, {leaf}, {constant(step.per)}, {constant(step.list_price)}, "
            f"{constant(step.contract_price)}, cost, {contract_cost}, {constant(step.tier)})",
            f"elif {leaf}:",
            f"    raise exceeded({key}, {constant(step.units)}, {total})"], leaf


def _lines_tree(counts: Sequence[str], position: int = 0, made: tuple[str, ...] = ()) -> list[str]:
    """The source that returns the lines made: `line<i>` for each count of `counts` from `position` on that is
    not 0 (none is negative by then), after those of `made`. A branch per count, so that the tuple is built at
    once, never through a list: 2**len(counts) short returns (len(counts) <= 6)."""
    if position == len(counts):
        return [f"return ({''.join(name + ', ' for name in made)})"]
    return [f"if {counts[position]}:",
            *("    " + line for line in _lines_tree(counts, position + 1, (*made, f"line{position}"))),
            "else:",
            *("    " + line for line in _lines_tree(counts, position + 1, made))]


def _exceeded(meter: str, units: tuple[int, ...], total: int) -> UnpricedError:
    inner_keys = ", ".join(REPORTED_USAGE[i] for i in units[1:])
    return UnpricedError("invalid_usage", f"{inner_keys} exceed {meter} ({total})")


def _unbilled(model_id: str, index: int, count: int) -> UnpricedError:
    return UnpricedError("unpriced_meter", f"the pricing.overrides entry for {model_id!r} has no price for its "
                                           f"{REPORTED_USAGE[index]} ({count})")


_GLOBALS: Final[dict[str, object]] = {"__builtins__": builtins, "Line": PricedLine, "exceeded": _exceeded,
                                         "unbilled": _unbilled}
