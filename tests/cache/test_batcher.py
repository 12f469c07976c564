"""The batcher in front of a model: batching, long texts apart, and refusing work it is too far behind for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from iros.cache.base import EmbedderBusy, Encoded
from iros.cache.batcher import LONG_UNITS, Batcher, units


class SlowModel:
    """A stand-in model whose every call takes `seconds`, recording the batches it was given."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls: list[list[str]] = []

    async def encode(self, texts: list[str]) -> Encoded:
        self.calls.append(texts)
        await asyncio.sleep(self.seconds)
        return Encoded(np.ones((len(texts), 4), np.float32))


@pytest.fixture
async def slow() -> AsyncIterator[tuple[SlowModel, Batcher]]:
    model = SlowModel(0.2)
    batcher = Batcher(model.encode, max_batch=8, max_wait=0.001, skip_after=0.05)
    batcher.start()
    yield model, batcher
    await batcher.aclose()


async def test_an_idle_model_never_skips(slow: tuple[SlowModel, Batcher]) -> None:
    """One caller at a time always gets its embedding, however slow the model is."""
    _, batcher = slow
    for i in range(3):
        assert len(await batcher.submit([f"q{i}"])) == 1
    assert batcher.skipped == 0 and batcher.seconds_per_unit is not None
    assert batcher.seconds_per_unit >= 0.15


async def test_a_request_behind_a_running_batch_is_skipped_not_queued(
    slow: tuple[SlowModel, Batcher],
) -> None:
    """Once the model is known to be slow, a request arriving while a batch runs is refused at once
    with EmbedderBusy (and counted) instead of waiting for the batch to end."""
    _, batcher = slow
    await batcher.submit(["learn the cost"])
    running = batcher.submit(["first"])
    await asyncio.sleep(0.02)  # the batch is running now
    with pytest.raises(EmbedderBusy, match="behind"):
        batcher.submit(["second"])
    assert batcher.skipped == 1
    assert len(await running) == 1
    # The model is idle again: the next one goes through.
    assert len(await batcher.submit(["third"])) == 1


async def test_callers_arriving_together_share_a_batch_without_skipping(
    slow: tuple[SlowModel, Batcher],
) -> None:
    """Requests that arrive while no batch runs join one batch: none of them waits behind another."""
    model, batcher = slow
    await batcher.submit(["learn the cost"])
    results = await asyncio.gather(*(batcher.submit([f"q{i}"]) for i in range(5)))
    assert [len(r) for r in results] == [1] * 5
    assert model.calls[-1] == [f"q{i}" for i in range(5)] and batcher.skipped == 0


async def test_a_long_text_is_embedded_in_a_batch_of_its_own() -> None:
    """A long text never shares a batch with short ones, so they are not padded to its length."""
    model = SlowModel(0.01)
    batcher = Batcher(model.encode, max_batch=8, max_wait=0.05)
    batcher.start()
    long = "word " * 400
    assert units(long) > LONG_UNITS
    try:
        await asyncio.gather(
            batcher.submit(["short one"]), batcher.submit([long]), batcher.submit(["short two"])
        )
    finally:
        await batcher.aclose()
    assert [long] in model.calls
    assert all(long not in call for call in model.calls if len(call) > 1)


def test_units_are_bounded_by_what_the_model_reads() -> None:
    """A text's cost grows with its length up to MAX_TEXT_CHARS, and no further."""
    assert units("How do I learn Python?") == 1
    assert units("x" * 10_000_000) == units("x" * 5000) < 100
