"""The lock that keeps a reader of the FOCUS request files and a compaction swap apart.

Compaction (`pipeline/export/compaction.py`) replaces a day's small files by merged ones in one
step, a directory exchange, holding this lock exclusively for that instant. A reader that lists
files by glob and then opens them (DuckDB skips a listed file it can no longer find) could
otherwise read part of a day, or fail, if the swap falls between its listing and its reading.
Readers hold the lock shared for their query: they never wait for each other or for the
exporter's flushes, only for a swap in progress. From a shell: `flock -s DATA/focus/.swap.lock duckdb ...`.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

#: under the data dir; created by the exporter before its first file
SWAP_LOCK: Final = "focus/.swap.lock"


@contextmanager
def reading_request_files(data_dir: Path) -> Iterator[None]:
    """Hold the swap lock shared while a query reads the request files under `data_dir`. Without the lock file (no
    exporter has written there yet, so nothing was compacted) the query runs unlocked. Opened read-only: the data
    dir may be mounted read-only."""
    try:
        fd = os.open(data_dir / SWAP_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextmanager
def swapping_request_files(data_dir: Path) -> Iterator[None]:
    """Hold the swap lock exclusively (a compaction swap): waits for the readers in progress."""
    path = data_dir / SWAP_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
