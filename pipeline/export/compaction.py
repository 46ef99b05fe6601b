"""Compaction: the small request files of a charge date merged into few, and swapped in atomically.

The exporter writes one file per charge date per flush (every few seconds), so a day collects
thousands of small files. A pass merges a closed day's small files (under COMPACTED_ROWS rows)
into files of up to COMPACTED_ROWS rows: the same rows, in the same order, same schema (files of
FOCUS 1.2 and 1.4 in one day are merged apart). It swaps
them in so that a reader's glob (`billing_period=*/charge_date=*/part-*.parquet`) lists either
all the old files of the day or all the new ones, never both and never neither:

1. the new files are written into a hidden sibling directory, `billing_period=P/.compact-charge_date=D/`
   (`charge_date=*` does not match it), next to hard links to the day's files that stay as they are;
   files and directory are fsynced;
2. that directory and `charge_date=D/` are exchanged in one step (Linux `renameat2(RENAME_EXCHANGE)`):
   the name `charge_date=D` now holds the new set;
3. the hidden directory, which now holds the old files, is removed.

A crash before step 2 leaves the day as it was, after it the new set is in place; either way the
next pass removes the leftover hidden directory first. Readers take no lock: a query that listed
a day's files just before a swap and opens them after it fails with file-not-found (it never
counts a row twice or misses one) and can be run again. Writers hold `writer_lock`, so a pass
never swaps away a file being added. Row ids do not change, so the exporter's RowLedger reads the
same ids from the compacted files.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.export.files import (
    ARROW_SCHEMAS,
    PARQUET_OPTIONS,
    focus_dir,
    fsync_dir,
    partition_dir,
    schema_version,
    write_rollup,
    writer_lock,
)
from schemas.errors import SpendstreamError
from schemas.swap_lock import swapping_request_files

log = logging.getLogger(__name__)
#: rows per row group of a compacted file (DuckDB reads a row group per thread)
ROW_GROUP_ROWS: Final = 65_536
#: a compacted file holds up to this many rows; a file with fewer is "small" and merged by the next pass
COMPACTED_ROWS: Final = 16 * ROW_GROUP_ROWS
STAGING_PREFIX: Final = ".compact-"
_AT_FDCWD: Final = -100
_RENAME_EXCHANGE: Final = 2


class CompactionError(SpendstreamError):
    """A day could not be compacted (its files were left as they were)."""


class SwapUnsupported(CompactionError):
    """This system cannot exchange two directories in one step (not Linux, or a filesystem without
    RENAME_EXCHANGE, such as NFS). Operator action: keep the FOCUS files on a local filesystem, or leave
    `exporter.compact_every_s` at 0 and let readers cope with many small files."""


@dataclass(frozen=True, slots=True)
class Compaction:
    period: str
    day: str
    files_before: int
    files_after: int
    rows: int


def exchange(a: Path, b: Path) -> None:
    """Swap the directory entries `a` and `b` in one step. Raises SwapUnsupported or OSError."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        raise SwapUnsupported("renameat2 is not available on this system")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise SwapUnsupported(f"cannot exchange {a} and {b}: {os.strerror(code)}")
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def closed_days(root: Path, now_s: float, lateness_s: float) -> list[tuple[str, str]]:
    """(billing period, charge date) of every day of request files under `root` that ended at least `lateness_s`
    before `now_s` (Unix seconds): no row for it is expected any more. A late one starts a new small file,
    merged by a later pass."""
    days = []
    for directory in sorted(root.glob("billing_period=*/charge_date=*")):
        period, day = directory.parent.name.partition("=")[2], directory.name.partition("=")[2]
        try:
            end = datetime.fromisoformat(day).replace(tzinfo=UTC) + timedelta(days=1)
        except ValueError:
            continue
        if end.timestamp() + lateness_s <= now_s:
            days.append((period, day))
    return days


def compact_day(root: Path, period: str, day: str) -> Compaction | None:
    """Merge the small files of one charge date (per FOCUS version) and swap them in (module docstring); None when
    no version has two. The caller holds `writer_lock`. Raises SwapUnsupported, CompactionError, OSError or
    pyarrow's errors; the day's files are then as they were."""
    directory = partition_dir(root, period, day)
    staging = directory.with_name(STAGING_PREFIX + directory.name)
    shutil.rmtree(staging, ignore_errors=True)  # a crashed pass's: before or after its swap, `directory` is whole
    files = sorted(directory.glob("part-*.parquet"))
    rows = {path: pq.read_metadata(path).num_rows for path in files}
    small: dict[str, list[Path]] = {}
    for path in files:
        if rows[path] < COMPACTED_ROWS:
            small.setdefault(schema_version(pq.read_schema(path)), []).append(path)
    merging = {version: paths for version, paths in small.items() if len(paths) >= 2}
    if not merging:
        return None
    merged_away = {path for paths in merging.values() for path in paths}
    staging.mkdir()
    try:
        for path in files:
            if path not in merged_away:
                os.link(path, staging / path.name)
        merged: list[int] = []
        for version, paths in sorted(merging.items()):
            merged += _merge(paths, staging, version, first_index=len(merged))
        if sum(merged) != sum(rows[path] for path in merged_away):
            raise CompactionError(f"{directory}: merged {sum(merged)} rows of {sum(rows[p] for p in merged_away)}")
        fsync_dir(staging)
        with swapping_request_files(root.parent.parent):  # root is <data>/focus/request
            exchange(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(directory.parent)
    shutil.rmtree(staging)
    return Compaction(period, day, len(files), len(files) - len(merged_away) + len(merged), sum(rows.values()))


def _row_groups(sources: Sequence[Path], schema: pa.Schema) -> Iterator[pa.Table]:
    """The rows of `sources`, in order, in tables of ROW_GROUP_ROWS rows (the last may have fewer)."""
    pending: list[pa.Table] = []
    held = 0
    for path in sources:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP_ROWS):
            pending.append(pa.Table.from_batches([batch]).cast(schema))
            held += batch.num_rows
            while held >= ROW_GROUP_ROWS:
                rows = pa.concat_tables(pending)
                yield rows.slice(0, ROW_GROUP_ROWS)
                pending, held = [rows.slice(ROW_GROUP_ROWS)], held - ROW_GROUP_ROWS
    if held:
        yield pa.concat_tables(pending)


def _merge(sources: Sequence[Path], into: Path, version: str, first_index: int = 0) -> list[int]:
    """Write the rows of `sources` (FOCUS `version` files) as files of up to COMPACTED_ROWS rows into `into`,
    fsynced; their row counts."""
    stamp = time.time_ns()
    schema = ARROW_SCHEMAS[version]
    counts: list[int] = []
    writer: pq.ParquetWriter | None = None
    path = into
    try:
        for group in _row_groups(sources, schema):
            if writer is None or counts[-1] + group.num_rows > COMPACTED_ROWS:
                if writer is not None:
                    writer.close()
                    _fsync(path)
                path = into / f"part-{stamp}-compacted-{first_index + len(counts):04d}.parquet"
                writer = pq.ParquetWriter(path, schema, **PARQUET_OPTIONS)
                counts.append(0)
            writer.write_table(group, row_group_size=ROW_GROUP_ROWS)
            counts[-1] += group.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        _fsync(path)
    return counts


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def compact(data_dir: Path, now_s: float, lateness_s: float, rollup: str = "request") -> list[Compaction]:
    """One pass over the closed charge dates of the request files under `data_dir`, holding `writer_lock`. A day
    that fails is logged and left as it was; SwapUnsupported is raised (no day can be compacted here). With `rollup`
    hour or day, each compacted day's rollup file is rebuilt from its compacted files: the last word on the day
    (a flush that wrote its request file but died before its rollup left the rollup behind)."""
    root = focus_dir(data_dir)
    done = []
    with writer_lock(data_dir):
        for period, day in closed_days(root, now_s, lateness_s):
            try:
                result = compact_day(root, period, day)
            except SwapUnsupported:
                raise
            except (CompactionError, OSError, pa.ArrowException) as exc:
                log.warning("compaction: charge date %s left as it was: %s", day, exc)
                continue
            if result is not None:
                if rollup != "request":
                    write_rollup(data_dir, rollup, period, day)
                done.append(result)
                log.info("compaction: charge date %s: %d files -> %d (%d rows)", day, result.files_before,
                         result.files_after, result.rows)
    return done
