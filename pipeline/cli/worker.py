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
import gc
import os
import signal
from pathlib import Path

from pipeline.guardrails.policy_file import PolicyFile
from pipeline.guardrails.stage import GuardrailStage
from pipeline.kafka.malloc import keep_freed_memory
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
    keep_freed_memory()  # for its producers' record batches
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
