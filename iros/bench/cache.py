"""`iros bench cache-quality | cache-latency`: what the response cache gets right, and how fast it
answers.

    pairs = read_pairs(Path("../shared/data/qqp/dev.jsonl.gz"), limit=5000)
    run_cache_quality(pairs)     # precision and recall of semantic hits, verifier on vs plain cosine
    run_cache_latency(pairs)     # exact and semantic hit latency; semantic lookups/s under concurrency

Both drive the real ResponseCache in-process (build_cache on the default settings); `iros bench workload`
(workload.py) runs real `iros serve` children and measures them over HTTP.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from iros.bench.pairs import MODEL, SEMANTIC_READY_TIMEOUT, Pair, ProgressFn, quiet, ratio, request_body
from iros.cache.base import Embedder
from iros.cache.embedder import Encoded, WrappedEmbedder, default_threads
from iros.cache.engine import ResponseCache, build_cache
from iros.cache.plan import Plan
from iros.config import load_settings
from iros.core.schema import parse_request

PRINCIPAL = "bench"
CHUNK = 64  # lookups in flight at once: one embedder batch (EmbedderSettings.max_batch)

TARGET_PRECISION = 0.90
TARGET_RECALL = 0.30
TARGET_EXACT_P50_MS = 1.0
TARGET_SEMANTIC_P50_MS = 20.0
TARGET_MISS_P50_MS = 2.0  # what a miss adds (issue 17): its lookup, which a cache-off request skips


def _ms(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50": None, "p99": None}
    p50, p99 = np.percentile(np.asarray(values), [50, 99])
    return {"n": len(values), "p50": round(float(p50), 3), "p99": round(float(p99), 3)}


def _plan(cache: ResponseCache, text: str) -> Plan:
    plan = cache.plan(parse_request(orjson.dumps(request_body(text))), PRINCIPAL, None)
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
    if not await cache.semantic_started(SEMANTIC_READY_TIMEOUT):
        await cache.close()
        raise RuntimeError("the semantic cache did not come up (see the log for the embedder's error)")
    progress("loading the embedding model", 1, 1)
    return cache


async def _insert(cache: ResponseCache, plans: list[tuple[int, Plan]], progress: ProgressFn) -> None:
    # Concurrent saves let the embedder batch them: one model call per chunk instead of one per text.
    for start in range(0, len(plans), CHUNK):
        batch = plans[start : start + CHUNK]
        await asyncio.gather(*(cache.store_now(plan, _answer(i), 0.0, MODEL) for i, plan in batch))
        progress("inserting", start + len(batch), len(plans))


class _Memo(WrappedEmbedder):
    """Wraps the cache's embedder: records query vectors on one pass and replays them on the next, so
    the plain-cosine pass sees the very same vectors without paying for the embedding twice."""

    def __init__(self, inner: Embedder) -> None:
        super().__init__(inner)
        self.replay = False
        self.vectors: dict[str, npt.NDArray[np.float32]] = {}

    async def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        if self.replay and all(t in self.vectors for t in texts):
            return np.stack([self.vectors[t] for t in texts])
        out = await self.inner.embed(texts)
        for text, row in zip(texts, out, strict=True):
            self.vectors[text] = row
        return out

    async def embed_tokens(self, texts: list[str]) -> Encoded:
        # The verifier's pass: vectors recorded, token embeddings passed through (plain cosine needs none).
        inner = getattr(self.inner, "embed_tokens", None)
        if inner is None:
            return Encoded(await self.embed(texts))
        out: Encoded = await inner(texts)
        for text, row in zip(texts, out.vectors, strict=True):
            self.vectors[text] = row
        return out


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
        "precision": ratio(tally.true_hits, hits),
        "recall": ratio(tally.true_hits, positives),
        "false_hit_rate": ratio(tally.false_hits, queries),
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
    report = progress or quiet
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
            # The rule served: the best of this many neighbours above the threshold, if over the cut.
            "neighbours": getattr(cache.verifier, "neighbours", 1),
            "verifier_cut": getattr(cache.verifier, "threshold", None),
            "token_alignment": getattr(cache.verifier, "tokens", None) is not None,
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
    levels: tuple[int, ...] = (1, 8, 32, 64),
    duration: float = 3.0,
    progress: ProgressFn | None = None,
    embedder: Embedder | None = None,
) -> dict[str, Any]:
    """Exact and semantic hit latency one at a time, then semantic lookups/s at each concurrency (with
    how many were skipped because the embedder was behind)."""
    report = progress or quiet
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
            skipped = cache.counts["skipped"]
            done, elapsed = await _saturate(cache, queries, level, duration)
            calls = int(getattr(model, "batches", 0)) - batches
            skipped = cache.counts["skipped"] - skipped
            throughput.append(
                {
                    "concurrency": level,
                    "lookups": done,
                    "lookups_per_s": round(done / elapsed, 1),
                    # Served as misses at once: the embedder was behind.
                    "skipped": skipped,
                    "embedded_per_s": round((done - skipped) / elapsed, 1),
                    "mean_batch": round((done - skipped) / calls, 2) if calls else None,
                }
            )
            report(f"concurrency {level}", 1, 1)
        base = throughput[0]["lookups_per_s"] if throughput else 0.0
        for row in throughput:
            row["speedup"] = round(row["lookups_per_s"] / base, 2) if base else None

        exact_ms, semantic_ms, miss_ms = _ms(exact), _ms(semantic_hit), _ms(semantic_miss)
        return {
            "entries": len(stored),
            "exact_hit_ms": exact_ms,
            "semantic_hit_ms": semantic_ms,
            "semantic_miss_ms": miss_ms,
            "throughput": throughput,
            "embedder": {
                "name": getattr(model, "name", None),
                "runtime": getattr(model, "runtime", None),
                "device": getattr(model, "device", None),
                # The local model's own setting, else what it defaults to: half the cores.
                "threads": getattr(model, "threads", None) or default_threads(),
            },
            "targets": {
                "exact_hit_p50_ms": TARGET_EXACT_P50_MS,
                "semantic_hit_p50_ms": TARGET_SEMANTIC_P50_MS,
                "semantic_miss_p50_ms": TARGET_MISS_P50_MS,
            },
            "met": {
                "exact_hit_p50_ms": exact_ms["p50"] is not None and exact_ms["p50"] < TARGET_EXACT_P50_MS,
                "semantic_hit_p50_ms": semantic_ms["p50"] is not None
                and semantic_ms["p50"] < TARGET_SEMANTIC_P50_MS,
                "semantic_miss_p50_ms": miss_ms["p50"] is not None and miss_ms["p50"] <= TARGET_MISS_P50_MS,
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
            # A skipped lookup never waits: yield as a request does on its I/O, or the callers would
            # starve the loop and the model's finished batch would never be taken in.
            await asyncio.sleep(0)

    await asyncio.gather(*(caller(c) for c in range(level)))
    return done, time.perf_counter() - started


def run_cache_latency(pairs: list[Pair], progress: ProgressFn | None = None, **kw: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="iros-bench-cache-") as tmp:
        return asyncio.run(cache_latency(pairs, Path(tmp), progress=progress, **kw))
