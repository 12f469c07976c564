"""Cache warming in the background: one job at a time, a few prompts in flight, progress to poll.

A warm used to ask for every prompt at once inside the request: a thousand large prompts held the
event loop and every model slot, slowed clients to seconds and ended in a 500. Now the request only
checks the bounds and starts a job; the job asks CONCURRENCY prompts at a time through the same
Gateway.warm (admission, failover, cache write), and its progress is read back by id.

warmer = Warmer(gateway)
job = warmer.start([("small", "What is Iros?")], {"temperature": 0})   # WarmBusy while one runs
warmer.get(job.id).view()        # {"id", "state": "running" | "done", "total", "done", "outcomes", ...}
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from iros.core.errors import IrosError
from iros.gateway.pipeline import Gateway

__all__ = [
    "CONCURRENCY",
    "MAX_PROMPTS",
    "MAX_PROMPT_CHARS",
    "MAX_TOTAL_CHARS",
    "WarmBusy",
    "WarmJob",
    "Warmer",
    "check_prompts",
]

log = logging.getLogger("iros.cache")

MAX_PROMPTS = 1000  # prompts per job
MAX_PROMPT_CHARS = 32_768  # one prompt
MAX_TOTAL_CHARS = 4 * 2**20  # all the prompts of one job together
CONCURRENCY = 4  # prompts asked at once: warming never takes more of the model's slots than this
KEEP_JOBS = 10  # finished jobs whose progress can still be read
SHOWN_CHARS = 200  # of each prompt, in the job's results


class WarmBusy(Exception):
    """A warm job is running already; its id is the message."""


def check_prompts(jobs: Sequence[tuple[str, str]]) -> str | None:
    """What is wrong with a warm's prompts (count, one too long, all too long together), or None."""
    if len(jobs) > MAX_PROMPTS:
        return f"at most {MAX_PROMPTS} prompts per warm, not {len(jobs)}"
    total = 0
    for i, (_, prompt) in enumerate(jobs):
        if len(prompt) > MAX_PROMPT_CHARS:
            return f"prompts[{i}] has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} per prompt"
        total += len(prompt)
    if total > MAX_TOTAL_CHARS:
        return f"the prompts have {total} characters together; at most {MAX_TOTAL_CHARS} per warm"
    return None


@dataclass
class WarmJob:
    id: str
    total: int
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    done: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.finished_at is None

    def view(self, results: bool = True) -> dict[str, Any]:
        end = self.finished_at or time.time()
        out: dict[str, Any] = {
            "id": self.id,
            "state": "running" if self.running else "done",
            "total": self.total,
            "done": self.done,
            "warmed": dict(self.outcomes),
            "seconds": round(end - self.started_at, 3),
        }
        if results:
            out["results"] = self.results
        return out


class Warmer:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.jobs: OrderedDict[str, WarmJob] = OrderedDict()
        self._task: asyncio.Task[None] | None = None

    def get(self, job_id: str) -> WarmJob | None:
        return self.jobs.get(job_id)

    def start(self, jobs: Sequence[tuple[str, str]], params: dict[str, Any]) -> WarmJob:
        """Start warming `jobs` ((model, prompt) pairs, already checked) in the background."""
        running = next((j for j in self.jobs.values() if j.running), None)
        if running is not None:
            raise WarmBusy(running.id)
        job = WarmJob(secrets.token_urlsafe(9), len(jobs))
        self.jobs[job.id] = job
        while len(self.jobs) > KEEP_JOBS:
            self.jobs.popitem(last=False)
        self._task = asyncio.create_task(self._run(job, list(jobs), params), name=f"cache warm {job.id}")
        return job

    async def _run(self, job: WarmJob, jobs: list[tuple[str, str]], params: dict[str, Any]) -> None:
        pending = iter(jobs)

        async def worker() -> None:
            # Each worker takes the next prompt when its last is answered: at most CONCURRENCY in flight.
            for model, prompt in pending:
                result: dict[str, Any] = {"model": model, "prompt": prompt[:SHOWN_CHARS]}
                try:
                    result["outcome"] = await self.gateway.warm(model, prompt, params)
                except IrosError as exc:
                    result["outcome"], result["error"] = "failed", exc.message
                except Exception:
                    log.exception("cache warm %s: warming one prompt failed inside Iros", job.id)
                    result["outcome"], result["error"] = "failed", "internal error"
                job.results.append(result)
                job.outcomes[result["outcome"]] += 1
                job.done += 1

        try:
            await asyncio.gather(*(worker() for _ in range(min(CONCURRENCY, len(jobs)))))
        finally:
            job.finished_at = time.time()
