"""Retries and failover: the one loop every upstream call goes through.

deployment, completion = await call(candidates, record, complete, settings.retry, router.selector)

Deployments are tried in the order given (the router's: best first). One whose circuit breaker is open,
or whose queue is full, is passed over without a call. A retryable failure (5xx, 408/409/429, timeout,
refused or cut connection) moves on to the next; coming back to one already tried waits an exponential
backoff. With `hold`, the answering deployment's slot stays taken (a stream): the caller calls `release`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from typing import TYPE_CHECKING, TypeVar

from iros.config import RetrySettings
from iros.core.errors import IrosError, UpstreamError
from iros.routing.router import Deployment
from iros.routing.selection import Selector

if TYPE_CHECKING:
    from iros.core.record import RequestRecord

T = TypeVar("T")

log = logging.getLogger("iros.gateway")


async def backoff(attempt: int, candidates: list[Deployment], retry: RetrySettings) -> None:
    # Moving on to a fresh deployment needs no pause; coming back to one already tried does.
    if attempt < len(candidates):
        return
    delay = min(retry.backoff_ms * 2 ** (attempt - len(candidates)), retry.max_backoff_ms) / 1000
    await asyncio.sleep(delay * random.uniform(0.5, 1.0))


def release(deployment: Deployment) -> None:
    deployment.in_flight -= 1
    if deployment.slots is not None:
        deployment.slots.release()


async def call(
    candidates: list[Deployment],
    record: RequestRecord,
    fn: Callable[[Deployment], Awaitable[T]],
    retry: RetrySettings,
    selector: Selector,
    hold: bool = False,
) -> tuple[Deployment, T]:
    spans = record.spans
    failure: UpstreamError | None = None
    failed = ""  # the model whose deployment failed last: the client is told its name
    busy: IrosError | None = None
    attempts = retry.attempts
    calls = 0
    n = len(candidates)
    for i in range(n * attempts):
        if calls >= attempts:
            break
        deployment = candidates[i % n]
        if calls and i >= n:
            await backoff(i, candidates, retry)
            spans.lap("retry")
        if not deployment.breaker.allow():
            continue
        slots = deployment.slots
        if slots is not None:
            try:
                await slots.acquire()
            except IrosError as exc:
                deployment.breaker.release_probe()
                busy = exc
                continue
            except BaseException:
                deployment.breaker.release_probe()  # cancelled while queued (a cache hit came first)
                raise
            finally:
                spans.lap("upstream_queue")  # the model server's capacity, not Iros's time
        calls += 1
        record.attempts, record.deployment = calls, deployment.label
        deployment.in_flight += 1
        started = perf_counter_ns()
        try:
            result = await fn(deployment)
        except UpstreamError as exc:
            release(deployment)
            spans.lap("upstream_connect")
            failure, failed = exc, deployment.name
            log.warning(
                "request %s: %s attempt %d failed: %s", record.request_id, deployment.label, calls, exc
            )
            if not exc.retryable:
                deployment.breaker.success()  # an answer, if a refusal: the deployment is up
                break
            deployment.breaker.failure()
            selector.failure(deployment.name)
            continue
        except BaseException:
            release(deployment)
            deployment.breaker.release_probe()
            raise
        deployment.breaker.success()
        record.upstream_start_ns = started
        if not hold:
            record.upstream_end_ns = perf_counter_ns()
            release(deployment)
        return deployment, result
    if failure is not None:
        raise failure.to_client(failed)
    names = ", ".join(dict.fromkeys(d.name for d in candidates))
    raise IrosError(
        503,
        f"no deployment of {names} can take the request now "
        f"({'queues full' if busy else 'circuit breakers open after repeated failures'}); retry",
        type="server_error",
        code="no_deployment_available",
        headers={"retry-after": "1"},
    )
