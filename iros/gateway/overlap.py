"""The semantic lookup beside the upstream call (`cache.overlap`), so that a miss never waits for its
embedding: whichever of the two decides first is served.

gate = Gate.of(cache, plan, spans)           # the call awaits gate(deployment) once it holds a connection
won = await race(cache, plan, gate, call)    # the call's result, or the Hit to replay instead

speculate: the call goes out at once; a hit that decides first cuts it short (the task is cancelled, the
connection closed, and llama.cpp or vLLM stop work on it). queue: the call waits, with its connection,
until the lookup missed, so a hit never costs a call. auto: speculate on deployments without a price,
queue on priced ones. An answer that comes first (a stream: its first chunk) is served; the lookup goes
on only to embed the question for the answer's save (ResponseCache.save waits for it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from iros.cache.engine import Hit, ResponseCache
from iros.cache.plan import Plan
from iros.core.spans import Spans
from iros.routing.router import Deployment

__all__ = ["Cached", "Gate", "race"]

T = TypeVar("T")


class Cached(Exception):
    """A gated upstream call not made: the semantic lookup it waited for found the answer."""


class Gate:
    """What an upstream call awaits once it holds a deployment's connection. Gated (queue, or auto on a
    priced deployment), it waits for the lookup and raises Cached on a hit; otherwise it lets the call
    go at once. `sent`: a call went out while the lookup still ran."""

    __slots__ = ("lookup", "mode", "sent", "spans")

    def __init__(self, lookup: asyncio.Task[Hit | None] | None, mode: str, spans: Spans) -> None:
        self.lookup, self.mode, self.spans = lookup, mode, spans
        self.sent = False

    @classmethod
    def of(cls, cache: ResponseCache | None, plan: Plan | None, spans: Spans) -> Gate:
        """The gate for this request's call: open when no semantic lookup runs beside it."""
        lookup = plan.lookup if plan is not None else None
        if lookup is None or cache is None:
            return cls(None, "off", spans)
        return cls(lookup, cache.settings.overlap, spans)

    async def __call__(self, deployment: Deployment) -> None:
        lookup = self.lookup
        speculate = self.mode == "speculate" or (self.mode == "auto" and not priced(deployment))
        if lookup is not None and not speculate:
            if not lookup.done():
                await asyncio.shield(lookup)  # the call's own cancellation must not cancel the lookup
                self.spans.lap("cache")  # the wait was the lookup's, not the model's
            if lookup.result() is not None:
                raise Cached
        self.sent = lookup is not None and not lookup.done()


async def race(
    cache: ResponseCache,
    plan: Plan,
    gate: Gate,
    call: Awaitable[T],
    keep: Callable[[], bool] | None = None,
) -> T | Hit:
    """Run `call` beside plan.lookup. A hit that decides first: the call is cut short (gated, it was
    never sent) and the Hit returned for the caller to replay. An answer first: returned. A call that
    fails first waits for the lookup, which may still answer the client. `keep`: whether a call a hit
    overtook must go on anyway (single-flight followers wait on it)."""
    lookup: asyncio.Task[Hit | None] = plan.lookup
    task = asyncio.ensure_future(call)
    try:
        await asyncio.wait((lookup, task), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()  # the client's request was cancelled: so is its call
        raise
    if task.done() and not task.cancelled() and task.exception() is None:
        cache.settle(plan, None, overtaken=not lookup.done())
        return task.result()
    if not lookup.done():
        await asyncio.wait((lookup,))
    hit = lookup.result()
    if hit is None:
        cache.settle(plan, None)
        return await task
    if not task.done():
        if gate.sent:
            cache.counts["speculative_cancelled"] += 1
        if keep is not None and keep():
            task.add_done_callback(_retrieve)  # it goes on for the identical requests waiting on it
        else:
            task.cancel()
            await asyncio.wait((task,))
    if task.done():
        _retrieve(task)  # a gated call refused, or one that failed meanwhile
    plan.lookup = None  # nothing to save: the answer is the cache's
    cache.settle(plan, hit)
    return hit


def priced(deployment: Deployment) -> bool:
    pricing = deployment.settings.pricing
    return pricing is not None and (pricing.input_per_million > 0 or pricing.output_per_million > 0)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a dropped call's outcome as seen, so asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()
