"""FOCUS cost rows (1.4 by default, 1.2 on request): the columns spendstream emits, in order, and their JSON /
Parquet forms.

One row per model call x token meter (`reference/focus-1.2.md` §4.3). On Kafka a row is a JSON
object: money and quantities are decimal strings (exact), Tags and SkuPriceDetails are objects.
In Parquet, money is decimal128(38, 18), Tags and SkuPriceDetails are JSON strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Final, Literal, NotRequired, Optional, TypedDict, cast

import msgspec
import orjson

from schemas.codec import Int64, decode_as
from schemas.errors import SchemaError

FOCUS_SCHEMA_VERSION: Final = 1
#: the FOCUS version written unless `focus.version` says otherwise
FOCUS_VERSION: Final = "1.4"
#: decimal places of money in rows and files: only float-artifact prices in the source data
#: (e.g. 0.0833333333333333 USD/MTok) have more, and are rounded half-even there
MONEY_SCALE: Final = 18
MONEY_QUANTUM: Final = Decimal(1).scaleb(-MONEY_SCALE)

#: (column, kind); kinds: money, quantity, int, string, datetime, json, bool.
#: The FOCUS 1.4 Cost and Usage columns: all 65, in name order; the inapplicable ones are null, as provider
#: exports have them (focus-validator checks the presence of Conditional columns even when they do not apply)
FOCUS_1_4_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("AllocatedMethodDetails", "json"),
    ("AllocatedMethodId", "string"),
    ("AllocatedResourceId", "string"),
    ("AllocatedResourceName", "string"),
    ("AllocatedTags", "json"),
    ("AvailabilityZone", "string"),
    ("BilledCost", "money"),
    ("BillingAccountId", "string"),
    ("BillingAccountName", "string"),
    ("BillingAccountType", "string"),
    ("BillingCurrency", "string"),
    ("BillingPeriodEnd", "datetime"),
    ("BillingPeriodStart", "datetime"),
    ("CapacityReservationId", "string"),
    ("CapacityReservationStatus", "string"),
    ("ChargeCategory", "string"),
    ("ChargeClass", "string"),
    ("ChargeDescription", "string"),
    ("ChargeFrequency", "string"),
    ("ChargePeriodEnd", "datetime"),
    ("ChargePeriodStart", "datetime"),
    ("CommitmentDiscountCategory", "string"),
    ("CommitmentDiscountId", "string"),
    ("CommitmentDiscountName", "string"),
    ("CommitmentDiscountQuantity", "quantity"),
    ("CommitmentDiscountStatus", "string"),
    ("CommitmentDiscountType", "string"),
    ("CommitmentDiscountUnit", "string"),
    ("CommitmentProgramEligibilityDetails", "json"),
    ("ConsumedQuantity", "quantity"),
    ("ConsumedUnit", "string"),
    ("ContractApplied", "json"),
    ("ContractedCost", "money"),
    ("ContractedUnitPrice", "money"),
    ("EffectiveCost", "money"),
    ("HostProviderName", "string"),
    ("InvoiceDetailId", "string"),
    ("InvoiceId", "string"),
    ("InvoiceIssuerName", "string"),
    ("ListCost", "money"),
    ("ListUnitPrice", "money"),
    ("PricingCategory", "string"),
    ("PricingCurrency", "string"),
    ("PricingCurrencyContractedUnitPrice", "money"),
    ("PricingCurrencyEffectiveCost", "money"),
    ("PricingCurrencyListUnitPrice", "money"),
    ("PricingQuantity", "quantity"),
    ("PricingUnit", "string"),
    ("RegionId", "string"),
    ("RegionName", "string"),
    ("ResourceId", "string"),
    ("ResourceName", "string"),
    ("ResourceType", "string"),
    ("ServiceCategory", "string"),
    ("ServiceName", "string"),
    ("ServiceProviderName", "string"),
    ("ServiceSubcategory", "string"),
    ("SkuId", "string"),
    ("SkuMeter", "string"),
    ("SkuPriceDetails", "json"),
    ("SkuPriceId", "string"),
    ("SubAccountId", "string"),
    ("SubAccountName", "string"),
    ("SubAccountType", "string"),
    ("Tags", "json"),
)
#: the FOCUS 1.2 columns spendstream has always written (`focus.version: "1.2"`, for tools that ingest 1.2)
FOCUS_1_2_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("AvailabilityZone", "string"),
    ("BilledCost", "money"),
    ("BillingAccountId", "string"),
    ("BillingAccountName", "string"),
    ("BillingCurrency", "string"),
    ("BillingPeriodEnd", "datetime"),
    ("BillingPeriodStart", "datetime"),
    ("ChargeCategory", "string"),
    ("ChargeClass", "string"),
    ("ChargeDescription", "string"),
    ("ChargeFrequency", "string"),
    ("ChargePeriodEnd", "datetime"),
    ("ChargePeriodStart", "datetime"),
    ("CommitmentDiscountStatus", "string"),
    ("ConsumedQuantity", "quantity"),
    ("ConsumedUnit", "string"),
    ("ContractedCost", "money"),
    ("ContractedUnitPrice", "money"),
    ("EffectiveCost", "money"),
    ("InvoiceId", "string"),
    ("InvoiceIssuerName", "string"),
    ("ListCost", "money"),
    ("ListUnitPrice", "money"),
    ("PricingCategory", "string"),
    ("PricingCurrency", "string"),
    ("PricingCurrencyContractedUnitPrice", "money"),
    ("PricingCurrencyEffectiveCost", "money"),
    ("PricingCurrencyListUnitPrice", "money"),
    ("PricingQuantity", "quantity"),
    ("PricingUnit", "string"),
    ("ProviderName", "string"),
    ("PublisherName", "string"),
    ("RegionId", "string"),
    ("RegionName", "string"),
    ("ResourceId", "string"),
    ("ResourceName", "string"),
    ("ResourceType", "string"),
    ("ServiceCategory", "string"),
    ("ServiceName", "string"),
    ("ServiceSubcategory", "string"),
    ("SkuId", "string"),
    ("SkuMeter", "string"),
    ("SkuPriceDetails", "json"),
    ("SkuPriceId", "string"),
    ("SubAccountId", "string"),
    ("SubAccountName", "string"),
    ("Tags", "json"),
)
#: spendstream's own columns, after the FOCUS ones in both versions
CUSTOM_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("x_RowId", "string"),
    ("x_UsageId", "string"),
    ("x_TraceId", "string"),
    ("x_SpanId", "string"),
    ("x_Provider", "string"),
    ("x_Model", "string"),
    ("x_RequestModel", "string"),
    ("x_Operation", "string"),
    ("x_ServiceTier", "string"),
    ("x_Meter", "string"),
    ("x_PriceTier", "string"),
    ("x_CatalogVersion", "string"),
    ("x_AttributionKey", "string"),
    ("x_Allocated", "bool"),
    ("x_Team", "string"),
    ("x_UseCase", "string"),
    ("x_Env", "string"),
    ("x_App", "string"),
    ("x_Key", "string"),
    ("x_CostCenter", "string"),
    ("x_RequestCount", "int"),
    ("x_SampleAdjustedCount", "quantity"),
    ("x_SchemaVersion", "int"),
)
FOCUS_VERSIONS: Final = ("1.4", "1.2")
#: focus.version -> the columns of its rows and files, in order
COLUMNS_BY_VERSION: Final[Mapping[str, tuple[tuple[str, str], ...]]] = {
    "1.4": FOCUS_1_4_COLUMNS + CUSTOM_COLUMNS, "1.2": FOCUS_1_2_COLUMNS + CUSTOM_COLUMNS}
#: the default version's columns
COLUMNS: Final = COLUMNS_BY_VERSION[FOCUS_VERSION]
COLUMN_NAMES: Final = tuple(name for name, _ in COLUMNS)
#: the request-level files under a data dir, Hive-style (billing_period=YYYY-MM/charge_date=YYYY-MM-DD): what
#: FinOps tools, `spendstream report` and a cold-starting worker read
REQUEST_FILES: Final = "focus/request/billing_period=*/charge_date=*/part-*.parquet"


def request_files_glob(data_dir: Path) -> str:
    return str(data_dir / REQUEST_FILES)
#: attribution dimension -> its x_ column
ATTRIBUTION_COLUMNS: Final[Mapping[str, str]] = {
    "team": "x_Team", "use_case": "x_UseCase", "env": "x_Env", "app": "x_App", "key": "x_Key",
    "cost_center": "x_CostCenter",
}


def encode_row(row: Mapping[str, Any]) -> bytes:
    """A FOCUS row as its `genai.cost.focus` message value (Decimals as exact strings)."""
    return orjson.dumps(row, default=_decimal_str)


#: text columns that are never null (focus_row.schema.json); every other text column is a non-empty string or null
REQUIRED_TEXT: Final = frozenset({"BillingAccountId", "InvoiceIssuerName", "ProviderName", "PublisherName",
                                  "ServiceProviderName", "HostProviderName", "BillingAccountType",
                                  "ServiceName", "x_RowId", "x_UsageId"})
#: columns with one value (focus_row.schema.json `const`)
CONSTANTS: Final[Mapping[str, str | int]] = {
    "ChargeCategory": "Usage", "ChargeFrequency": "Usage-Based", "ServiceCategory": "AI and Machine Learning",
    "ServiceSubcategory": "Generative AI", "x_SchemaVersion": FOCUS_SCHEMA_VERSION}
CURRENCY_COLUMNS: Final = frozenset({"BillingCurrency", "PricingCurrency"})
#: a currency column's value: an ISO 4217 code
CURRENCY_PATTERN: Final = r"^[A-Z]{3}\Z"
#: number columns that are null on every row: a model call has no commitment discount
NULL_NUMBERS: Final = frozenset({"CommitmentDiscountQuantity"})
#: columns added since rows were first published: null when they do not apply, and absent from an older
#: worker's rows (still decoded during a rolling upgrade; the files hold null)
ADDED_COLUMNS: Final = frozenset({"x_SampleAdjustedCount"})
#: quantities a correction row (ChargeClass "Correction", `spendstream reprice --restate`) leaves null: the usage
#: was counted by the row it corrects; every other row has them
CORRECTION_NULLS: Final = frozenset({"ConsumedQuantity", "PricingQuantity"})
_TEXT: Final = Annotated[str, msgspec.Meta(min_length=1)]
#: the text of the values the files hold as decimals and times: money decimal128(38, 18), quantities
#: decimal128(38, 6) (files.py); a time must also be a real one (`decode_row`). Python regexes (msgspec): `\Z`, not
#: `$`, which also matches before a trailing newline ("USD\n" would reach the files); RE2 spells it `\z` (files.py)
PATTERNS: Final[Mapping[str, str]] = {
    "money": r"^-?[0-9]{1,20}(\.[0-9]{1,18})?\Z",
    "quantity": r"^-?[0-9]{1,32}(\.[0-9]{1,6})?\Z",
    "datetime": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z\Z",
}
_WIRE_TYPES: Final[Mapping[str, object]] = {
    **{kind: Annotated[str, msgspec.Meta(pattern=pattern)] for kind, pattern in PATTERNS.items()},
    "int": Int64,
    "bool": bool,
    "json": dict[str, str | Int64 | float | bool | None] | None,
    "string": _TEXT | None,
}
#: ... but with the patterns (and CURRENCY_PATTERN) left to a bulk check, and JSON values kept as written, to be
#: checked once a distinct value (`ROW_STRUCTS`, `JSON_VALUES`)
_UNCHECKED_TYPES: Final[Mapping[str, object]] = {**_WIRE_TYPES, **{kind: str for kind in PATTERNS},
                                                 "json": msgspec.Raw}
#: a JSON column's value (Tags, SkuPriceDetails...) as `decode_row` checks it
JSON_VALUES: Final[msgspec.json.Decoder[Any]] = msgspec.json.Decoder(_WIRE_TYPES["json"])


def _wire_type(name: str, kind: str, types: Mapping[str, object] = _WIRE_TYPES) -> object:
    if name in CONSTANTS:
        return Literal[CONSTANTS[name]]
    if name in CURRENCY_COLUMNS:
        return Annotated[str, msgspec.Meta(pattern=CURRENCY_PATTERN)] if types is _WIRE_TYPES else str
    if name in REQUIRED_TEXT:
        return _TEXT
    if name in NULL_NUMBERS | CORRECTION_NULLS:
        return Optional[types[kind]]  # noqa: UP045  # a runtime type object: `X | None` needs a type
    if name in ADDED_COLUMNS:
        return NotRequired[Optional[types[kind]]]  # noqa: UP045  # as above
    return types[kind]


def _row_struct(version: str) -> type[msgspec.Struct]:
    """A Struct whose fields are the columns of `version`, in order, typed as `decode_row` types them but for
    PATTERNS and currencies (plain text here: a regex called from msgspec took a tenth of the decode) and JSON
    columns (raw): the exporter decodes each value once into it and checks the
    patterns, the dates, the correction nulls and the JSON values in bulk (`pipeline/export/files.py`
    `pack_values`). Unknown columns are ignored, an added column an older worker's row lacks is null."""
    fields: list[tuple[str, object] | tuple[str, object, object]] = []
    for name, kind in COLUMNS_BY_VERSION[version]:
        wire = _wire_type(name, kind, _UNCHECKED_TYPES)
        fields.append((name, Optional[_UNCHECKED_TYPES[kind]], None) if name in ADDED_COLUMNS  # noqa: UP045
                      else (name, wire))
    # kw_only: a field with a default (an added column) may come before others, keeping the column order;
    # gc=False: a row holds no cycles, and untracked objects cost the collector nothing
    return msgspec.defstruct(f"FocusRow{version.replace('.', '_')}", fields, kw_only=True, gc=False)


#: FOCUS version -> a decoder of its values into `_row_struct`s (raises msgspec.DecodeError)
ROW_STRUCTS: Final[Mapping[str, msgspec.json.Decoder[Any]]] = {
    version: msgspec.json.Decoder(_row_struct(version)) for version in FOCUS_VERSIONS}


def _row_decoder(version: str) -> msgspec.json.Decoder[dict[str, Any]]:
    """Every column of `version` required, as focus_row.schema.json says; unknown columns are ignored (a newer
    worker's additions)."""
    columns = COLUMNS_BY_VERSION[version]
    value_type = TypedDict(  # type: ignore[misc]  # built from the columns, so the decoder and they never drift
        f"FocusRow{version.replace('.', '_')}Value", {name: _wire_type(name, kind) for name, kind in columns})
    return cast("msgspec.json.Decoder[dict[str, Any]]", msgspec.json.Decoder(value_type))


_ROW_DECODERS: Final = {version: _row_decoder(version) for version in FOCUS_VERSIONS}
_DATETIME_COLUMNS: Final = tuple(name for name, kind in COLUMNS if kind == "datetime")  # the same in every version


def row_version(row: Mapping[str, Any] | bytes) -> str:
    """The FOCUS version of a row (decoded or as on Kafka): 1.2 rows have ProviderName, which 1.4 removed."""
    if isinstance(row, bytes):
        return "1.2" if b'"ProviderName":' in row else FOCUS_VERSION
    return "1.2" if "ProviderName" in row else FOCUS_VERSION


def decode_row(value: bytes) -> dict[str, Any]:
    """A `genai.cost.focus` value as a row the files can hold (every column of its FOCUS version checked: types,
    patterns, money and quantities that fit the files' decimals, real dates). Raises SchemaError naming what is
    wrong."""
    version = row_version(value)
    try:
        row: dict[str, Any] = decode_as(_ROW_DECODERS[version], value, "FOCUS row")
    except SchemaError as exc:
        row = _decode_as_other_version(value, version, exc)
    if row["ChargeClass"] is None:
        for name in CORRECTION_NULLS:
            if row[name] is None:
                raise SchemaError(f"FOCUS row: {name} is null on a row that is not a correction")
    for name in _DATETIME_COLUMNS:
        try:
            datetime.fromisoformat(row[name][:-1])
        except ValueError as exc:
            raise SchemaError(f"FOCUS row: {name} {row[name]!r} is not a date-time") from exc
    return row


def _decode_as_other_version(value: bytes, version: str, error: SchemaError) -> dict[str, Any]:
    """A row the version guess got wrong (a 1.4 row with a tag named "ProviderName"); else the first error."""
    try:
        row: dict[str, Any] = decode_as(_ROW_DECODERS["1.4" if version == "1.2" else "1.2"], value, "FOCUS row")
    except SchemaError:
        raise error from None
    return row


def _decimal_str(value: object) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"cannot encode {type(value).__name__}")
