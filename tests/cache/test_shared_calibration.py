"""Calibration shared by every worker: an outcome judged on one worker counts once on each, a starting
worker replays the latest kept outcomes, and an outage delays the outcomes without losing them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from iros.cache.calibration import Calibration, Outcome, Pending
from iros.cache.shared_calibration import SharedCalibration
from iros.state.base import StateBackend
from iros.state.local import PRUNE_EVERY, LocalState
from iros.state.sync import SharedState
from tests.state.test_state import Flaky

PRIOR = 0.6


class Worker:
    """One worker's calibration, shared through its own SharedState on the given backend."""

    def __init__(self, backend: StateBackend, kept: int = 1000) -> None:
        self.calibration = Calibration(0.05, 0.2)
        self.shared = SharedState(backend, poll=0.02)
        self.sharing = SharedCalibration(self.calibration, self.shared, kept=kept)

    async def judge(self, score: float, correct: bool, namespace: str = "team-a") -> None:
        """A verification judged here, as the cache records and shares it."""
        pending = Pending(namespace, "chat", "key", score, True, 1.0)
        await self.sharing.publish(self.calibration.record(pending, correct))

    def verified(self, namespace: str = "team-a") -> int:
        scope = self.calibration.scopes.get((namespace, "chat", False))
        return scope.verified if scope is not None else 0


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Starts workers on one data directory; stops them after the test."""
    workers: list[Worker] = []

    async def start(backend: StateBackend | None = None, kept: int = 1000) -> Worker:
        worker = Worker(backend or LocalState(tmp_path), kept)
        await worker.shared.start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        await worker.shared.close()


async def until(check: Callable[[], bool]) -> None:
    for _ in range(250):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def test_an_outcome_judged_on_one_worker_counts_once_on_every_worker(
    started: Callable[..., Awaitable[Worker]],
) -> None:
    """Each worker's outcomes reach the other once, and never come back to count twice where judged;
    with the same outcomes both report the same cut and interval."""
    one, two = await started(), await started()
    for i in range(30):
        await one.judge(0.7 + i * 0.01, True)
    await two.judge(0.95, False)
    await until(lambda: one.verified() == 31 and two.verified() == 31)
    await asyncio.sleep(0.2)  # several more polls: nothing is applied again
    assert one.verified() == two.verified() == 31
    assert one.sharing.received == 1 and two.sharing.received == 30
    report = one.calibration.scopes[("team-a", "chat", False)].report(PRIOR)
    assert report == two.calibration.scopes[("team-a", "chat", False)].report(PRIOR)
    assert report["wrong_hits"] == 1


async def test_a_starting_worker_replays_the_latest_kept_outcomes(
    started: Callable[..., Awaitable[Worker]],
) -> None:
    """A worker started after outcomes were judged begins from them, as far as the log keeps them:
    the latest `kept` (give or take one prune's worth), oldest first, each once."""
    one = await started(kept=50)
    total = 2 * PRUNE_EVERY + 10
    for i in range(total):
        await one.judge(i / total, True)
    late = await started(kept=50)
    await until(lambda: late.verified() >= 50)
    await asyncio.sleep(0.1)
    scores = [score for score, _, _ in late.calibration.scopes[("team-a", "chat", False)].outcomes]
    assert 50 <= len(scores) <= 50 + PRUNE_EVERY
    assert scores == [i / total for i in range(total - len(scores), total)]
    assert late.verified() == len(scores)


async def test_outcomes_judged_while_the_state_is_down_count_here_and_reach_the_others_after(
    started: Callable[..., Awaitable[Worker]], tmp_path: Path
) -> None:
    """Cut off from the state, a worker goes on calibrating from its own outcomes; when it answers
    again its outcomes go out and the others' come in, each once."""
    flaky = Flaky(tmp_path)
    cut_off, other = await started(flaky), await started()
    flaky.down = True
    await cut_off.judge(0.9, True)
    await other.judge(0.8, False)
    await asyncio.sleep(0.1)
    assert cut_off.verified() == 1 and not cut_off.shared.connected
    flaky.down = False
    await until(lambda: cut_off.verified() == 2 and other.verified() == 2)
    await asyncio.sleep(0.1)
    assert cut_off.verified() == other.verified() == 2


def test_an_outcome_travels_whole_and_anything_else_is_ignored() -> None:
    """An outcome's data gives it back; an entry missing a field or holding nonsense is no outcome."""
    outcome = Outcome("team-a", "chat", 0.91, False, 5.0, True)
    assert Outcome.of_data({"by": "w1", **outcome.to_data()}) == outcome
    assert Outcome.of_data({"namespace": "team-a", "model": "chat"}) is None
    assert Outcome.of_data({**outcome.to_data(), "score": "nan"}) is None
    assert Outcome.of_data({**outcome.to_data(), "weight": [1]}) is None
