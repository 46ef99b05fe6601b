"""The price catalog: genai-prices data compiled into lookup tables, plus contracted overrides.

genai-prices resolves a model reference in tens of microseconds (it walks every provider's match
rules) and re-derives its price structures on every call. Here a (provider, model, UTC day,
service tier) lookup is resolved once with genai-prices' own matching rules and kept as a compiled
`PriceSheet`, so pricing an event is one dict lookup and a few Decimal products.
The arithmetic mirrors `genai_prices.calc_price` exactly (same leaf decomposition, same
`price * count / per` per meter, same tier cliff), and a test checks every model against it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import genai_prices
import orjson
import pydantic
from genai_prices import data_snapshot
from genai_prices.data_units import unit_data
from genai_prices.types import ModelInfo, ModelPrice, Provider, Tier, TieredPrices, TimeOfDateConstraint
from genai_prices.types import _providers_from_raw as providers_from_raw  # UpdatePrices.fetch's reader; not public

from pipeline.pricing.meter_plan import REPORTED_USAGE, MeterStep, PriceLines, compile_plan
from pipeline.pricing.meter_plan import UnpricedError as UnpricedError  # noqa: PLC0414 (re-exported, for mypy)
from schemas.config import Config
from schemas.errors import ConfigError

NS_PER_DAY: Final = 86_400 * 10**9
#: a UTC day is `start_unix_nano // NS_PER_S // S_PER_DAY`: two divisions by one-digit (30-bit) ints are
#: cheaper than one by NS_PER_DAY, which takes two digits (CPython's long division)
NS_PER_S: Final = 10**9
S_PER_DAY: Final = 86_400
_US_PER_DAY: Final = 86_400 * 10**6
LIST_CURRENCY: Final = "USD"  # genai-prices publishes every price in USD
#: our canonical (semconv) provider names -> genai-prices provider ids
PROVIDER_IDS: Final[Mapping[str, str]] = {
    "openai": "openai", "azure.ai.openai": "azure", "azure.ai.inference": "azure", "az.ai.inference": "azure",
    "anthropic": "anthropic", "gcp.gemini": "google", "gcp.vertex_ai": "google", "gcp.gen_ai": "google",
    "aws.bedrock": "aws", "mistral_ai": "mistral", "x_ai": "x-ai", "groq": "groq", "deepseek": "deepseek",
    "cohere": "cohere", "openrouter": "openrouter", "perplexity": "perplexity", "together_ai": "together",
    "moonshot_ai": "moonshotai",
}
#: override keys in spendstream.yaml -> genai-prices price keys
OVERRIDE_PRICE_KEYS: Final[Mapping[str, str]] = {
    "input_per_mtok": "input_mtok", "output_per_mtok": "output_mtok",
    "cache_read_per_mtok": "cache_read_mtok", "cache_write_per_mtok": "cache_write_mtok",
}
_UNITS_BY_PRICE_KEY: Final = {raw.get("price_key", key): (key, raw) for key, raw in unit_data.items()}
_LOOKUP_CACHE_MAX: Final = 50_000


@dataclass(frozen=True, slots=True)
class PriceData:
    """The genai-prices providers a catalog prices with, and the name rows give them (`x_CatalogVersion`)."""

    providers: Sequence[Provider]
    name: str


def price_data_file(path: Path) -> PriceData:
    """A genai-prices data file (its published `data.json`: a list of providers), for a site that cannot upgrade
    the package. Named by the file's SHA-256, so rows say which file priced them. Raises ConfigError naming the
    file and what is wrong with it."""
    def invalid(problem: str) -> ConfigError:
        return ConfigError([f"pricing.catalog_file: {path}: {problem}"], "config")

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise invalid(f"cannot be read ({exc.strerror or exc})") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"not JSON ({exc})") from None
    if not isinstance(data, list) or not data:
        raise invalid("not a genai-prices data file: expected a non-empty JSON array of providers "
                      "(prices/data.json as genai-prices publishes it)")
    try:
        providers = providers_from_raw(data)
    except (pydantic.ValidationError, ValueError, TypeError) as exc:
        raise invalid(f"not valid genai-prices data: {str(exc).splitlines()[0]} ({_first_error(exc)})") from None
    return PriceData(providers, f"genai-prices-data-{hashlib.sha256(raw).hexdigest()[:12]}")


def _first_error(exc: Exception) -> str:
    if isinstance(exc, pydantic.ValidationError) and exc.errors():
        first = exc.errors()[0]
        return f"at {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(exc)[:200]


@dataclass(frozen=True, slots=True)
class MeterPrice:
    """The price of one usage meter, per `per` units (genai-prices' unit)."""

    usage_key: str
    price_key: str
    per: int
    base: Decimal
    #: (threshold, price), highest threshold first: input above a threshold moves every token to its rate
    tiers: tuple[tuple[int, Decimal], ...]
    #: positions (in the sheet) of the priced meters this one includes, e.g. cache reads within input
    includes: tuple[int, ...]

    def price_for(self, total_input_tokens: int) -> tuple[Decimal, int | None]:
        for threshold, price in self.tiers:
            if total_input_tokens > threshold:
                return price, threshold
        return self.base, None


@dataclass(frozen=True, slots=True)
class PriceSheet:
    """Every priced meter of one model at one point in time, most specific meter first."""

    meters: tuple[MeterPrice, ...]
    price_id: str


def compile_sheet(prices: Mapping[str, Decimal | TieredPrices], price_id: str) -> PriceSheet:
    """Compile price_key -> price into a sheet ordered like genai-prices' leaf decomposition."""
    units = []
    for price_key, price in prices.items():
        if price_key not in _UNITS_BY_PRICE_KEY:
            continue  # genai-prices warns and ignores price keys it has no unit for; so do we
        if _UNITS_BY_PRICE_KEY[price_key][0] not in REPORTED_USAGE:
            continue  # spans never report it (web searches, audio...): its leaf is always 0
        usage_key, raw = _UNITS_BY_PRICE_KEY[price_key]
        units.append((usage_key, price_key, int(raw["per"]), dict(raw.get("dimensions", {})), price))
    # most dimensions first, as genai-prices computes leaves
    units.sort(key=lambda u: (-len(u[3]), u[0]))
    meters = []
    for position, (usage_key, price_key, per, dims, price) in enumerate(units):
        includes = tuple(
            i for i, (other_key, _, _, other_dims, _) in enumerate(units[:position])
            if dims.items() <= other_dims.items()
        )
        if isinstance(price, TieredPrices):
            tiers = tuple((t.start, t.price) for t in sorted(price.tiers, key=lambda t: t.start, reverse=True))
            base = price.base
        else:
            tiers, base = (), price
        meters.append(MeterPrice(usage_key, price_key, per, base, tiers, includes))
    return PriceSheet(tuple(meters), price_id)


def scale_prices(prices: Mapping[str, Decimal | TieredPrices], rate: Decimal) -> dict[str, Decimal | TieredPrices]:
    """Prices converted at `rate` (exact: a Decimal product)."""
    out: dict[str, Decimal | TieredPrices] = {}
    for key, price in prices.items():
        if isinstance(price, TieredPrices):
            out[key] = TieredPrices(base=price.base * rate,
                                    tiers=[Tier(start=t.start, price=t.price * rate) for t in price.tiers])
        else:
            out[key] = price * rate
    return out


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """A negotiated or self-hosted price from `pricing.overrides`: it wins for the meters it names."""

    model: str
    provider: str | None
    prices: Mapping[str, Decimal]  # genai-prices price key -> price per million tokens
    currency: str
    valid_from: date | None
    valid_until: date | None  # last day it applies (inclusive)
    #: the model's developer and family for FOCUS SkuPriceDetails (x_ModelDeveloper, x_ModelFamily), when the
    #: model id does not say (a self-hosted or fine-tuned model)
    developer: str | None = None
    family: str | None = None

    def applies(self, provider: str | None, model_refs: Sequence[str], day: date) -> bool:
        if self.provider is not None and self.provider != provider:
            return False
        if self.valid_from is not None and day < self.valid_from:
            return False
        if self.valid_until is not None and day > self.valid_until:
            return False
        return self.model.lower() in model_refs


def overrides_from_config(raw: Sequence[Mapping[str, Any]], billing_currency: str) -> tuple[PriceOverride, ...]:
    """Parse `pricing.overrides`. Raises ConfigError naming the entry."""
    out, problems = [], []
    for index, entry in enumerate(raw):
        where = f"pricing.overrides[{index}]"
        currency = entry.get("currency", LIST_CURRENCY)
        if currency not in (LIST_CURRENCY, billing_currency):
            problems.append(f"{where}.currency: {currency} is neither USD nor the billing currency "
                            f"{billing_currency}")
        prices = {OVERRIDE_PRICE_KEYS[k]: Decimal(str(v)) for k, v in entry.items() if k in OVERRIDE_PRICE_KEYS}
        if not prices:
            problems.append(f"{where}: names no price ({', '.join(OVERRIDE_PRICE_KEYS)})")
        valid_from = date.fromisoformat(entry["valid_from"]) if "valid_from" in entry else None
        valid_until = date.fromisoformat(entry["valid_until"]) if "valid_until" in entry else None
        if valid_from and valid_until and valid_until < valid_from:
            problems.append(f"{where}.valid_until: {valid_until} is before valid_from {valid_from}")
        out.append(PriceOverride(model=entry["model"], provider=entry.get("provider"), prices=prices,
                                 currency=currency, valid_from=valid_from, valid_until=valid_until,
                                 developer=entry.get("developer"), family=entry.get("family")))
    if problems:
        raise ConfigError(problems, "config")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ResolvedPrice:
    """What a call is priced with: the list sheet (USD) and the contracted sheet (its own currency)."""

    provider_id: str
    provider_name: str
    publisher_name: str
    model_id: str
    list_sheet: PriceSheet
    contract_sheet: PriceSheet
    contract_currency: str
    #: the contracted price is the list price: no override applies
    is_list: bool
    #: no public price exists (self-hosted or unlisted model): the override is the only price
    unlisted: bool
    #: the override's model developer and family, if it names them
    developer: str | None = None
    family: str | None = None
    #: prices a call's token counts by the sheets above (meter_plan), compiled by the catalog once per distinct
    #: answer (compile_price_lines): day after day a model resolves to an equal answer, not compiled again
    price_lines: PriceLines = field(init=False, repr=False, compare=False)

    def compile_price_lines(self) -> None:
        """Set `price_lines` (the catalog calls it once, when it interns a new answer)."""
        # the contract sheet has the same meters in the same order (_with_meters)
        contracted = self.list_sheet.meters if self.is_list else self.contract_sheet.meters
        pairs = tuple(zip(self.list_sheet.meters, contracted, strict=True))
        meters = self.list_sheet.meters

        def steps(total_input_tokens: int) -> list[MeterStep]:
            return [meter_step(meter, contract, total_input_tokens, tuple(meters[i] for i in meter.includes))
                    for meter, contract in pairs]

        # a tier applies above its threshold, so the rates at threshold + 1 hold up to the next threshold
        thresholds = sorted({t for pair in pairs for meter in pair for t, _ in meter.tiers}, reverse=True)
        brackets: list[tuple[int | None, list[MeterStep]]] = [(t, steps(t + 1)) for t in thresholds]
        brackets.append((None, steps(0)))
        # the token totals (input, output) no meter bills, when the override is the only price: tokens it does
        # not price would be free (a list price follows genai-prices, which bills them so)
        billed = {meter.usage_key for meter in meters}
        unbilled = [REPORTED_USAGE.index(total) for total in ("input_tokens", "output_tokens")
                    if self.unlisted and total not in billed]
        object.__setattr__(self, "price_lines", compile_plan(self.model_id, brackets, unbilled))


def meter_step(meter: MeterPrice, contract: MeterPrice | None, total_input_tokens: int,
               included: tuple[MeterPrice, ...] = ()) -> MeterStep:
    """`meter`, which includes the meters `included`, at list and `contract` (None or `meter`: the list price)
    prices, for a call with `total_input_tokens` of input."""
    list_price, tier = meter.price_for(total_input_tokens)
    if contract is None or contract is meter:
        contract_price, contract_unit = list_price, None
    else:
        contract_price = contract.price_for(total_input_tokens)[0]
        contract_unit = contract_price / meter.per
    units = (REPORTED_USAGE.index(meter.usage_key), *sorted(REPORTED_USAGE.index(inner.usage_key)
                                                            for inner in included))
    return MeterStep(units, meter.usage_key, meter.per, list_price, contract_price, list_price / meter.per,
                     contract_unit, tier)


class PriceCatalog:
    """Compiled prices: `resolve(...)` answers which prices apply to a call, from memory after the first time."""

    def __init__(self, overrides: Sequence[PriceOverride] = (), *, billing_currency: str = LIST_CURRENCY,
                 usd_rate: Decimal = Decimal(1), data: PriceData | None = None) -> None:
        self.overrides = tuple(overrides)
        self.billing_currency = billing_currency
        self.usd_rate = usd_rate  # billing currency units per USD
        # `data` (pricing.catalog_file) or else the data the installed package ships
        self._snapshot = data_snapshot.get_snapshot() if data is None else \
            data_snapshot.DataSnapshot(providers=list(data.providers), from_auto_update=False)
        self.data_name = f"genai-prices-{genai_prices.__version__}" if data is None else data.name
        self._sheets: dict[tuple[int, int, tuple[int, ...]], PriceSheet] = {}
        #: (provider, model, UTC day, service tier) -> what resolve answered, kept by resolve; also read by
        #: price.price_usages, which spells out resolve's hot path (a ResolvedPrice found there) per call
        self.looked_up: dict[tuple[str | None, str, int, str | None],
                             ResolvedPrice | UnpricedError | _ByTimeOfDay] = {}
        # one object per distinct answer: day after day a model resolves to the same prices, and
        # downstream caches (FOCUS price points) key on the object
        self._interned: dict[ResolvedPrice, ResolvedPrice] = {}
        digest = hashlib.sha256(orjson.dumps(
            [billing_currency, str(usd_rate), [_override_json(o) for o in self.overrides]])).hexdigest()[:12]
        self.version = f"{self.data_name}+{digest}"

    @classmethod
    def from_config(cls, config: Config) -> PriceCatalog:
        """The catalog with the config's price data (`pricing.catalog_file`, else the package's), overrides
        (`pricing.overrides`), billing currency and fx rate. Raises ConfigError."""
        overrides = overrides_from_config(config.pricing.get("overrides", ()), config.billing_currency)
        catalog_file = config.pricing.get("catalog_file")
        data = price_data_file(Path(catalog_file)) if catalog_file else None
        return cls(overrides, billing_currency=config.billing_currency, usd_rate=config.usd_rate, data=data)

    def resolve(self, provider: str | None, model: str, start_unix_nano: int,
                service_tier: str | None = None) -> ResolvedPrice:
        """The prices in force for `model` at the call's start. Raises UnpricedError if there are none."""
        key = (provider, model, start_unix_nano // NS_PER_S // S_PER_DAY, service_tier)
        found = self.looked_up.get(key)
        if type(found) is ResolvedPrice:  # the hot path: a price already looked up that day
            return found
        return self._lookup(key, start_unix_nano)

    def _lookup(self, key: tuple[str | None, str, int, str | None], start_unix_nano: int) -> ResolvedPrice:
        provider, model, _, service_tier = key
        found = self.looked_up.get(key)
        if found is None:
            answer, slot_ns = self._resolve(provider, model, start_unix_nano, service_tier)
            found = _ByTimeOfDay(slot_ns, {}) if slot_ns < NS_PER_DAY else self._intern(answer)
            if len(self.looked_up) >= _LOOKUP_CACHE_MAX:
                self.looked_up.clear()  # a flood of distinct model names must not grow memory
            self.looked_up[key] = found
        if isinstance(found, _ByTimeOfDay):
            # slots divide the day, so a slot's number since the epoch is one division (a slot of the day, two)
            slot = start_unix_nano // found.slot_ns
            by_slot = found.answers.get(slot)
            if by_slot is None:
                # resolved at the slot's start, so one answer holds for every instant in the slot
                by_slot = self._intern(self._resolve(provider, model, slot * found.slot_ns, service_tier)[0])
                if len(found.answers) >= _LOOKUP_CACHE_MAX:
                    found.answers.clear()
                found.answers[slot] = by_slot
            found = by_slot
        if isinstance(found, UnpricedError):
            raise found
        return found

    def _intern(self, answer: ResolvedPrice | UnpricedError) -> ResolvedPrice | UnpricedError:
        if isinstance(answer, UnpricedError):
            return answer
        if len(self._interned) >= _LOOKUP_CACHE_MAX:
            self._interned.clear()
        interned = self._interned.setdefault(answer, answer)
        if interned is answer:
            answer.compile_price_lines()
        return interned

    def _resolve(self, provider: str | None, model: str, start_unix_nano: int,
                 service_tier: str | None) -> tuple[ResolvedPrice | UnpricedError, int]:
        """The answer, and for how long it holds: a day, or a slot of the day when a price depends on the time
        of day (no interval boundary falls within a slot)."""
        when = datetime.fromtimestamp(start_unix_nano / 1e9, UTC)
        try:
            gp_provider, info = self._find(provider, model)
        except UnpricedError as exc:
            override = self._override(provider, [model.lower()], when.date())
            if override is None:
                return exc, NS_PER_DAY
            sheet = compile_sheet(override.prices, f"override:{override.model}@{override.valid_from or '-'}")
            return ResolvedPrice(provider_id=provider or "unknown", provider_name=provider or "unknown",
                                 publisher_name=provider or "unknown", model_id=model, list_sheet=sheet,
                                 contract_sheet=sheet, contract_currency=override.currency, is_list=False,
                                 unlisted=True, developer=override.developer, family=override.family), NS_PER_DAY
        context = _price_context(service_tier)
        # genai-prices applies request variants only to a provider's own models, not fallback ones
        own_model = any(info is m for m in gp_provider.models)
        list_sheet, slot_ns = self._list_sheet(info, when, context if own_model else None)
        publisher = gp_provider.name if own_model else self._publisher(gp_provider, info)
        override = self._override(provider, [model.lower(), info.id.lower()], when.date())
        if override is None:
            contract_sheet, currency = list_sheet, LIST_CURRENCY
        else:
            list_prices = _with_meters(_sheet_prices(list_sheet), override.prices.keys())
            if len(list_prices) != len(list_sheet.meters):
                list_sheet = compile_sheet(list_prices, list_sheet.price_id)
            if override.currency != LIST_CURRENCY:
                list_prices = scale_prices(list_prices, self.usd_rate)
            contract_sheet = compile_sheet({**list_prices, **override.prices},
                                           f"{list_sheet.price_id}+override@{override.valid_from or '-'}")
            currency = override.currency
        resolved = ResolvedPrice(
            provider_id=gp_provider.id, provider_name=gp_provider.name, publisher_name=publisher, model_id=info.id,
            list_sheet=list_sheet, contract_sheet=contract_sheet, contract_currency=currency,
            is_list=override is None, unlisted=False, developer=override.developer if override else None,
            family=override.family if override else None)
        return resolved, slot_ns

    def _find(self, provider: str | None, model: str) -> tuple[Provider, ModelInfo]:
        provider_id = PROVIDER_IDS.get(provider, provider) if provider else None
        try:
            return self._snapshot.find_provider_model(model, None, provider_id, None)
        except LookupError as exc:
            vendor, _, bare = model.partition("/")
            if bare and provider_id is None:  # "openai/gpt-4o", as gateways and routers spell it
                try:
                    return self._snapshot.find_provider_model(bare, None, PROVIDER_IDS.get(vendor, vendor), None)
                except LookupError:
                    pass
            reason = "unknown_provider" if "provider" in str(exc) and provider_id else "unknown_model"
            raise UnpricedError(reason, f"{model!r} from provider {provider!r} is not in {self.data_name} "
                                        "and no pricing.overrides entry matches") from exc

    def _publisher(self, provider: Provider, info: ModelInfo) -> str:
        for fallback_id in provider.fallback_model_providers or ():
            fallback = next((p for p in self._snapshot.providers if p.id == fallback_id), None)
            if fallback is not None and any(info is m for m in fallback.models):
                return fallback.name
        return provider.name

    def _override(self, provider: str | None, refs: list[str], day: date) -> PriceOverride | None:
        # the last matching entry wins, so a later, narrower entry can refine an earlier one
        for override in reversed(self.overrides):
            if override.applies(provider, refs, day):
                return override
        return None

    def _list_sheet(self, info: ModelInfo, when: datetime,
                    context: Mapping[str, str] | None) -> tuple[PriceSheet, int]:
        """Mirror ModelInfo.get_prices: the last active conditional price, then matching variants. Also the
        slot of the day (ns) within which the answer cannot change: a day, unless a price is by time of day."""
        slot_us = _US_PER_DAY
        if isinstance(info.prices, ModelPrice):
            chosen, standard = 0, info.prices
        else:
            chosen, standard = 0, info.prices[0].prices
            for index in range(len(info.prices) - 1, -1, -1):
                constraint = info.prices[index].constraint
                if isinstance(constraint, TimeOfDateConstraint):  # a price by time of day (off-peak)
                    slot_us = _time_of_day_slot(slot_us, constraint)
                if constraint is None or constraint.active(when):
                    chosen, standard = index, info.prices[index].prices
                    break
        variants: list[int] = []
        if context:
            for index, variant in enumerate(info.price_variants or ()):
                if isinstance(variant.constraint, TimeOfDateConstraint):
                    slot_us = _time_of_day_slot(slot_us, variant.constraint)
                if variant.constraint is not None and not variant.constraint.active(when):
                    continue
                if all(context.get(k) == v for k, v in variant.when.items()):
                    variants.append(index)
        sheet_key = (id(info), chosen, tuple(variants))
        sheet = self._sheets.get(sheet_key)
        if sheet is None:
            prices = {k: v for k, v in standard.__dict__.items() if v is not None and not k.startswith("_")}
            chosen_variants: dict[str, Decimal | TieredPrices] = {}
            for index in variants:  # per price key, the first matching variant wins
                for k, v in info.price_variants[index].prices.__dict__.items():  # type: ignore[index]
                    if v is not None:
                        chosen_variants.setdefault(k, v)
            prices.update(chosen_variants)
            start = getattr(info.prices[chosen].constraint, "start_date", None) \
                if not isinstance(info.prices, ModelPrice) else None
            price_id = f"{start or 'base'}" + "".join(f"+{_variant_name(info, i)}" for i in variants)
            sheet = self._sheets[sheet_key] = compile_sheet(prices, price_id)
        return sheet, slot_us * 1_000


@dataclass(slots=True)
class _ByTimeOfDay:
    """A day's answers for a model priced by time of day, one per slot of `slot_ns` (which divides the day), by
    the slot's number since the epoch."""

    slot_ns: int
    answers: dict[int, ResolvedPrice | UnpricedError]


def _time_of_day_slot(slot_us: int, constraint: TimeOfDateConstraint) -> int:
    """The largest slot (µs) dividing both `slot_us` and the day with both interval ends on a slot boundary."""
    return math.gcd(slot_us, _utc_micros(constraint.start_time), _utc_micros(constraint.end_time))


def _utc_micros(moment: time) -> int:
    offset = moment.utcoffset()
    micros = ((moment.hour * 60 + moment.minute) * 60 + moment.second) * 10**6 + moment.microsecond
    return (micros - (offset // offset.resolution if offset else 0)) % _US_PER_DAY


def _variant_name(info: ModelInfo, index: int) -> str:
    variant = info.price_variants[index]  # type: ignore[index]
    return ",".join(f"{k}={v}" for k, v in sorted(variant.when.items()))


def _sheet_prices(sheet: PriceSheet) -> dict[str, Decimal | TieredPrices]:
    return {m.price_key: (TieredPrices(base=m.base, tiers=[Tier(start=s, price=p) for s, p in m.tiers])
                          if m.tiers else m.base) for m in sheet.meters}


def _with_meters(prices: dict[str, Decimal | TieredPrices],
                 keys: Iterable[str]) -> dict[str, Decimal | TieredPrices]:
    """`prices` with a meter for each of `keys`, at the price of the meter that bills it today.

    An override may price a meter the public list does not (cache writes, say); the list then bills
    those units within a broader meter (input), so giving them that meter's price changes no total
    and lets list and contract rows line up meter by meter. A meter no list meter bills (a model listed
    without token prices) lists at 0, as genai-prices prices those units.
    """
    out = dict(prices)
    for key in keys:
        if key in out:
            continue
        dims = _UNITS_BY_PRICE_KEY[key][1].get("dimensions", {}).items()
        ancestors = [(len(_UNITS_BY_PRICE_KEY[k][1].get("dimensions", {})), k) for k in prices
                     if _UNITS_BY_PRICE_KEY[k][1].get("dimensions", {}).items() <= dims]
        out[key] = prices[max(ancestors)[1]] if ancestors else Decimal(0)
    return out


def _price_context(service_tier: str | None) -> dict[str, str] | None:
    """genai-prices' request context: OpenAI-style service tiers, and batch processing."""
    if not service_tier:
        return None
    context = {"service_tier": service_tier}
    if service_tier == "batch":
        context["processing"] = "batch"
    return context


def _override_json(override: PriceOverride) -> dict[str, Any]:
    return {"model": override.model, "provider": override.provider, "currency": override.currency,
            "prices": {k: str(v) for k, v in sorted(override.prices.items())},
            "valid_from": str(override.valid_from), "valid_until": str(override.valid_until)}
