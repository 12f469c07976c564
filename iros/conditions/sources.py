"""Where conditions read their values: the running Iros (LiveSource) or fixed values (StaticSource).

source = LiveSource.of(monitor, kpi_window=60)      # the collector's frames, the sampler, the store
source.kpis(now)["response_time_p95"]                # the flat KPI report, each section computed on read
await source.stats("response_time_ms", (("outcome", "ok"),), 300, now)   # Stats of one window
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import cache
from typing import Any

from iros.conditions.tree import DEFAULT_KPI_WINDOW, LIVE_WINDOW_SECONDS, Match, Stats
from iros.metrics import kpi
from iros.metrics.monitor import Monitor
from iros.metrics.sketch import Sketch
from iros.metrics.store import MetricsStore, Query, SeriesKey

__all__ = ["LiveSource", "StaticSource", "merge_all"]


class StaticSource:
    """Fixed KPI values (tests, `iros alerts check`); windows read the given series' samples.

    StaticSource({"response_time_p95": 5200}, series={"response_time_ms": [(ts, value), ...]})
    """

    def __init__(
        self,
        kpis: Mapping[str, Any],
        series: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    ) -> None:
        self._kpis = dict(kpis)
        self._series = dict(series or {})

    def kpis(self, now: float) -> Mapping[str, Any]:
        return self._kpis

    async def stats(self, metric: str, match: Match, seconds: float, now: float) -> Stats:
        values = [v for ts, v in self._series.get(metric, ()) if now - seconds <= ts <= now]
        return Stats.of(Sketch.of(values))


class LiveSource:
    """The running Iros: KPIs and short windows from the collector's frames, longer windows from the
    metrics store.

    source = LiveSource(lambda: collector.frames, lambda: sampler.latest, store, kpi_window=60)
    """

    # Store windows are read per minute with this many quantiles each, merged by weighted rank.
    QUANTILE_GRID = tuple(i / 100 for i in range(101))

    def __init__(
        self,
        frames: Callable[[], Iterable[Any]],
        system: Callable[[], Any] | None = None,
        store: MetricsStore | None = None,
        kpi_window: float = DEFAULT_KPI_WINDOW,
        extras: Mapping[str, Callable[[], float | None]] | None = None,
    ) -> None:
        self.frames = frames
        self.system = system or (lambda: None)
        # KPIs other parts provide (the cache's false-hit rate): name -> a reader, None when no data.
        self.extras: Mapping[str, Callable[[], float | None]] = extras or {}
        self.store = store
        self.kpi_window = kpi_window
        self._kpi_cache: _LazyKpis | None = None
        self._scans: dict[tuple[float, float], _Scan] = {}

    @classmethod
    def of(cls, monitor: Monitor, kpi_window: float = DEFAULT_KPI_WINDOW) -> LiveSource:
        return cls(
            monitor.frames, lambda: monitor.sampler.latest, monitor.store, kpi_window, monitor.extra_kpis
        )

    def window(self, metrics: Iterable[str], seconds: float, now: float, match: Match = ()) -> kpi.Sketches:
        """One merged sketch per series of `metrics` (labels matching `match`) in [now - seconds, now].

        Only the series asked for are merged, each once per window and evaluation time however many
        rules read it: merging every series of every frame, as kpi.window does, costs tens of
        milliseconds of the event loop per minute of window.
        """
        wanted = frozenset(metrics)
        conditions = [(k, v if isinstance(v, tuple) else (v,)) for k, v in match]
        scan = self._scan(seconds, now)
        out: kpi.Sketches = {}
        for key in scan.frames_of:
            if key[0] in wanted:
                labels = dict(key[1])
                if all(labels.get(k) in v for k, v in conditions):
                    out[key] = scan.merged(key)
        return out

    def _scan(self, seconds: float, now: float) -> _Scan:
        scan = self._scans.get((seconds, now))
        if scan is None:
            if len(self._scans) >= 8:
                self._scans.clear()  # evaluation times move on; keep only the current one's
            scan = self._scans[(seconds, now)] = _Scan(self.frames(), now - seconds, now)
        return scan

    def kpis(self, now: float) -> Mapping[str, Any]:
        # One report per evaluation time, however many rules read it; each section computed when read.
        if self._kpi_cache is None or self._kpi_cache.now != now:
            self._kpi_cache = _LazyKpis(self, now)
        return self._kpi_cache

    async def stats(self, metric: str, match: Match, seconds: float, now: float) -> Stats:
        if seconds <= LIVE_WINDOW_SECONDS or self.store is None:
            series = self.window((metric,), min(seconds, LIVE_WINDOW_SECONDS), now, match)
            return Stats.of(merge_all(series.values()))
        return await self._stored(metric, match, seconds, now)

    async def _stored(self, metric: str, match: Match, seconds: float, now: float) -> Stats:
        assert self.store is not None
        # The store filters by equality: a label with several allowed values is one query each.
        combos: list[tuple[tuple[str, str], ...]] = [()]
        for label, value in match:
            options = value if isinstance(value, tuple) else (value,)
            combos = [(*c, (label, v)) for c in combos for v in options]
        step = 60.0 if seconds <= 86400 else 3600.0
        points = []
        for combo in combos:
            query = Query(metric, now - seconds, now, step, tuple(sorted(combo)), self.QUANTILE_GRID)
            points += [p for p in await self.store.query(query) if p.count]
        if not points:
            return Stats()
        count = sum(p.count for p in points)
        grid = self.QUANTILE_GRID
        pairs = sorted(
            (v, p.count / len(grid))
            for p in points
            for v in (p.quantiles.get(q) for q in grid)
            if v is not None
        )
        values = [v for v, _ in pairs]
        cumulative: list[float] = []
        running = 0.0
        for _, w in pairs:
            running += w
            cumulative.append(running)

        def quantile(q: float) -> float | None:
            if not values:
                return None
            i = bisect.bisect_left(cumulative, q * running)
            return values[min(i, len(values) - 1)]

        lows = [p.min for p in points if p.min is not None]
        highs = [p.max for p in points if p.max is not None]
        return Stats(
            count,
            sum(p.sum for p in points),
            min(lows) if lows else None,
            max(highs) if highs else None,
            quantile,
        )


def merge_all(sketches: Iterable[Sketch]) -> Sketch:
    out = Sketch()
    for x in sketches:
        out.merge(x)
    return out


class _Scan:
    """The frames of one window, gathered per series once; each series merged when first asked for."""

    def __init__(self, frames: Iterable[Any], since: float, until: float) -> None:
        self.frames_of: dict[SeriesKey, list[Sketch]] = {}
        for frame in frames:
            if since <= frame.at <= until:
                for key, sketch in frame.series.items():
                    self.frames_of.setdefault(key, []).append(sketch)
        self._merged: dict[SeriesKey, Sketch] = {}

    def merged(self, key: SeriesKey) -> Sketch:
        sketch = self._merged.get(key)
        if sketch is None:
            sketch = self._merged[key] = merge_all(self.frames_of[key])
        return sketch


# Which catalog series each section of the KPI report reads, and which KPIs it gives.
_SECTION_METRICS = {
    "response": ("response_time_ms", "overhead_ms", "cpu_usage_percent", "cpu_per_response_percent"),
    "experience": (
        "response_time_ms", "ttft_ms", "tpot_ms", "stream_max_gap_ms", "stream_stalls", "user_satisfaction",
        "relevance",
    ),
    "business": ("prompt_tokens", "completion_tokens", "content_length_bytes"),
}  # fmt: skip


@cache
def _section_of() -> dict[str, str]:
    empty: kpi.Sketches = {}
    out = dict.fromkeys(kpi.business_kpis(empty, 60.0), "business")
    out.update(dict.fromkeys(kpi.experience_kpis(empty, None), "experience"))
    out.update(dict.fromkeys(kpi.response_kpis(empty, 60.0), "response"))
    return out


class _LazyKpis(Mapping[str, Any]):
    """The flat KPI report of one evaluation time, each section computed on first read."""

    def __init__(self, source: LiveSource, now: float) -> None:
        self.source = source
        self.now = now
        self._values: dict[str, Any] = {}
        self._done: set[str] = set()

    def _compute(self, section: str) -> None:
        if section in self._done:
            return
        self._done.add(section)
        seconds = self.source.kpi_window
        if section == "system":
            self._values.update(kpi.system_kpis(self.source.system()))
            self._values.update({name: read() for name, read in self.source.extras.items()})
            return
        s = self.source.window(_SECTION_METRICS[section], seconds, self.now)
        if section == "response":
            self._values.update(kpi.response_kpis(s, seconds))
        elif section == "business":
            self._values.update(kpi.business_kpis(s, seconds))
        else:
            self._compute("response")
            self._values.update(kpi.experience_kpis(s, self._values["response_time_avg"]))

    def __getitem__(self, key: str) -> Any:
        self._compute(_section_of().get(key, "system"))
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        for section in ("response", "experience", "business", "system"):
            self._compute(section)
        return iter(dict(self._values))

    def __len__(self) -> int:
        return len(list(iter(self)))
