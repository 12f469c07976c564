"""Background jobs that run on a timer: one loop for every component that polls.

tasks = [asyncio.create_task(every(5.0, self.ingest, log, "metrics"))]
...
await cancel_all(tasks)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any


def stopping() -> bool:
    """Whether the running task is being cancelled. A client library (redis-py) may swallow the
    CancelledError that arrives mid-call, or turn it into an error of its own; a loop that goes on after
    a job must then stop anyway, or whoever cancelled it waits forever."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def every(seconds: float, job: Callable[[], Any], log: logging.Logger, what: str) -> None:
    """Call `job` (sync or async) every `seconds`, forever; a failing run is logged, not fatal."""
    while True:
        await asyncio.sleep(seconds)
        try:
            result = job()
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            log.exception("%s job %s failed", what, getattr(job, "__name__", job))
        if stopping():
            raise asyncio.CancelledError  # cancelled mid-job, and the job's client swallowed it


async def cancel_all(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel the tasks (None: one never started) and wait until each has stopped."""
    started = [t for t in tasks if t is not None]
    for task in started:
        task.cancel()
    for task in started:
        with contextlib.suppress(asyncio.CancelledError):
            await task
