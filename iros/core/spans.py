"""One request's timeline: each pipeline stage's duration, read by metrics, profiling and bottleneck analysis.

spans = Spans()
...auth...
spans.lap("auth")           # time since the previous lap is the auth stage's
spans.ms()                  # {"auth": 0.012, ..., "total": 1.9}
"""

from __future__ import annotations

from time import perf_counter_ns

# The stages in pipeline order. upstream_queue (waiting for one of a deployment's max_connections: the
# model server is busy), upstream_connect, upstream_ttft and stream are the model's time, not Iros's.
STAGES = (
    "queue",
    "auth",
    "parse",
    "cache",
    "route",
    "upstream_queue",
    "upstream_connect",
    "upstream_ttft",
    "stream",
    "respond",
)


UPSTREAM_STAGES = ("upstream_queue", "upstream_connect", "upstream_ttft", "stream")


class Spans:
    __slots__ = ("_last", "durations", "end", "start")

    def __init__(self) -> None:
        self.start = self._last = perf_counter_ns()
        self.end = 0
        self.durations: dict[str, int] = {}

    def lap(self, stage: str) -> int:
        """Charge the time since the previous lap to `stage` (accumulating across retries)."""
        now = perf_counter_ns()
        self.durations[stage] = self.durations.get(stage, 0) + now - self._last
        self._last = now
        return now

    def skip(self) -> None:
        """Start the next stage now, charging the time since the last lap to nothing."""
        self._last = perf_counter_ns()

    def finish(self) -> None:
        self.end = perf_counter_ns()

    @property
    def total_ns(self) -> int:
        return (self.end or perf_counter_ns()) - self.start

    def overhead_ns(self, until: int | None = None) -> int:
        """Time inside Iros: elapsed time less the upstream stages."""
        elapsed = (until or self.end or perf_counter_ns()) - self.start
        d = self.durations
        upstream = sum(d.get(stage, 0) for stage in UPSTREAM_STAGES)
        return max(elapsed - upstream, 0)

    def ms(self) -> dict[str, float]:
        out = {k: v / 1e6 for k, v in self.durations.items()}
        out["total"] = self.total_ns / 1e6
        out["overhead"] = self.overhead_ns() / 1e6
        return out
