"""`spendstream run` + `spendstream demo` -> FOCUS 1.4 files (the default) that DuckDB and the FOCUS validator
accept; with `focus.version: "1.2"`, FOCUS 1.2 files that pass the 1.2 model as before.

One pipeline run per version (module fixture) serves every test here: it is the real thing an operator runs,
with the hourly rollup switched on.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow.parquet as pq
import pytest

from pipeline.pricing import PriceCatalog, UnpricedError, price_usage
from pipeline.pricing.focus import money
from schemas.focus import COLUMNS_BY_VERSION
from tests.e2e.running import run_demo, spendstream, spendstream_run
from tests.focus_validator import KNOWN_DEFECTS, validate, validator
from tests.support import metric, read_deadletters, read_topic, read_usage

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class DemoRun:
    data_dir: Path
    bootstrap: str
    sent: int
    rows_on_kafka: list[dict[str, object]]
    unpriced_metric: float


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    yield from _demo_run(tmp_path_factory, None, 8)


@pytest.fixture(scope="module")
def demo_run_1_2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    yield from _demo_run(tmp_path_factory, "1.2", 4)


def _demo_run(tmp_path_factory: pytest.TempPathFactory, version: str | None, seconds: float) -> Iterator[DemoRun]:
    tmp = tmp_path_factory.mktemp("focus")
    config = tmp / "spendstream.yaml"
    config.write_text("exporter:\n  rollup: hour\n  flush_seconds: 1\n"
                      + (f'focus:\n  version: "{version}"\n' if version else ""))
    with spendstream_run(tmp / "data", tmp / "run.out", "--config", str(config)) as run:
        sent = run_demo(run, seconds)
        worker, exporter = run.metrics_port + 1, run.metrics_port + 2
        deadline = time.monotonic() + 90
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            priced = metric(worker, "spendstream_worker_usage_priced_total")
            unpriced = metric(worker, 'spendstream_worker_usage_unpriced_total{reason="unknown_provider"}')
            published = metric(worker, "spendstream_worker_focus_rows_total")
            in_files = metric(exporter, "spendstream_exporter_rows_total")
            if priced + unpriced >= sent and in_files >= published > 0:
                rows = [orjson.loads(r.value) for r in read_topic(run.bootstrap, "genai.cost.focus",
                                                                     min_messages=int(published))]
                break
            time.sleep(0.5)
        assert rows, f"pipeline did not settle: {(tmp / 'run.out').read_text()[-2000:]}"
        time.sleep(1.5)  # the exporter rewrites the hourly rollup right after each file
        yield DemoRun(tmp / "data", run.bootstrap, sent, rows, metric(
            worker, 'spendstream_worker_usage_unpriced_total{reason="unknown_provider"}'))


def _sql(query: str) -> list[tuple[Any, ...]]:
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        return con.execute(query).fetchall()


def _glob(data_dir: Path, grain: str = "request") -> str:
    name = "part-*" if grain == "request" else "rollup"
    return str(data_dir / "focus" / grain / "billing_period=*" / "charge_date=*" / f"{name}.parquet")


def test_every_kafka_row_is_in_the_files_once(demo_run: DemoRun) -> None:
    files = _glob(demo_run.data_dir)
    [(rows, distinct)] = _sql(f"SELECT count(*), count(DISTINCT x_RowId) FROM read_parquet('{files}')")
    assert rows == distinct == len({r["x_RowId"] for r in demo_run.rows_on_kafka})


def test_billed_cost_in_the_files_equals_the_priced_usage(demo_run: DemoRun) -> None:
    """The files' total equals pricing every usage event on genai.usage independently, to the last digit."""
    events = read_usage(demo_run.bootstrap, "genai.usage", min_events=demo_run.sent)
    catalog = PriceCatalog()
    expected = Decimal(0)
    unpriced = 0
    for event in {e.id: e for e in events}.values():
        try:
            priced = price_usage(event, catalog)
        except UnpricedError:
            unpriced += 1
            continue
        expected += sum((money(line.contract_cost) for line in priced.lines), Decimal(0))
    [(total,)] = _sql(f"SELECT sum(BilledCost) FROM read_parquet('{_glob(demo_run.data_dir)}')")
    assert total == expected > 0
    assert unpriced > 0  # the demo's self-hosted model has no price...
    letters = [d for d in read_deadletters(demo_run.bootstrap, "genai.deadletter") if d["stage"] == "pricing"]
    assert len(letters) == unpriced  # ...so each of its calls is a dead letter with a reason, never a 0 row
    assert {d["reason"] for d in letters} == {"unknown_provider"}
    assert demo_run.unpriced_metric == unpriced  # the alert-worthy metric counts every one


def test_hourly_rollup_equals_the_request_rows_exactly(demo_run: DemoRun) -> None:
    sums = "sum(BilledCost), sum(ListCost), sum(ContractedCost), sum(PricingQuantity), sum(ConsumedQuantity)"
    by = "x_Team, SkuId"
    request = _sql(f"SELECT {by}, {sums} FROM read_parquet('{_glob(demo_run.data_dir)}') GROUP BY ALL ORDER BY ALL")
    rollup = _sql(f"SELECT {by}, {sums} FROM read_parquet('{_glob(demo_run.data_dir, 'hour')}') "
                  "GROUP BY ALL ORDER BY ALL")
    assert request == rollup and request
    [(rollup_rows, mismatched)] = _sql(
        f"SELECT count(*), count(*) FILTER (WHERE ListCost != ListUnitPrice * PricingQuantity) "
        f"FROM read_parquet('{_glob(demo_run.data_dir, 'hour')}')")
    assert mismatched == 0
    [(request_rows,)] = _sql(f"SELECT count(*) FROM read_parquet('{_glob(demo_run.data_dir)}')")
    assert rollup_rows < request_rows


def test_report_lists_the_top_teams(demo_run: DemoRun) -> None:
    result = spendstream("report", "--data-dir", str(demo_run.data_dir), "--by", "team", "--format", "json")
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    costs = [Decimal(r["cost"]) for r in report["rows"]]
    assert costs == sorted(costs, reverse=True) and report["rows"][0]["team"] == "research"  # the runaway agent
    [(total,)] = _sql(f"SELECT sum(BilledCost) FROM read_parquet('{_glob(demo_run.data_dir)}')")
    assert sum(costs) == total  # the demo has fewer than 10 teams: the report is complete


def _merged(data_dir: Path, grain: str, target: Path) -> Path:
    _sql(f"COPY (SELECT * FROM read_parquet('{_glob(data_dir, grain)}', hive_partitioning = false)) TO '{target}' "
         "(FORMAT parquet)")
    return target


@pytest.mark.parametrize("grain", ["request", "hour"])
def test_files_pass_the_focus_1_4_validator(demo_run: DemoRun, tmp_path: Path, grain: str) -> None:
    """FOCUS 1.4 (provisional model) with the criteria that describe our data (tests/focus_validator.py): Fail 0."""
    exe = validator()
    result = validate(exe, _merged(demo_run.data_dir, grain, tmp_path / "focus.parquet"), tmp_path, "1.4")
    print(result.summary)
    assert "| Fail: 0 |" in result.summary and not result.failed_rules, result.output[-4000:]
    assert result.passed >= 370


@pytest.mark.parametrize("grain", ["request", "hour"])
def test_focus_1_2_files_pass_the_focus_1_2_validator(demo_run_1_2: DemoRun, tmp_path: Path, grain: str) -> None:
    exe = validator()
    merged = _merged(demo_run_1_2.data_dir, grain, tmp_path / "focus.parquet")
    assert [f.name for f in pq.read_schema(merged)] == [name for name, _ in COLUMNS_BY_VERSION["1.2"]]
    result = validate(exe, merged, tmp_path, "1.2")
    print(result.summary)
    assert set(result.failed_rules) <= KNOWN_DEFECTS, result.output[-4000:]
    assert len(result.failed_rules) == 1
    assert result.passed >= 241


#: the allowed values of the enum columns, checked row by row (focus-validator checks them over the whole table:
#: one good row hides any number of bad ones)
ALLOWED: dict[str, set[object]] = {
    "ChargeCategory": {"Usage"}, "ChargeClass": {None}, "ChargeFrequency": {"Usage-Based"},
    "PricingCategory": {"Standard"}, "ServiceCategory": {"AI and Machine Learning"},
    "ServiceSubcategory": {"Generative AI"}, "ConsumedUnit": {"Tokens", "Requests"},
    "BillingAccountType": {"Billing Account"}, "SubAccountType": {"Team", None},
    "CommitmentDiscountStatus": {None}, "CapacityReservationStatus": {None}, "CommitmentDiscountCategory": {None},
}


@pytest.mark.parametrize("grain", ["request", "hour"])
def test_enum_columns_hold_allowed_values_row_by_row(demo_run: DemoRun, grain: str) -> None:
    files = _glob(demo_run.data_dir, grain)
    for column, allowed in ALLOWED.items():
        found = {v for (v,) in _sql(f'SELECT DISTINCT "{column}" FROM read_parquet(\'{files}\')')}
        assert found <= allowed, (column, found - allowed)
    details = _sql(f"SELECT DISTINCT SkuPriceDetails->>'x_TokenDirection', SkuPriceDetails->>'x_TokenCacheAction', "
                   f"x_Meter FROM read_parquet('{files}')")
    for direction, cache_action, meter in details:
        assert direction in ("Input", "Output"), meter
        # the 1.5 draft: a cache action only on request-token rows, never on output rows
        assert cache_action in (("Uncached", "Read", "Write", "Other") if direction == "Input" else (None,)), meter
    [(missing,)] = _sql(f"SELECT count(*) FILTER (WHERE SkuPriceDetails->>'x_ModelDeveloper' IS NULL OR "
                        f"SkuPriceDetails->>'x_ModelFamily' IS NULL OR SkuPriceDetails->>'x_ModelId' IS NULL OR "
                        f"SkuPriceDetails->>'x_ModelVersion' IS NULL OR ServiceProviderName IS NULL OR "
                        f"HostProviderName IS NULL) FROM read_parquet('{files}')")
    assert missing == 0


@pytest.mark.parametrize("grain", ["request", "hour"])
def test_cost_by_model_family_and_cache_action_sums_to_the_total(demo_run: DemoRun, grain: str) -> None:
    """An analyst groups by the 1.5-draft properties without parsing SkuId; the groups add up to the total."""
    files = _glob(demo_run.data_dir, grain)
    groups = _sql(f"SELECT SkuPriceDetails->>'x_ModelFamily' AS family, "
                  f"SkuPriceDetails->>'x_TokenCacheAction' AS cache_action, sum(BilledCost) AS cost "
                  f"FROM read_parquet('{files}') GROUP BY SkuPriceDetails->>'x_ModelFamily', "
                  f"SkuPriceDetails->>'x_TokenCacheAction' ORDER BY ALL")
    [(total,)] = _sql(f"SELECT sum(BilledCost) FROM read_parquet('{files}')")
    assert len(groups) > 3 and {cache for _, cache, _ in groups} >= {"Uncached", "Read", None}
    costs = [cost for _, _, cost in groups if isinstance(cost, Decimal)]  # exact: decimal money, not doubles
    assert len(costs) == len(groups) and isinstance(total, Decimal) and total > 0
    assert sum(costs, Decimal(0)) == total


def test_files_have_every_focus_1_4_column_with_exact_types(demo_run: DemoRun) -> None:
    [path, *_] = sorted(demo_run.data_dir.glob("focus/request/*/*/part-*.parquet"))
    schema = pq.read_schema(path)
    assert [f.name for f in schema] == [name for name, _ in COLUMNS_BY_VERSION["1.4"]]
    assert len([f for f in schema if not f.name.startswith("x_")]) == 65
    assert "ProviderName" not in schema.names and "PublisherName" not in schema.names
    assert str(schema.field("BilledCost").type) == "decimal128(38, 18)"
    assert schema.metadata[b"FocusVersion"] == b"1.4"


def test_compacted_files_hold_the_same_rows_and_pass_the_focus_validator(demo_run: DemoRun, tmp_path: Path) -> None:
    """`spendstream compact --all` on a copy of the run's files (the run goes on writing its own): the same rows,
    sums and row ids in fewer files, each of which the FOCUS validator accepts as the flushed ones."""
    data = tmp_path / "data"
    shutil.copytree(demo_run.data_dir / "focus" / "request", data / "focus" / "request")
    totals = "SELECT count(*), count(DISTINCT x_RowId), sum(BilledCost), sum(ListCost) FROM read_parquet('{}')"
    before, files_before = _sql(totals.format(_glob(data))), sorted((data / "focus").rglob("part-*.parquet"))
    result = spendstream("compact", "--data-dir", str(data), "--all")
    assert result.returncode == 0, result.stderr
    files = sorted((data / "focus").rglob("part-*.parquet"))
    assert len(files) < len(files_before) and "files ->" in result.stdout
    assert _sql(totals.format(_glob(data))) == before
    exe = validator()
    for path in files:
        checked = validate(exe, path, tmp_path, "1.4")
        print(path.name, checked.summary)
        assert "| Fail: 0 |" in checked.summary and not checked.failed_rules, checked.output[-4000:]
        assert checked.passed >= 370
