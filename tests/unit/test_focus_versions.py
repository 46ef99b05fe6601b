"""FOCUS 1.4 (default) and 1.2 rows from one mapping; who sells, runs and bills a call; the 1.5-draft model
properties in SkuPriceDetails (docs/topics.md "Who sells, runs and bills a call")."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from pipeline.export.files import ARROW_SCHEMAS, rows_table, write_partition
from pipeline.export.report import make_report
from pipeline.pricing import PriceCatalog, price_usage
from pipeline.pricing.focus import Billing
from pipeline.pricing.model_billing import bare_model_id, model_identity
from schemas.config import config_from_dict
from schemas.errors import ConfigError, SchemaError
from schemas.focus import COLUMNS_BY_VERSION, FOCUS_1_4_COLUMNS, decode_row, encode_row, row_version
from schemas.usage import TokenCounts
from tests.unit.test_focus_rows import catalog, event, focus_rows

TOKENS = TokenCounts(input_uncached=1000, cache_read=200, cache_write=100, output=300, reasoning=50)
SELF_HOSTED = {"pricing": {"overrides": [
    {"provider": "vllm", "model": "acme-llm-7b", "input_per_mtok": 0.3, "output_per_mtok": 0.6,
     "developer": "ACME Research", "family": "ACME LLM"},
    {"provider": "vllm", "model": "llama-3.1-70b-internal", "input_per_mtok": 0.3, "output_per_mtok": 0.6}]}}


def rows_of(model: str, provider: str, *, version: str = "1.4", config: dict[str, Any] | None = None,
            response_model: str | None = None) -> list[dict[str, Any]]:
    cat = catalog(config) if config else PriceCatalog()
    usage = event(model=model, provider=provider, tokens=TOKENS)
    if response_model:
        usage = msgspec.structs.replace(usage, response_model=response_model)
    return focus_rows(price_usage(usage, cat), Billing(focus_version=version, account_name="ACME Corp"))


@pytest.mark.parametrize(("model", "provider", "seller", "developer", "family"), [
    ("anthropic.claude-3-5-haiku-20241022-v1:0", "aws.bedrock", "AWS", "Anthropic", "Claude Haiku"),
    ("gpt-4o", "azure.ai.openai", "Microsoft", "OpenAI", "GPT-4o"),
    ("gemini-2.5-flash", "gcp.vertex_ai", "Google", "Google", "Gemini Flash"),
    ("claude-sonnet-4-5", "gcp.vertex_ai", "Google", "Anthropic", "Claude Sonnet"),
    ("gpt-4o-mini", "openai", "OpenAI", "OpenAI", "GPT-4o mini"),
    ("claude-sonnet-4-5", "anthropic", "Anthropic", "Anthropic", "Claude Sonnet"),
])
def test_who_sells_runs_and_bills_each_provider(model: str, provider: str, seller: str, developer: str,
                                                  family: str) -> None:
    rows = rows_of(model, provider)
    for row in rows:
        assert (row["ServiceProviderName"], row["HostProviderName"], row["InvoiceIssuerName"]) == (seller,) * 3
        assert row["SkuPriceDetails"]["x_ModelDeveloper"] == developer
        assert row["SkuPriceDetails"]["x_ModelFamily"] == family
        assert "ProviderName" not in row and "PublisherName" not in row


def test_a_self_hosted_model_is_sold_run_and_billed_by_the_organisation() -> None:
    [row, *_] = rows_of("acme-llm-7b", "vllm", config=SELF_HOSTED)
    assert (row["ServiceProviderName"], row["HostProviderName"], row["InvoiceIssuerName"]) == ("ACME Corp",) * 3
    assert row["SkuPriceDetails"]["x_ModelDeveloper"] == "ACME Research"  # the override names them
    assert row["SkuPriceDetails"]["x_ModelFamily"] == "ACME LLM"
    [row, *_] = rows_of("llama-3.1-70b-internal", "vllm", config=SELF_HOSTED)
    assert row["ServiceProviderName"] == "ACME Corp"
    assert (row["SkuPriceDetails"]["x_ModelDeveloper"], row["SkuPriceDetails"]["x_ModelFamily"]) == ("Meta", "Llama")


def test_sku_price_details_name_the_model_and_the_token_meter() -> None:
    rows = rows_of("claude-sonnet-4-5", "anthropic", response_model="claude-sonnet-4-5-20250929")
    by_meter = {r["x_Meter"]: r for r in rows}
    expected = {  # meter -> (SkuMeter, x_TokenDirection, x_TokenCacheAction)
        "input_tokens": ("Input Tokens", "Input", "Uncached"),
        "cache_read_tokens": ("Cache Read Input Tokens", "Input", "Read"),
        "cache_write_tokens": ("Cache Write Input Tokens", "Input", "Write"),
        "output_tokens": ("Output Tokens", "Output", None),
    }
    assert set(by_meter) >= set(expected)
    for meter, (sku_meter, direction, cache_action) in expected.items():
        details = by_meter[meter]["SkuPriceDetails"]
        assert by_meter[meter]["SkuMeter"] == sku_meter
        assert details["x_TokenDirection"] == direction
        assert details.get("x_TokenCacheAction") == cache_action  # omitted (never null) on output rows
        assert "x_TokenCacheAction" in details or direction == "Output"
        assert details["x_ModelId"] == by_meter[meter]["SkuId"].split("/")[1]
        assert details["x_ModelVersion"] == "claude-sonnet-4-5-20250929"  # the response model
        assert details["x_ModelDeveloper"] == "Anthropic" and details["x_ModelFamily"] == "Claude Sonnet"


def test_reasoning_tokens_are_output() -> None:
    rows = rows_of("o3-mini", "openai")
    reasoning = [r for r in rows if r["x_Meter"] == "output_reasoning_tokens"]
    for row in reasoning:
        assert row["SkuPriceDetails"]["x_TokenDirection"] == "Output"


@pytest.mark.parametrize("version", ["1.4", "1.2"])
def test_rows_have_exactly_the_columns_of_their_version(version: str) -> None:
    validator = jsonschema.Draft202012Validator(json.loads(
        resources.files("schemas").joinpath("focus_row.schema.json").read_text("utf-8")))
    rows = rows_of("gpt-4o", "openai", version=version)
    names = [name for name, _ in COLUMNS_BY_VERSION[version]]
    for row in rows:
        value = encode_row(row)
        assert row_version(value) == row_version(row) == version
        decoded = decode_row(value)
        assert set(decoded) == set(names)
        validator.validate(decoded)
    table = rows_table([decode_row(encode_row(r)) for r in rows])
    assert table.schema == ARROW_SCHEMAS[version] and table.column_names == names
    assert str(table.schema.field("BilledCost").type) == "decimal128(38, 18)"


def test_focus_1_4_rows_have_all_65_columns_and_nulls_where_they_do_not_apply() -> None:
    [row, *_] = rows_of("gpt-4o", "openai")
    assert len(FOCUS_1_4_COLUMNS) == 65 and all(name in row for name, _ in FOCUS_1_4_COLUMNS)
    for name in ("AllocatedMethodId", "AllocatedTags", "CommitmentDiscountId", "CommitmentDiscountQuantity",
                 "ContractApplied", "CommitmentProgramEligibilityDetails", "InvoiceDetailId", "InvoiceId",
                 "CapacityReservationId", "RegionId", "ResourceId"):
        assert row[name] is None, name
    assert row["BillingAccountType"] == "Billing Account" and row["SubAccountType"] == "Team"


def test_focus_1_2_rows_keep_provider_and_publisher() -> None:
    [row, *_] = rows_of("gpt-4o", "azure.ai.openai", version="1.2")
    assert row["ProviderName"] == row["InvoiceIssuerName"] == "Microsoft"
    assert row["PublisherName"] == "OpenAI"
    assert "ServiceProviderName" not in row and "HostProviderName" not in row


def test_a_row_of_the_other_schema_is_rejected_by_the_json_schema() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(
        resources.files("schemas").joinpath("focus_row.schema.json").read_text("utf-8")))
    [row] = [decode_row(encode_row(r)) for r in rows_of("gpt-4o", "openai")[:1]]
    assert not validator.is_valid({**row, "ProviderName": "OpenAI"})  # 1.4 rows have no ProviderName
    assert not validator.is_valid({k: v for k, v in row.items() if k != "HostProviderName"})


def test_focus_version_is_checked_in_the_config() -> None:
    assert config_from_dict({}).focus.version == "1.4"
    assert config_from_dict({"focus": {"version": "1.2"}}).focus.version == "1.2"
    with pytest.raises(ConfigError, match=r"focus\.version"):
        config_from_dict({"focus": {"version": "1.3"}})
    with pytest.raises(ConfigError, match=r'focus\.version: 1\.2 is not one of .*write it quoted, "1\.2"'):
        config_from_dict({"focus": {"version": 1.2}})


@pytest.mark.parametrize(("model_id", "bare"), [
    ("us.anthropic.claude-3-5-haiku-20241022-v1:0", "claude-3-5-haiku-20241022-v1:0"),
    ("regional.anthropic.claude-3-5-haiku", "claude-3-5-haiku"), ("openai/gpt-4o", "gpt-4o"),
    ("gpt-4.1-mini", "gpt-4.1-mini"), ("models/gemini-2.5-pro", "gemini-2.5-pro"),
])
def test_bare_model_ids(model_id: str, bare: str) -> None:
    assert bare_model_id(model_id) == bare


def test_an_unknown_model_is_its_own_family_by_its_publisher() -> None:
    identity = model_identity("acme-7b", "acme-7b-0301", publisher="Acme")
    assert (identity.developer, identity.family, identity.model_id, identity.version) == (
        "Acme", "acme-7b", "acme-7b", "acme-7b-0301")


@pytest.mark.parametrize("versions", [("1.4",), ("1.2",), ("1.2", "1.4")])
def test_report_by_provider_reads_1_2_and_1_4_files(tmp_path: Path, versions: tuple[str, ...]) -> None:
    root = tmp_path / "focus" / "request"
    for version in versions:
        rows = [decode_row(encode_row(r)) for r in rows_of("gpt-4o", "azure.ai.openai", version=version)]
        write_partition(root, "2026-11", "2026-11-20", rows)
    report = make_report(tmp_path, ["provider"])
    assert [row["provider"] for row in report.rows] == ["Microsoft"]


def test_a_tag_named_provider_name_does_not_make_a_1_4_row_a_1_2_row() -> None:
    [row] = [decode_row(encode_row(r)) for r in rows_of("gpt-4o", "openai")[:1]]
    value = encode_row({**row, "Tags": {"ProviderName": "x", "team": "search"}})
    assert row_version(value) == "1.2"  # the quick guess is wrong...
    decoded = decode_row(value)  # ...and the row still decodes, as 1.4
    assert row_version(decoded) == "1.4" and decoded["Tags"] == {"ProviderName": "x", "team": "search"}
    with pytest.raises(SchemaError, match=r"BilledCost"):
        decode_row(encode_row({k: v for k, v in row.items() if k != "BilledCost"}))
