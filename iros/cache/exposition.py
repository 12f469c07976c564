"""The semantic cache's verification in /metrics: read from the cache when Prometheus scrapes.

registry.register(VerificationCollector(cache))     # app.py, on the monitor's registry

Gauges and counters built at scrape time from ResponseCache.verification_report(): nothing on the
request path. Labels are bounded: `namespace` is an API key's name (or global, _shared) and `model` a
configured model; the cache keeps at most calibration.MAX_SCOPES of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from iros.cache.engine import ResponseCache

__all__ = ["VerificationCollector"]


class VerificationCollector(Collector):
    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        report = self.cache.verification_report()
        yield GaugeMetricFamily(
            "iros_cache_max_false_hit_rate",
            "δ: the largest share of served semantic hits that may be wrong",
            value=report["max_false_hit_rate"],
        )
        estimate = GaugeMetricFamily(
            "iros_cache_false_hit_rate",
            "verified share of served semantic hits that were wrong (bound: the Wilson interval's ends)",
            labels=["bound"],
        )
        interval = report.get("interval")
        if report.get("false_hit_rate") is not None and interval:
            estimate.add_metric(["estimate"], report["false_hit_rate"])
            estimate.add_metric(["lower"], interval[0])
            estimate.add_metric(["upper"], interval[1])
        yield estimate
        for name, key, text in (
            ("iros_cache_verified", "judged_right", "verification outcomes judged right"),
            ("iros_cache_verified_wrong", "judged_wrong", "verification outcomes judged wrong"),
            ("iros_cache_verification_calls", "verification_calls", "would-be hits asked upstream too"),
            ("iros_cache_verification_tokens", "verification_tokens", "tokens spent on verification calls"),
        ):
            yield CounterMetricFamily(name, text, value=report[key])
        cut = GaugeMetricFamily(
            "iros_cache_semantic_cut",
            "the verifier score a semantic hit needs, per namespace and model (calibrated or the prior's)",
            labels=["namespace", "model", "calibrated"],
        )
        guarded = GaugeMetricFamily(
            "iros_cache_shared_instruction_cut",
            "the verifier score a candidate the shared-instruction rule flags needs, per namespace and "
            "model, once its own verified outcomes allow serving any (absent: none is served)",
            labels=["namespace", "model"],
        )
        for scope in report["scopes"]:
            if scope["cut"] is None:
                continue
            if scope.get("guarded"):
                guarded.add_metric([scope["namespace"], scope["model"]], scope["cut"])
            else:
                cut.add_metric(
                    [scope["namespace"], scope["model"], str(scope["calibrated"]).lower()], scope["cut"]
                )
        yield cut
        yield guarded
