"""`iros bench cache-quality | cache-latency | workload`: what the response cache gets right, how fast it
answers, and what it does for a realistic stream of questions through the whole gateway.

    pairs = read_pairs(Path("../shared/data/qqp/dev.jsonl.gz"), limit=5000)
    run_cache_quality(pairs)     # precision and recall of semantic hits, verifier on vs plain cosine
    run_cache_latency(pairs)     # exact and semantic hit latency; semantic lookups/s under concurrency
    run_workload(pairs)          # hit rate, false hits and response time of `iros serve`, cache on vs off

The first two drive the real ResponseCache in-process (build_cache on the default settings); the third
runs real `iros serve` children on simulated models and measures them over HTTP.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import orjson

from iros.cache import Plan, ResponseCache, build_cache
from iros.config import load_settings
from iros.embedder import default_threads
from iros.schema import parse_request
from iros.types import Embedder

# (description, completed, total): called as the bench moves on, e.g. to drive a progress bar.
ProgressFn = Callable[[str, float, float], None]

DEFAULT_PAIRS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "qqp" / "dev.jsonl.gz"
MODEL = "bench"
PRINCIPAL = "bench"
CHUNK = 64  # lookups in flight at once: one embedder batch (EmbedderSettings.max_batch)
SEMANTIC_READY_TIMEOUT = 180.0  # seconds for the embedding model to load on a busy machine

TARGET_PRECISION = 0.90
TARGET_RECALL = 0.30
TARGET_EXACT_P50_MS = 1.0
TARGET_SEMANTIC_P50_MS = 20.0
TARGET_HIT_RATE = 0.70
TARGET_FALSE_HIT_RATE = 0.01
TARGET_IMPROVEMENT = 0.60

# The workload: a support-desk style stream where a few questions are asked again and again.
SHARES = {"exact": 0.65, "paraphrase": 0.25, "one_off": 0.10}
ZIPF_S = 1.0  # popularity of the k-th base question ∝ 1 / k**s
REQUESTS_PER_BASE = 10  # base questions = requests // this
MAX_PHRASINGS = 8  # base questions are groups of at most this many duplicate texts


@dataclass(frozen=True, slots=True)
class Pair:
    a: str
    b: str
    label: int


def read_pairs(path: Path, limit: int | None = None, offset: int = 0) -> list[Pair]:
    """JSON lines of {"a", "b", "label"}, gzipped or not: `limit` of them after skipping `offset`."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    pairs: list[Pair] = []
    with opener(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(pairs) >= limit:
                break
            if number <= offset or not line.strip():
                continue
            try:
                row = orjson.loads(line)
                pairs.append(Pair(str(row["a"]), str(row["b"]), int(row["label"])))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: expected {{'a', 'b', 'label'}}: {exc}") from None
    return pairs


def _quiet(description: str, done: float, total: float) -> None:
    return None


def _ms(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50": None, "p99": None}
    p50, p99 = np.percentile(np.asarray(values), [50, 99])
    return {"n": len(values), "p50": round(float(p50), 3), "p99": round(float(p99), 3)}


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def _request_body(text: str, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0}


def _plan(cache: ResponseCache, text: str) -> Plan:
    plan = cache.plan(parse_request(orjson.dumps(_request_body(text))), PRINCIPAL, None)
    if plan is None:
        raise RuntimeError("the cache declined a plain temperature-0 question: is it disabled?")
    return plan


def _answer(index: int) -> dict[str, Any]:
    # Naming the pair says which entry answered when reading a stored body by hand.
    return {
        "id": f"chatcmpl-bench-{index}",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"answer to pair {index}"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


async def _start_cache(data_dir: Path, progress: ProgressFn, embedder: Embedder | None) -> ResponseCache:
    """The cache as `iros serve` builds it on the default settings, once its semantic half is up.

    `embedder` replaces the one built from the settings (tests share one loaded model this way).
    """
    settings = load_settings(None, {"server": {"data_dir": str(data_dir)}})
    cache = build_cache(settings.cache, data_dir)
    if embedder is not None:
        cache.embedder = embedder
    await cache.start()
    progress("loading the embedding model", 0, 1)
    deadline = time.monotonic() + SEMANTIC_READY_TIMEOUT
    while not cache.semantic_ready:
        # The loader logs why it failed and stops; waiting longer would not help.
        loader = cache._loader
        if loader is None or loader.done() or time.monotonic() > deadline:
            await cache.close()
            raise RuntimeError("the semantic cache did not come up (see the log for the embedder's error)")
        await asyncio.sleep(0.05)
    progress("loading the embedding model", 1, 1)
    return cache


async def _insert(cache: ResponseCache, plans: list[tuple[int, Plan]], progress: ProgressFn) -> None:
    # Concurrent saves let the embedder batch them: one model call per chunk instead of one per text.
    for start in range(0, len(plans), CHUNK):
        batch = plans[start : start + CHUNK]
        await asyncio.gather(*(cache.store_now(plan, _answer(i), 0.0, MODEL) for i, plan in batch))
        progress("inserting", start + len(batch), len(plans))


class _Memo:
    """Wraps the cache's embedder: records query vectors on one pass and replays them on the next, so
    the plain-cosine pass sees the very same vectors without paying for the embedding twice."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.replay = False
        self.vectors: dict[str, npt.NDArray[np.float32]] = {}

    async def start(self) -> None:
        await self.inner.start()

    async def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        if self.replay and all(t in self.vectors for t in texts):
            return np.stack([self.vectors[t] for t in texts])
        out = await self.inner.embed(texts)
        for text, row in zip(texts, out, strict=True):
            self.vectors[text] = row
        return out

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass(slots=True)
class _Tally:
    true_hits: int = 0
    false_hits: int = 0
    false_on_negatives: int = 0  # a label-0 pair's query served any answer
    false_wrong_entry: int = 0  # a label-1 pair's query served another question's answer
    misses: int = 0
    exact_hits: int = 0
    exact_duplicates: int = 0  # exact hits of label-1 pairs


async def _lookups(
    cache: ResponseCache, pairs: list[Pair], own: dict[str, str], progress: ProgressFn, label: str
) -> tuple[_Tally, list[float]]:
    tally = _Tally()
    latencies: list[float] = []

    async def one(pair: Pair) -> None:
        plan = _plan(cache, pair.b)
        started = time.perf_counter()
        hit = await cache.lookup(plan)
        latencies.append((time.perf_counter() - started) * 1000)
        if hit is None:
            tally.misses += 1
        elif hit.kind == "hit":
            # The very text was stored (as some pair's `a`): the exact cache serves that question's own
            # answer. Right by construction and no test of the semantic cache, so counted apart.
            tally.exact_hits += 1
            tally.exact_duplicates += pair.label == 1
        elif pair.label == 1 and hit.entry.key == own[pair.a]:
            tally.true_hits += 1
        else:
            tally.false_hits += 1
            if pair.label == 1:
                tally.false_wrong_entry += 1
            else:
                tally.false_on_negatives += 1

    # Shortest first: texts of similar length pad little in the model's batches (twice the speed).
    ordered = sorted(pairs, key=lambda p: len(p.b))
    for start in range(0, len(ordered), CHUNK):
        batch = ordered[start : start + CHUNK]
        await asyncio.gather(*(one(p) for p in batch))
        progress(label, start + len(batch), len(ordered))
    return tally, latencies


def _figures(tally: _Tally, pairs: list[Pair]) -> dict[str, Any]:
    """Semantic figures over the queries the exact cache did not answer."""
    queries = len(pairs) - tally.exact_hits
    positives = sum(p.label == 1 for p in pairs) - tally.exact_duplicates
    hits = tally.true_hits + tally.false_hits
    return {
        "queries": queries,
        "true_hits": tally.true_hits,
        "false_hits": tally.false_hits,
        "false_hits_on_non_duplicates": tally.false_on_negatives,
        "false_hits_on_another_entry": tally.false_wrong_entry,
        "misses": tally.misses,
        "precision": _ratio(tally.true_hits, hits),
        "recall": _ratio(tally.true_hits, positives),
        "false_hit_rate": _ratio(tally.false_hits, queries),
    }


async def cache_quality(
    pairs: list[Pair],
    data_dir: Path,
    progress: ProgressFn | None = None,
    *,
    sample: int = 200,
    embedder: Embedder | None = None,
) -> dict[str, Any]:
    """Insert every `a`, query every `b`: with the verifier (as served), then with plain cosine."""
    report = progress or _quiet
    if not pairs:
        raise ValueError("no pairs to measure")
    cache = await _start_cache(data_dir, report, embedder)
    verifier_setting = cache.settings.verifier
    try:
        # One entry per distinct `a`: a query's own entry is the entry of its pair's `a` text.
        own: dict[str, str] = {}
        plans: list[tuple[int, Plan]] = []
        for i, pair in enumerate(pairs):
            if pair.a not in own:
                plan = _plan(cache, pair.a)
                own[pair.a] = plan.key
                plans.append((i, plan))
        plans.sort(key=lambda entry: len(entry[1].prompt or ""))  # similar lengths batch faster
        await _insert(cache, plans, report)

        inner = cache.embedder
        assert inner is not None
        memo = _Memo(inner)
        cache.embedder = memo
        try:
            verified, batched = await _lookups(cache, pairs, own, report, "lookups with the verifier")
            memo.replay = True
            cache.settings.verifier = False
            cosine, replayed = await _lookups(cache, pairs, own, report, "lookups by plain cosine")
        finally:
            cache.embedder = inner
            cache.settings.verifier = verifier_setting
        memo.vectors.clear()

        # What one lone lookup costs, embedding included, with nothing to batch it with.
        single: list[float] = []
        for pair in pairs[:sample]:
            plan = _plan(cache, pair.b)
            started = time.perf_counter()
            await cache.lookup(plan)
            single.append((time.perf_counter() - started) * 1000)
            report("single lookups", len(single), min(sample, len(pairs)))

        with_verifier = _figures(verified, pairs)
        plain = _figures(cosine, pairs)
        return {
            "pairs": len(pairs),
            "duplicates": sum(p.label == 1 for p in pairs),
            "entries": len(plans),
            # Queries whose text some pair stored verbatim; kept out of the figures below.
            "exact_hits": verified.exact_hits,
            "exact_hits_of_duplicates": verified.exact_duplicates,
            "threshold": cache.threshold,
            "verifier": verifier_setting and cache.verifier is not None,
            **with_verifier,
            "lookup_ms": _ms(single),
            "lookup_ms_batched": {**_ms(batched), "concurrency": CHUNK},
            "plain_cosine": {
                **plain,
                # Query vectors are replayed from the first pass: search and bookkeeping only.
                "lookup_ms_without_embedding": {**_ms(replayed), "concurrency": CHUNK},
            },
            "targets": {"precision": TARGET_PRECISION, "recall": TARGET_RECALL},
            "met": {
                "precision": (with_verifier["precision"] or 0.0) >= TARGET_PRECISION,
                "recall": (with_verifier["recall"] or 0.0) >= TARGET_RECALL,
            },
        }
    finally:
        await cache.close()


def run_cache_quality(pairs: list[Pair], progress: ProgressFn | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="iros-bench-cache-") as tmp:
        return asyncio.run(cache_quality(pairs, Path(tmp), progress))


async def cache_latency(
    pairs: list[Pair],
    data_dir: Path,
    *,
    entries: int = 1000,
    exact_lookups: int = 2000,
    levels: tuple[int, ...] = (1, 8, 32),
    duration: float = 3.0,
    progress: ProgressFn | None = None,
    embedder: Embedder | None = None,
) -> dict[str, Any]:
    """Exact and semantic hit latency one at a time, then semantic lookups/s at each concurrency."""
    report = progress or _quiet
    # Paraphrase pairs: the `a` is stored, the `b` asked; b == a would be an exact hit.
    chosen = [p for p in pairs if p.label == 1 and p.a != p.b][:entries]
    if not chosen:
        raise ValueError("no duplicate (label 1) pairs with distinct texts to measure")
    cache = await _start_cache(data_dir, report, embedder)
    try:
        stored = {p.a: _plan(cache, p.a) for p in chosen}
        await _insert(cache, list(enumerate(stored.values())), report)

        exact: list[float] = []
        keys = list(stored.values())
        for i in range(exact_lookups):
            started = time.perf_counter()
            hit = await cache.lookup(keys[i % len(keys)])
            exact.append((time.perf_counter() - started) * 1000)
            if hit is None or hit.kind != "hit":
                raise RuntimeError("a stored exact key was not an exact hit")
            if i % 200 == 0:
                report("exact lookups", i, exact_lookups)

        queries = [p.b for p in chosen if p.b not in stored]
        semantic_hit: list[float] = []
        semantic_miss: list[float] = []
        for i, text in enumerate(queries):
            plan = _plan(cache, text)
            started = time.perf_counter()
            hit = await cache.lookup(plan)
            elapsed = (time.perf_counter() - started) * 1000
            served = hit is not None and hit.kind == "semantic_hit"
            (semantic_hit if served else semantic_miss).append(elapsed)
            report("semantic lookups", i + 1, len(queries))

        model: Any = cache.embedder
        throughput: list[dict[str, Any]] = []
        for level in levels:
            report(f"concurrency {level}", 0, 1)
            batches = int(getattr(model, "batches", 0))
            done, elapsed = await _saturate(cache, queries, level, duration)
            calls = int(getattr(model, "batches", 0)) - batches
            throughput.append(
                {
                    "concurrency": level,
                    "lookups": done,
                    "lookups_per_s": round(done / elapsed, 1),
                    "mean_batch": round(done / calls, 2) if calls else None,
                }
            )
            report(f"concurrency {level}", 1, 1)
        base = throughput[0]["lookups_per_s"] if throughput else 0.0
        for row in throughput:
            row["speedup"] = round(row["lookups_per_s"] / base, 2) if base else None

        exact_ms, semantic_ms = _ms(exact), _ms(semantic_hit)
        return {
            "entries": len(stored),
            "exact_hit_ms": exact_ms,
            "semantic_hit_ms": semantic_ms,
            "semantic_miss_ms": _ms(semantic_miss),
            "throughput": throughput,
            "embedder": {
                "name": getattr(model, "name", None),
                "device": getattr(model, "device", None),
                # The local model's own setting, else what it defaults to: half the cores.
                "threads": getattr(model, "threads", None) or default_threads(),
            },
            "targets": {
                "exact_hit_p50_ms": TARGET_EXACT_P50_MS,
                "semantic_hit_p50_ms": TARGET_SEMANTIC_P50_MS,
            },
            "met": {
                "exact_hit_p50_ms": exact_ms["p50"] is not None and exact_ms["p50"] < TARGET_EXACT_P50_MS,
                "semantic_hit_p50_ms": semantic_ms["p50"] is not None
                and semantic_ms["p50"] < TARGET_SEMANTIC_P50_MS,
            },
        }
    finally:
        await cache.close()


async def _saturate(cache: ResponseCache, texts: list[str], level: int, duration: float) -> tuple[int, float]:
    """Semantic lookups by `level` concurrent callers for `duration` seconds: (lookups, seconds)."""
    plans = [_plan(cache, t) for t in texts]
    done = 0
    started = time.perf_counter()
    deadline = started + duration

    async def caller(first: int) -> None:
        nonlocal done
        i = first
        while time.perf_counter() < deadline:
            await cache.lookup(plans[i % len(plans)])
            i += level
            done += 1

    await asyncio.gather(*(caller(c) for c in range(level)))
    return done, time.perf_counter() - started


def run_cache_latency(pairs: list[Pair], progress: ProgressFn | None = None, **kw: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="iros-bench-cache-") as tmp:
        return asyncio.run(cache_latency(pairs, Path(tmp), progress=progress, **kw))


# --- workload ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ask:
    text: str
    group: int  # the base question it asks; one-offs have a group of their own (negative)
    kind: str  # "exact", "paraphrase" or "one_off"


def _phrasings(pairs: list[Pair]) -> list[list[str]]:
    """Groups of texts that ask the same thing (joined by label-1 pairs), each led by an `a` text."""
    parent: dict[str, str] = {}

    def root(text: str) -> str:
        while parent.setdefault(text, text) != text:
            parent[text] = parent[parent[text]]
            text = parent[text]
        return text

    leads: list[str] = []
    for p in pairs:
        if p.label == 1 and p.a != p.b:
            if p.a not in parent:
                leads.append(p.a)
            parent[root(p.b)] = root(p.a)
    groups: dict[str, list[str]] = {}
    for text in leads:
        groups.setdefault(root(text), []).append(text)
    for text in parent:
        group = groups[root(text)]
        if text not in group:
            group.append(text)
    return list(groups.values())


def build_stream(pairs: list[Pair], requests: int, seed: int = 7) -> tuple[list[Ask], int]:
    """`requests` questions: Zipf-popular base questions asked verbatim or paraphrased, and one-offs.

    A base question is a group of duplicate texts from the pairs; its first text is the verbatim one,
    the others its paraphrases. Returns the stream and the number of base questions.
    """
    rng = random.Random(seed)
    wanted = max(1, requests // REQUESTS_PER_BASE)
    # Large groups are chains of loose duplicates: left out. Popular questions gather more phrasings,
    # so the most phrased groups are the most popular.
    groups = [g for g in _phrasings(pairs) if len(g) <= MAX_PHRASINGS]
    rng.shuffle(groups)
    bases = sorted(groups, key=len, reverse=True)[:wanted]
    if not bases:
        raise ValueError("the pairs hold no duplicate (label 1) pairs to take base questions from")
    used = {text for group in groups for text in group}
    one_offs = []
    for p in pairs:
        for text in (p.a, p.b) if p.label == 0 else ():
            if text not in used:
                used.add(text)
                one_offs.append(text)
    rng.shuffle(one_offs)
    weights = list(itertools.accumulate(1 / (k + 1) ** ZIPF_S for k in range(len(bases))))
    stream: list[Ask] = []
    for _ in range(requests):
        roll = rng.random()
        if roll < SHARES["one_off"] and one_offs:
            stream.append(Ask(one_offs.pop(), -1 - len(stream), "one_off"))
            continue
        group = rng.choices(range(len(bases)), cum_weights=weights)[0]
        if roll < SHARES["one_off"] + SHARES["paraphrase"]:
            stream.append(Ask(rng.choice(bases[group][1:]), group, "paraphrase"))
        else:
            stream.append(Ask(bases[group][0], group, "exact"))
    return stream, len(bases)


def _ceilings(stream: list[Ask]) -> dict[str, float | None]:
    """Hit rates an ideal cache would reach: repeating a text (exact), or a base question (semantic)."""
    texts: set[str] = set()
    groups: set[int] = set()
    exact = semantic = 0
    for ask in stream:
        exact += ask.text in texts
        semantic += ask.group in groups
        texts.add(ask.text)
        groups.add(ask.group)
    return {"exact_only": _ratio(exact, len(stream)), "ideal": _ratio(semantic, len(stream))}


@dataclass(slots=True)
class _Reply:
    status: int
    cache: str
    content: str | None
    ms: float


async def _drive(
    url: str, stream: list[Ask], concurrency: int, progress: ProgressFn, label: str
) -> list[_Reply]:
    replies: list[_Reply | None] = [None] * len(stream)
    next_index = completed = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal next_index, completed
            while next_index < len(stream):
                i = next_index
                next_index += 1
                body = orjson.dumps(_request_body(stream[i].text, "chat"))
                started = time.perf_counter()
                async with session.post(
                    f"{url}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
                ) as response:
                    raw = await response.read()
                ms = (time.perf_counter() - started) * 1000
                content = None
                if response.status == 200:
                    content = orjson.loads(raw)["choices"][0]["message"]["content"]
                replies[i] = _Reply(response.status, response.headers.get("x-iros-cache", ""), content, ms)
                completed += 1
                progress(label, completed, len(stream))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in replies if r is not None]


async def _wait_semantic(url: str) -> dict[str, Any]:
    deadline = time.monotonic() + SEMANTIC_READY_TIMEOUT
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{url}/api/optimization/cache") as response:
                stats: dict[str, Any] = await response.json() if response.status == 200 else {}
            if stats.get("semantic_ready"):
                return stats
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: no semantic cache after {SEMANTIC_READY_TIMEOUT:g} s")
            await asyncio.sleep(0.2)


async def _cache_stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/api/optimization/cache") as response:
        stats: dict[str, Any] = await response.json()
        return stats


def _serve(cache: dict[str, Any], profile: str, data_dir: Path) -> Any:
    from iros.testing import IrosProcess

    config = {
        "auth": {"open": True},
        "server": {"data_dir": str(data_dir), "log_level": "warning"},
        "models": [{"name": "chat", "backend": "simulated", "profile": profile}],
        "cache": cache,
    }
    return IrosProcess.serve(config)


def _timing(replies: list[_Reply]) -> dict[str, Any]:
    ms = np.asarray([r.ms for r in replies])
    return {
        "mean_ms": round(float(ms.mean()), 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
    }


def run_workload(
    pairs: list[Pair],
    *,
    requests: int = 2000,
    concurrency: int = 16,
    profile: str = "lightweight",
    seed: int = 7,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """The same stream through `iros serve` with the cache on (exact + semantic) and off."""
    report = progress or _quiet
    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must each be 1 or more")
    stream, bases = build_stream(pairs, requests, seed)
    with tempfile.TemporaryDirectory(prefix="iros-bench-workload-") as tmp:
        on_dir, off_dir = Path(tmp) / "cached", Path(tmp) / "uncached"
        server = _serve({"enabled": True, "semantic": True}, profile, on_dir).start(timeout=60)
        try:
            report("loading the embedding model", 0, 1)
            asyncio.run(_wait_semantic(server.url))
            optimized = asyncio.run(_drive(server.url, stream, concurrency, report, "cache on"))
            stats = asyncio.run(_cache_stats(server.url))
        finally:
            server.stop()
        server = _serve({"enabled": False}, profile, off_dir).start(timeout=60)
        try:
            baseline = asyncio.run(_drive(server.url, stream, concurrency, report, "cache off"))
        finally:
            server.stop()

    # Whose answer is whose: the simulated model's text is fixed by the prompt, so the answer a miss
    # brought back belongs to the question that was asked.
    owners: dict[str, set[int]] = {}
    for ask, reply in zip(stream, optimized, strict=True):
        if reply.cache == "miss" and reply.content is not None:
            owners.setdefault(reply.content, set()).add(ask.group)
    kinds: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {kind: Counter() for kind in SHARES}
    false_hits: Counter[str] = Counter()
    for ask, reply in zip(stream, optimized, strict=True):
        kinds[reply.cache] += 1
        by_kind[ask.kind][reply.cache] += 1
        # An answer no miss brought back (e.g. its miss failed) cannot be vouched for: counted false.
        if reply.cache in ("hit", "semantic_hit") and ask.group not in owners.get(reply.content or "", ()):
            false_hits[reply.cache] += 1
    hits = kinds["hit"] + kinds["semantic_hit"]
    on, off = _timing(optimized), _timing(baseline)
    hit_rate = _ratio(hits, len(stream)) or 0.0
    false_rate = _ratio(sum(false_hits.values()), len(stream)) or 0.0
    improvement = round(1 - on["mean_ms"] / off["mean_ms"], 4) if off["mean_ms"] else 0.0
    return {
        "requests": len(stream),
        "concurrency": concurrency,
        "profile": profile,
        "seed": seed,
        "base_questions": bases,
        "zipf_s": ZIPF_S,
        "shares": SHARES,
        "stream": dict(Counter(a.kind for a in stream)),
        "ceilings": _ceilings(stream),
        "hits": {"exact": kinds["hit"], "semantic": kinds["semantic_hit"], "miss": kinds["miss"]},
        "by_kind": {kind: dict(counts) for kind, counts in by_kind.items()},
        "errors": {
            "cache_on": sum(r.status != 200 for r in optimized),
            "cache_off": sum(r.status != 200 for r in baseline),
        },
        "hit_rate": hit_rate,
        "false_hits": dict(false_hits),
        "false_hit_rate": false_rate,
        "false_share_of_hits": _ratio(sum(false_hits.values()), hits),
        "cache_on": on,
        "cache_off": off,
        "mean_improvement": improvement,
        "p95_improvement": round(1 - on["p95_ms"] / off["p95_ms"], 4) if off["p95_ms"] else 0.0,
        "server_cache_stats": {
            k: stats.get(k) for k in ("verifier", "similarity_threshold", "verifier_rejections", "indexed")
        },
        "targets": {
            "hit_rate": TARGET_HIT_RATE,
            "false_hit_rate": TARGET_FALSE_HIT_RATE,
            "mean_improvement": TARGET_IMPROVEMENT,
        },
        "met": {
            "hit_rate": hit_rate >= TARGET_HIT_RATE,
            "false_hit_rate": false_rate <= TARGET_FALSE_HIT_RATE,
            "mean_improvement": improvement >= TARGET_IMPROVEMENT,
        },
    }
