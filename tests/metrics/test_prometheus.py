"""PrometheusStore against a real Prometheus scraping a real `iros serve`: what Iros served comes back."""

from __future__ import annotations

import math
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from iros.core.errors import StoreUnavailable
from iros.metrics.catalog import METRICS
from iros.metrics.prometheus import GAUGE_AGGREGATION, MAX_POINTS, PrometheusStore, escape, promql
from iros.metrics.store import Query
from iros.testing.iros import IrosProcess, free_port, wait_until
from iros.testing.prometheus import PrometheusServer

# One instant model and one with real latency spread over several histogram buckets.
SENT = {"alpha": 24, "beta": 10}
DURATION = "iros_request_duration_seconds"


def iros_config(data_dir: Path, prometheus: str) -> dict[str, object]:
    return {
        "auth": {"open": True},
        "server": {"data_dir": str(data_dir)},
        "models": [
            {"name": "alpha", "backend": "simulated", "profile": "instant"},
            {"name": "beta", "backend": "simulated", "profile": "lightweight"},
        ],
        # Fast ticks so /metrics catches up with the requests quickly.
        # Iros reads its own history back from the Prometheus that scrapes it, as deployed.
        "metrics_collection": {
            "live_interval_seconds": 0.2,
            "collection_interval_seconds": 1,
            "storage": {"backend": "prometheus", "endpoint": prometheus, "timeout_seconds": 2},
        },
    }


# ------------------------------------------------------------------------------------------ helpers


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Iros's own /metrics, parsed: the ground truth Prometheus should hold too."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def by_model(samples: list[tuple[str, dict[str, str], float]], name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for n, labels, value in samples:
        if n == name and "model" in labels:
            out[labels["model"]] = out.get(labels["model"], 0.0) + value
    return out


def buckets(samples: list[tuple[str, dict[str, str], float]], model: str) -> list[tuple[float, float]]:
    """Cumulative (le, count) of the response-time histogram of one model, over its other labels."""
    acc: dict[float, float] = {}
    for n, labels, value in samples:
        if n == f"{DURATION}_bucket" and labels.get("model") == model:
            le = float(labels["le"])
            acc[le] = acc.get(le, 0.0) + value
    return sorted(acc.items())


def bucket_bounds(cumulative: list[tuple[float, float]], rank: float) -> tuple[float, float]:
    """The bucket [lower, upper] holding the observation at `rank` (1-based, fractional allowed)."""
    lower = 0.0
    for le, count in cumulative:
        if count >= rank:
            return lower, le
        lower = le
    return lower, math.inf


@dataclass
class Traffic:
    t0: float
    requests_start: float = 0.0
    requests_end: float = 0.0
    last_scrape: float = 0.0  # Prometheus' timestamp of a scrape that saw every response
    latencies: dict[str, list[float]] = field(default_factory=dict)  # client-side seconds
    truth: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def prom_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def iros_server(tmp_path_factory: pytest.TempPathFactory, prom_port: int) -> Iterator[IrosProcess]:
    config = iros_config(tmp_path_factory.mktemp("iros-data"), f"http://127.0.0.1:{prom_port}")
    proc = IrosProcess.serve(config)
    with proc:
        yield proc


@pytest.fixture(scope="module")
def prom(iros_server: IrosProcess, prom_port: int) -> Iterator[PrometheusServer]:
    with PrometheusServer([iros_server.url], port=prom_port, scrape_interval="1s") as server:
        server.wait_for_targets_up()
        yield server


def prom_counts(prom: PrometheusServer) -> dict[str, float]:
    result = prom.instant(f"sum by (model) ({DURATION}_count)")
    return {r["metric"]["model"]: float(r["value"][1]) for r in result if "model" in r["metric"]}


@pytest.fixture(scope="module")
def traffic(iros_server: IrosProcess, prom: PrometheusServer) -> Traffic:
    """A warm-up response per model, scraped; then SENT more; then scraped again."""
    t = Traffic(t0=time.time())
    latencies: dict[str, list[float]] = {m: [] for m in SENT}

    def send(client: httpx.Client, model: str) -> None:
        # A unique prompt each time: every response takes the same path (no cache hits).
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"question {uuid.uuid4().hex}"}],
            "max_tokens": 4,
        }
        began = time.perf_counter()
        response = client.post(f"{iros_server.url}/v1/chat/completions", json=body)
        latencies[model].append(time.perf_counter() - began)
        assert response.status_code == 200, response.text

    with httpx.Client(timeout=10) as client:
        # The warm-up makes every series exist, and be scraped, before the counted traffic.
        for model in SENT:
            send(client, model)
        wait_until(lambda: prom_counts(prom) == {m: 1.0 for m in SENT}, "Prometheus to scrape the warm-up")
        t.requests_start = time.time()
        jobs = [m for m, n in SENT.items() for _ in range(n - 1)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda m: send(client, m), jobs))
        t.requests_end = time.time()

    expected = {m: float(n) for m, n in SENT.items()}
    wait_until(lambda: by_model(scrape(iros_server.url), f"{DURATION}_count") == expected, "Iros's /metrics")
    wait_until(lambda: prom_counts(prom) == expected, "Prometheus to scrape every response")
    t.truth = scrape(iros_server.url)
    stamp = prom.instant(f"max(timestamp({DURATION}_count))")
    t.last_scrape = float(stamp[0]["value"][1])
    t.latencies = latencies
    return t


@pytest.fixture
async def store(prom: PrometheusServer) -> AsyncIterator[PrometheusStore]:
    store = PrometheusStore(prom.url, timeout=5.0)
    await store.start()
    yield store
    await store.close()


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.e2e
async def test_one_window_ending_at_a_scrape_counts_every_response(
    store: PrometheusStore, traffic: Traffic
) -> None:
    """A window that ends exactly on a scrape counts exactly what Iros served, per model."""
    # step = the scrape's own timestamp: one aligned window [0, T), evaluated at T, which holds every
    # scrape of the run.
    step = traffic.last_scrape
    for model, sent in SENT.items():
        query = Query("response_time_ms", traffic.t0, traffic.last_scrape, step, match=(("model", model),))
        points = await store.query(query)
        assert [p.ts for p in points] == [0.0]
        assert points[0].count == sent, (model, points[0])
        assert points[0].min is None and points[0].max is None


@pytest.mark.e2e
async def test_p95_lies_in_the_bucket_of_the_real_p95(store: PrometheusStore, traffic: Traffic) -> None:
    """The p95 read back is inside the histogram bucket that holds Iros's own 95th-ranked response."""
    step = traffic.last_scrape
    for model, sent in SENT.items():
        query = Query(
            "response_time_ms",
            traffic.t0,
            traffic.last_scrape,
            step,
            match=(("model", model),),
            quantiles=(0.5, 0.95),
        )
        [point] = await store.query(query)
        p95 = point.quantiles[0.95]
        assert p95 is not None
        # Iros's cumulative buckets are the ground truth; the store answers in ms, /metrics in s.
        lower, upper = bucket_bounds(buckets(traffic.truth, model), 0.95 * sent)
        assert lower * 1000 <= p95 <= upper * 1000, (model, p95, lower, upper)
        # What Iros measures ends before the client's clock stops: never above the client's view
        # (to the bucket), and the client saw at least the bucket's lower edge.
        client_p95 = sorted(traffic.latencies[model])[math.ceil(0.95 * sent) - 1]
        client_edge = min(le for le, _ in buckets(traffic.truth, model) if le >= client_p95)
        assert lower <= client_p95 and p95 <= client_edge * 1000, (model, client_p95, p95)
        truth_sum = by_model(traffic.truth, f"{DURATION}_sum")[model] * 1000
        assert point.avg is not None and 0.5 <= point.avg / (truth_sum / sent) <= 2.0
    # The two models really differ: the lightweight one is slower.
    [alpha] = await store.query(
        Query("response_time_ms", traffic.t0, step, step, match=(("model", "alpha"),), quantiles=(0.95,))
    )
    [beta] = await store.query(
        Query("response_time_ms", traffic.t0, step, step, match=(("model", "beta"),), quantiles=(0.95,))
    )
    assert (alpha.quantiles[0.95] or 0) < (beta.quantiles[0.95] or 0)


@pytest.mark.e2e
async def test_aligned_windows_are_prometheus_evaluations_at_their_end(
    store: PrometheusStore, prom: PrometheusServer, traffic: Traffic
) -> None:
    """Ordinary aligned windows: oldest first, and window [ts, ts + step) is the evaluation at ts + step.

    Response windows count what was scraped in them against the value one step earlier, so
    consecutive windows add up to exactly what Iros served, however the bursts fell between scrapes.
    """
    step = 5.0
    end = time.time() + 1
    rss = "iros_process_resident_memory_bytes[5s]"
    # A gauge is scraped every second, so every window holds samples.
    points = await store.query(Query("process_memory_bytes", traffic.t0 - step, end, step))
    assert points
    assert [p.ts for p in points] == sorted(p.ts for p in points)
    for p in points:
        assert p.ts % step == 0
        [count] = prom.instant(f"max(count_over_time({rss}))", at=p.ts + step)
        [peak] = prom.instant(f"sum(max_over_time({rss}))", at=p.ts + step)
        assert (p.count, p.max) == (round(float(count["value"][1])), float(peak["value"][1])), p
    # Response windows that hold data are where the responses were: served from t0 to
    # requests_end, scraped at most ~1.2 s later.
    responses = await store.query(Query("response_time_ms", traffic.t0 - step, end, step))
    for p in responses:
        assert p.ts % step == 0
        assert p.ts + step > traffic.t0 - 1 and p.ts < traffic.requests_end + 2.5, (p.ts, traffic)
    assert sum(p.count for p in responses) == sum(SENT.values())


@pytest.mark.e2e
async def test_unfiltered_query_merges_every_model(store: PrometheusStore, traffic: Traffic) -> None:
    step = traffic.last_scrape
    [point] = await store.query(Query("response_time_ms", traffic.t0, step, step))
    assert point.count == sum(SENT.values())


@pytest.mark.e2e
async def test_gauge_reads_back_the_process_memory(store: PrometheusStore, traffic: Traffic) -> None:
    """A gauge: samples counted, min <= avg <= max, near what Iros reports right now."""
    rss = [v for n, _, v in traffic.truth if n == "iros_process_resident_memory_bytes"]
    assert rss, "Iros's /metrics has no iros_process_resident_memory_bytes"
    step = traffic.last_scrape
    [point] = await store.query(Query("process_memory_bytes", traffic.t0, step, step, quantiles=(0.5,)))
    assert point.count >= 1
    assert point.min is not None and point.max is not None and point.avg is not None
    assert point.min <= point.avg <= point.max
    assert point.min <= (point.quantiles[0.5] or 0) <= point.max
    assert 0.5 <= point.avg / sum(rss) <= 2.0


@pytest.mark.e2e
async def test_label_values_name_the_models_served(store: PrometheusStore, traffic: Traffic) -> None:
    models = await store.label_values("response_time_ms", "model", traffic.t0, time.time() + 1)
    assert set(SENT) <= set(models)


@pytest.mark.e2e
async def test_awkward_label_values_are_escaped(store: PrometheusStore, traffic: Traffic) -> None:
    """Quotes, backslashes and newlines reach Prometheus as one literal: no data, no syntax error."""
    odd = 'al"pha\\\n} or vector(1) #'
    query = Query("response_time_ms", traffic.t0, time.time(), 10, match=(("model", odd),))
    assert await store.query(query) == []


@pytest.mark.e2e
async def test_health_reports_the_version(store: PrometheusStore) -> None:
    health = await store.health()
    assert health["reachable"] is True and health["version"]


# ------------------------------------------------------------------------------------------ failures


async def test_prometheus_down_is_a_clear_store_unavailable() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = PrometheusStore(endpoint, timeout=2.0)
    began = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await store.query(Query("response_time_ms", 0, 600, 60))
    assert time.monotonic() - began < 1.5
    assert (
        str(info.value)
        == f"the history backend, Prometheus at {endpoint}, is unreachable: connection refused"
    )
    health = await store.health()
    assert health["reachable"] is False and "connection refused" in health["error"]
    await store.close()


async def test_silent_prometheus_times_out_on_time() -> None:
    """A socket that accepts and never answers: the store gives up after its timeout, not later."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        store = PrometheusStore(endpoint, timeout=0.4)
        await store.start()
        began = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await store.query(Query("response_time_ms", 0, 600, 60))
        elapsed = time.monotonic() - began
        await store.close()
    assert 0.3 <= elapsed < 1.5
    assert str(info.value) == f"the history backend, Prometheus at {endpoint}, did not answer within 0.4s"


@pytest.mark.e2e
async def test_a_server_that_is_not_prometheus_is_named(iros_server: IrosProcess) -> None:
    store = PrometheusStore(iros_server.url, timeout=2.0)
    with pytest.raises(StoreUnavailable) as info:
        await store.query(Query("response_time_ms", 0, 600, 60))
    await store.close()
    where = re.escape(f"the history backend, Prometheus at {iros_server.url},")
    assert re.search(rf"^{where} answered HTTP 4\d\d", str(info.value))
    assert "not a Prometheus API response" in str(info.value)


@pytest.mark.e2e
async def test_injected_session_is_used_and_left_open(prom: PrometheusServer) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        store = PrometheusStore(prom.url, session=session)
        assert (await store.health())["reachable"] is True
        await store.close()
        assert not session.closed


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (Query("no_such_metric", 0, 60, 60), "unknown metric 'no_such_metric'"),
        (Query("response_time_ms", 0, 60, 60, match=(("gpu", "0"),)), "has no label 'gpu'"),
        (Query("response_time_ms", 0, 60, 60, match=(("le", "1"),)), "has no label 'le'"),
        (Query("cpu_percent", 0, 60, 60, match=(("pid", "1"),)), "has no label 'pid'"),
        (Query("response_time_ms", 0, 60, 0), "step must be positive"),
        (Query("response_time_ms", 0, 60, -5), "step must be positive"),
        (Query("response_time_ms", 60, 60, 10), "must be after start"),
        (Query("response_time_ms", 0, 86400, 1), f"limit of {MAX_POINTS} points"),
        (Query("response_time_ms", 0, 60, 60, quantiles=(1.5,)), "outside 0..1"),
    ],
)
async def test_bad_queries_are_value_errors_before_any_io(query: Query, message: str) -> None:
    # Nothing listens there: a ValueError proves the check happens before the network.
    store = PrometheusStore(f"http://127.0.0.1:{free_port()}", timeout=1.0)
    with pytest.raises(ValueError, match=re.escape(message)):
        await store.query(query)
    await store.close()


async def test_label_values_refuse_unknown_metric_and_label() -> None:
    store = PrometheusStore(f"http://127.0.0.1:{free_port()}", timeout=1.0)
    with pytest.raises(ValueError, match="unknown metric"):
        await store.label_values("nope", "model", 0, 60)
    with pytest.raises(ValueError, match="has no label 'instance'"):
        await store.label_values("response_time_ms", "instance", 0, 60)
    await store.close()


# ------------------------------------------------------------------------------------------ PromQL


def test_promql_for_a_response_metric() -> None:
    q = promql("response_time_ms", (("model", "large"),), 60_000, (0.95,))

    def delta(name: str) -> str:
        x = f'iros_request_duration_seconds_{name}{{model="large"}}'
        return f"(({x} - {x} offset 60s) >= 0 or {x})"

    assert q.count == f"sum({delta('count')})"
    assert q.sum == f"sum({delta('sum')}) * 1000"
    buckets = f"sum by (le) ({delta('bucket')})"
    assert q.quantiles == {0.95: f"histogram_quantile(0.95, {buckets}) * 1000"}
    assert q.min is None and q.max is None


def test_promql_for_gauges_aggregates_per_the_table() -> None:
    q = promql("process_memory_bytes", (), 10_500, (0.5,))
    assert q.count == "max(count_over_time(iros_process_resident_memory_bytes[10500ms]))"
    assert q.sum == "sum(sum_over_time(iros_process_resident_memory_bytes[10500ms]))"
    assert q.max == "sum(max_over_time(iros_process_resident_memory_bytes[10500ms]))"
    lag = promql("event_loop_lag_ms", (), 60_000, ())
    assert lag.max == "max(max_over_time(iros_event_loop_lag_seconds[60s])) * 1000"
    gpu = promql("gpu_utilization_percent", (("gpu", "0"),), 60_000, (0.9,))
    assert gpu.quantiles[0.9] == 'avg(quantile_over_time(0.9, iros_gpu_utilization_percent{gpu="0"}[60s]))'


def test_every_catalog_gauge_has_an_aggregation() -> None:
    gauges = {d.prom for d in METRICS.values() if d.kind == "gauge"}
    assert gauges == set(GAUGE_AGGREGATION)


def test_escape_is_a_go_string_literal() -> None:
    assert escape('a"b\\c\nd\x01') == '"a\\"b\\\\c\\nd\\x01"'
    assert escape("ünï") == '"ünï"'


# ------------------------------------------------------------------------------------------ through Iros


@pytest.mark.e2e
def test_iros_reads_its_history_back_from_prometheus_and_says_when_it_is_down(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A keyed Iros, scraped with its admin key, answers /api/metrics/historical from Prometheus;
    with Prometheus gone the history API says so with a 503 and chat keeps working."""
    port = free_port()
    config = iros_config(tmp_path_factory.mktemp("keyed-data"), f"http://127.0.0.1:{port}")
    config["auth"] = {"api_keys": ["sk-client"], "admin_keys": ["sk-admin"]}
    admin, client = {"authorization": "Bearer sk-admin"}, {"authorization": "Bearer sk-client"}
    body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with IrosProcess.serve(config) as iros:
        prom = PrometheusServer([iros.url], port=port, scrape_interval="1s", bearer_token="sk-admin")
        with prom:
            prom.wait_for_targets_up()
            start = time.time() - 5
            for _ in range(7):
                resp = httpx.post(f"{iros.url}/v1/chat/completions", json=body, headers=client, timeout=10)
                assert resp.status_code == 200

            def history() -> dict[str, Any]:
                params = {"metric": "response_time", "start": str(start), "step": "2s", "model": "alpha"}
                resp = httpx.get(f"{iros.url}/api/metrics/historical", params=params, headers=admin)
                assert resp.status_code == 200, resp.text
                data: dict[str, Any] = resp.json()
                return data

            wait_until(
                lambda: sum(p["count"] for p in history()["series"]["response_time_ms"]["points"]) == 7,
                "Iros's history API to see every response through Prometheus",
            )
            assert history()["source"] == "prometheus"
        down = httpx.get(f"{iros.url}/api/metrics/historical", headers=admin, timeout=10)
        assert down.status_code == 503
        assert f"Prometheus at http://127.0.0.1:{port}" in down.json()["error"]["message"]
        assert httpx.post(f"{iros.url}/v1/chat/completions", json=body, headers=client).status_code == 200
