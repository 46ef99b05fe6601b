"""The worker process: the pricing and guardrail stages in one event loop, and the policy they share.

- the pricing stage (`pricing.stage.PricingStage`, consumer group on `genai.usage`) turns usage into
  FOCUS rows on `genai.cost.focus` and partial spend per scope on `genai.spend`;
- the guardrail stage (`guardrails.stage.GuardrailStage`, its own group on `genai.spend`) keeps
  budgets, velocity and breakers per scope and publishes alerts and breaker commands.
Both are plain aiokafka consumer groups (docs/architecture.md says why there is no faust). The
policy reloads on SIGHUP or when its file changes. A stage that fails ends the process with its
error, so a supervisor sees it, rather than leaving half a worker running.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import signal
from pathlib import Path

from pipeline.guardrails.policy_file import PolicyFile
from pipeline.guardrails.stage import GuardrailStage
from pipeline.observability.metrics import CATALOG_INFO
from pipeline.pricing.catalog import PriceCatalog
from pipeline.pricing.focus import Billing
from pipeline.pricing.stage import PricingStage
from schemas.config import Config
from schemas.config_env import env_overrides

POLICY_CHECK_EVERY_S = 2.0
#: CPython's cyclic GC at its default thresholds (700, 10, 10) rescans the price catalog and the calls the
#: pricing stage holds (its rows backlog) over and over while it decodes and prices a batch: decoding a call took
#: ~9 us instead of ~2 us, pricing a batch 40% more CPU. The stages make few reference cycles, so collections can
#: be rarer, and what lives from the start (the catalog) is frozen out of them.
GC_THRESHOLDS = (50_000, 20, 10)
#: glibc's malloc hands freed memory back to the kernel: blocks over its mmap threshold at once, and the heap's top
#: once more than its trim threshold is free there. Every record batch the producers build allocates a few blocks
#: of 0.25-1 MiB (zstd's context and output, the batch buffer and its copies) and frees them, so each one was
#: mapped again, page fault by page fault, zeroed by the kernel: a tenth of the worker's CPU. Blocks up to
#: MALLOC_MMAP_MAX_BYTES come from the heap instead, which keeps up to MALLOC_KEEP_FREE_BYTES free at its top.
MALLOC_MMAP_MAX_BYTES = 16 * 1024 * 1024
MALLOC_KEEP_FREE_BYTES = 64 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as MALLOC_MMAP_MAX_BYTES says; False where the C library has no mallopt (not glibc)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_MAX_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_KEEP_FREE_BYTES))


async def _watch_policy(policy: PolicyFile) -> None:
    while True:
        await asyncio.sleep(POLICY_CHECK_EVERY_S)
        policy.check()


async def run_worker(config: Config, config_path: Path | None, data_dir: Path | None, stop: asyncio.Event) -> None:
    """Run both stages until `stop` is set; raises the error of a stage that failed. `data_dir` holds the
    FOCUS files (the durable record of spend), read when the broker has no state to restore."""
    catalog = PriceCatalog.from_config(config)
    policy = PolicyFile(config_path, config.policy, env_overrides(os.environ))
    CATALOG_INFO.labels(catalog.version).set(1)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    keep_freed_memory()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, policy.request_reload)
    tasks = [asyncio.create_task(PricingStage(config, catalog, Billing.from_config(config), policy, data_dir).run()),
             asyncio.create_task(GuardrailStage(config, policy, data_dir).run()),
             asyncio.create_task(_watch_policy(policy))]
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
        for task in done - {stopped}:
            task.result()
    finally:
        for task in (*tasks, stopped):
            task.cancel()
        await asyncio.gather(*tasks, stopped, return_exceptions=True)
