"""Batching concurrent embedding calls, and refusing the ones that would wait behind a backlog.

batcher = Batcher(encode, max_batch=64, max_wait=0.002, skip_after=0.01)
batcher.start()                                   # in the running loop
encoded = await batcher.submit(["How do I learn Python?"])   # EmbedderBusy at once when it is behind

The batcher keeps an estimate of what the model costs (seconds per `units` of text, from the batches it
ran) and so of the wait ahead of a new request: what is left of the running batch, and whatever would not
fit in the next one with it. A request that would wait longer than `skip_after` for its turn is refused
with EmbedderBusy instead of queued, so a caller that can do without (the semantic cache: a lookup
becomes a miss) is never slower for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from iros.cache.base import MAX_TEXT_CHARS, EmbedderBusy, EmbedderError, Encoded

__all__ = ["LONG_UNITS", "Batcher", "units"]

CHARS_PER_UNIT = 64  # about one short question: the model's cost grows with the word pieces it reads
LONG_UNITS = 8  # a text of more units than this is embedded in a batch of its own
SMOOTHING = 0.2  # weight of the latest batch in the cost estimate


def units(text: str) -> int:
    """What a text costs the model, in short questions' worth (it reads at most MAX_TEXT_CHARS)."""
    return 1 + min(len(text), MAX_TEXT_CHARS) // CHARS_PER_UNIT


@dataclass(slots=True)
class _Request:
    texts: list[str]
    future: asyncio.Future[Encoded]
    units: int


@dataclass(slots=True)
class Batcher:
    """Collects the texts of concurrent callers into batches of at most `max_batch` texts.

    A batch goes to `encode` at once when the model is idle (a lone lookup never waits for company);
    while `max_in_flight` batches are running, the next one gathers what arrives meanwhile, waiting at
    most `max_wait` seconds after its first request. Each caller gets its own rows back. A long text
    (more than LONG_UNITS) goes in a batch of its own, so that short ones never pad up to its length.
    With `skip_after` (seconds), a request that would wait longer than that is refused (EmbedderBusy).
    """

    encode: Callable[[list[str]], Awaitable[Encoded]]
    max_batch: int
    max_wait: float
    max_in_flight: int = 1
    max_queue: int = 4096
    skip_after: float | None = None
    batches: int = 0  # encode calls so far
    skipped: int = 0  # requests refused because the model was behind
    seconds_per_unit: float | None = None  # the cost estimate, once a batch has run
    _queue: asyncio.Queue[_Request] = field(init=False)
    _slots: asyncio.Semaphore = field(init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    # Requests taken off the queue and not yet answered, so that aclose() can answer them.
    _collecting: list[_Request] = field(default_factory=list, init=False)
    _carry: _Request | None = field(default=None, init=False)
    _running: dict[asyncio.Task[None], list[_Request]] = field(default_factory=dict, init=False)
    _pending_units: int = field(default=0, init=False)  # submitted, not yet in a running batch
    # Running batches: (when it started, its units), to tell how long until a slot frees.
    _started: dict[asyncio.Task[None], tuple[float, int]] = field(default_factory=dict, init=False)

    def start(self) -> None:
        # Created here so they bind to the running loop.
        self._queue = asyncio.Queue(self.max_queue)
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="iros-embed-batcher")

    def delay(self) -> float:
        """Seconds a request submitted now would wait before the model starts on it (an estimate): none
        while a slot is free; else until the first running batch should end, and beyond the next batch,
        which it joins, the work queued ahead of it."""
        cost = self.seconds_per_unit
        if cost is None or len(self._started) < self.max_in_flight:
            return 0.0
        now = time.perf_counter()
        running = min(max(0.0, began + n * cost - now) for began, n in self._started.values())
        return running + max(0, self._pending_units - self.max_batch) * cost

    def submit(self, texts: list[str]) -> asyncio.Future[Encoded]:
        if self.skip_after is not None and self.delay() > self.skip_after:
            self.skipped += 1
            raise EmbedderBusy(f"the embedder is behind (over {self.skip_after * 1000:g} ms of work waiting)")
        future: asyncio.Future[Encoded] = asyncio.get_running_loop().create_future()
        request = _Request(texts, future, sum(units(t) for t in texts))
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            # Failing fast lets a cache lookup turn into a miss instead of queueing behind a backlog.
            raise EmbedderError(f"embedding queue is full ({self.max_queue} requests waiting)") from None
        self._pending_units += request.units
        return future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        first = self._carry or await self._queue.get()
        self._carry = None
        batch = self._collecting = [first]
        if first.units > LONG_UNITS * len(first.texts):
            return  # long texts: a batch of their own
        size = len(first.texts)
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            try:
                request = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                # Waiting only pays while the model is busy: an idle one takes the batch now.
                if left <= 0 or not self._slots.locked():
                    break
                try:
                    request = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    break
            if size + len(request.texts) > self.max_batch or request.units > LONG_UNITS * len(request.texts):
                # Requests are never split: this one opens the next batch.
                self._carry = request
                break
            batch.append(request)
            size += len(request.texts)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._collect()
            self._pending_units -= sum(r.units for r in self._collecting)
            # Callers that timed out meanwhile have cancelled their futures: skip their texts.
            batch = [r for r in self._collecting if not r.future.done()]
            if not batch:
                self._collecting = []
                continue
            await self._slots.acquire()
            task = loop.create_task(self._encode(batch))
            self._running[task] = batch
            self._started[task] = (time.perf_counter(), sum(r.units for r in batch))
            self._collecting = []
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._started.pop(task, None)
        self._slots.release()

    async def _encode(self, batch: list[_Request]) -> None:
        texts = [t for r in batch for t in r.texts]
        self.batches += 1
        began = time.perf_counter()
        try:
            encoded = await self.encode(texts)
        except Exception as exc:
            error = exc if isinstance(exc, EmbedderError) else EmbedderError(f"embedding failed: {exc!r}")
            _fail(batch, error)
            return
        self._learn(time.perf_counter() - began, sum(r.units for r in batch))
        start = 0
        for r in batch:
            end = start + len(r.texts)
            if not r.future.done():
                r.future.set_result(encoded.rows(start, end))
            start = end

    def _learn(self, seconds: float, n: int) -> None:
        per_unit = seconds / max(n, 1)
        old = self.seconds_per_unit
        self.seconds_per_unit = per_unit if old is None else old + SMOOTHING * (per_unit - old)

    async def aclose(self) -> None:
        tasks = [t for t in (self._task, *self._running) if t is not None]
        waiting = [r for batch in self._running.values() for r in batch] + self._collecting
        if self._carry:
            waiting.append(self._carry)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        _fail(waiting, EmbedderError("the embedder was closed"))


def _fail(requests: list[_Request], error: Exception) -> None:
    for r in requests:
        if not r.future.done():
            r.future.set_exception(error)
