"""The malloc tuning the worker runs with (pipeline.kafka.malloc.keep_freed_memory): building zstd record batches,
as its producers do, must not map memory afresh (page faults) batch after batch."""

from __future__ import annotations

import subprocess
import sys

import pytest

# a fresh process each time: the tuning lasts for the process, and the page faults are its own
_BUILD_BATCHES = """
import os, resource, sys
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from pipeline.kafka.malloc import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
value = os.urandom(1500).hex().encode()  # a FOCUS row's size; random, so zstd works as hard as on 80 rows
def batch():
    builder = DefaultRecordBatchBuilder(2, 4, 0, -1, -1, -1, 1 << 20)  # v2, zstd
    for offset in range(80):
        builder.append(offset, timestamp=None, key=b"team=a", value=value, headers=[])
    return bytes(builder.build())
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _BUILD_BATCHES, mode], capture_output=True, text=True, check=True,
                          timeout=120)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_batches_reuse_freed_memory_once_tuned() -> None:
    untuned = _page_faults("default")
    assert untuned >= 100, "glibc's defaults no longer map a batch's memory afresh: is the tuning still needed?"
    assert _page_faults("tuned") < 10
