"""BatchProducer's deliveries: one its caller no longer awaits (the stage stopped between two chunks of rows) and
that then fails is not logged by asyncio as an exception never retrieved."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from aiokafka.errors import KafkaTimeoutError

from pipeline.kafka.producer import BatchProducer


class _Producer:
    """Just enough of AIOKafkaProducer: batches handed over, never acknowledged until the test says."""

    def __init__(self) -> None:
        self.sent: list[asyncio.Future[object]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1}

    async def send_batch(self, batch: object, topic: str, *, partition: int) -> asyncio.Future[object]:
        self.sent.append(asyncio.get_running_loop().create_future())
        return self.sent[-1]


def test_a_delivery_given_up_before_it_was_awaited_fails_quietly() -> None:
    logged: list[dict[str, Any]] = []

    async def stopped_between_chunks() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: logged.append(context))
        producer, fake = BatchProducer({}), _Producer()
        producer._started = fake

        async def publish() -> None:
            await producer.enqueue_all("rows", [(b"a", b"1"), (b"b", b"2")])
            await asyncio.Event().wait()  # the next chunk's turn, which never comes

        task = asyncio.create_task(publish())
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for future in fake.sent:  # the producer, stopping, fails what it could not deliver
            future.set_exception(KafkaTimeoutError())
        await asyncio.sleep(0)  # their callbacks run
        fake.sent.clear()
        gc.collect()

    asyncio.run(stopped_between_chunks())
    assert not logged, logged
