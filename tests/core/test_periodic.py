"""A timer loop stops when cancelled, even when its job's client swallows the cancellation (redis-py
does so mid-command): whoever closes it must not wait forever."""

from __future__ import annotations

import asyncio
import logging

from iros.core.periodic import cancel_all, every

log = logging.getLogger("test")


async def test_a_loop_whose_job_swallows_its_cancellation_still_stops() -> None:
    started = asyncio.Event()

    async def swallowing() -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return  # what a client library that "handles" cancellation does

    task = asyncio.create_task(every(0.001, swallowing, log, "test"))
    await started.wait()
    async with asyncio.timeout(5):
        await cancel_all([task])
    assert task.done()


async def test_a_failing_job_is_logged_and_the_loop_goes_on() -> None:
    runs = 0
    third = asyncio.Event()

    def failing() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            third.set()
        raise RuntimeError("boom")

    task = asyncio.create_task(every(0.001, failing, log, "test"))
    async with asyncio.timeout(5):
        await third.wait()
    await cancel_all([task])
    assert runs >= 3
