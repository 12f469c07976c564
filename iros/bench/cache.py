"""`iros bench cache-quality | cache-latency`: what the response cache gets right, and how fast it
answers.

    pairs = read_pairs(Path("../shared/data/qqp/dev.jsonl.gz"), limit=5000)
    run_cache_quality({"qqp": pairs})   # per domain: precision, recall, false hits, best fixed threshold
    run_cache_latency(pairs)     # exact and semantic hit latency; semantic lookups/s under concurrency

Both drive the real ResponseCache in-process (build_cache on the default settings); `iros bench workload`
(workload.py) runs real `iros serve` children and measures them over HTTP.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from iros.bench.pairs import (
    MODEL,
    SEMANTIC_READY_TIMEOUT,
    Pair,
    ProgressFn,
    best_fixed_threshold,
    label_groups,
    quiet,
    ratio,
    request_body,
)
from iros.cache.base import Embedder, EmbedderBusy
from iros.cache.build import build_cache
from iros.cache.embedder import default_threads
from iros.cache.engine import ResponseCache
from iros.cache.plan import Plan
from iros.config import load_settings
from iros.core.schema import parse_request

PRINCIPAL = "bench"
CHUNK = 64  # lookups in flight at once: one embedder batch (EmbedderSettings.max_batch)

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


async def _start_cache(
    data_dir: Path, progress: ProgressFn, embedder: Embedder | None, cache: dict[str, Any] | None = None
) -> ResponseCache:
    """The cache as `iros serve` builds it on the default settings (`cache` overrides some), once its
    semantic half is up.

    `embedder` replaces the one built from the settings (tests share one loaded model this way).
    """
    settings = load_settings(None, {"server": {"data_dir": str(data_dir)}, "cache": cache or {}})
    built = build_cache(settings.cache, data_dir)
    if embedder is not None:
        built.embedder = embedder
    await built.start()
    progress("loading the embedding model", 0, 1)
    if not await built.semantic_started(SEMANTIC_READY_TIMEOUT):
        await built.close()
        raise RuntimeError("the semantic cache did not come up (see the log for the embedder's error)")
    progress("loading the embedding model", 1, 1)
    return built


async def _insert(cache: ResponseCache, plans: list[tuple[int, Plan]], progress: ProgressFn) -> None:
    # Concurrent saves let the embedder batch them: one model call per chunk instead of one per text.
    for start in range(0, len(plans), CHUNK):
        batch = plans[start : start + CHUNK]
        await asyncio.gather(*(cache.store_now(plan, _answer(i), 0.0, MODEL) for i, plan in batch))
        progress("inserting", start + len(batch), len(plans))


async def _domain_quality(
    cache: ResponseCache, pairs: list[Pair], report: ProgressFn, label: str
) -> dict[str, Any]:
    """One domain under the label-graph protocol: cache every distinct `a`, ask every distinct `b` that
    is not an `a`; a hit is right iff the labels join the question and the entry served."""
    groups = label_groups(pairs)
    strict = label_groups(pairs, strict=True)
    stored = list(dict.fromkeys(p.a for p in pairs))
    stored_set = set(stored)
    queries = [b for b in dict.fromkeys(p.b for p in pairs) if b not in stored_set]
    if not queries:
        raise ValueError(f"{label}: no `b` that is not also an `a`: nothing to ask")
    plans = sorted(
        ((i, _plan(cache, text)) for i, text in enumerate(stored)), key=lambda e: len(stored[e[0]])
    )
    await _insert(cache, plans, lambda _, done, total: report(f"{label}: inserting", done, total))
    cached_groups = {groups[t] for t in stored}
    answerable = sum(groups[q] in cached_groups for q in queries)
    right = wrong = wrong_strict = 0
    latencies: list[float] = []
    skipped_before = cache.counts["skipped"]

    async def one(text: str) -> None:
        nonlocal right, wrong, wrong_strict
        started = time.perf_counter()
        hit = await cache.lookup(_plan(cache, text))
        latencies.append((time.perf_counter() - started) * 1000)
        if hit is not None:
            if groups.get(hit.entry.prompt) == groups[text]:
                right += 1
            else:
                wrong += 1
            wrong_strict += strict.get(hit.entry.prompt) != strict[text]

    ordered = sorted(queries, key=len)  # similar lengths pad little in the model's batches
    for start in range(0, len(ordered), CHUNK):
        await asyncio.gather(*(one(t) for t in ordered[start : start + CHUNK]))
        report(f"{label}: asking", start + CHUNK, len(ordered))
    hits = right + wrong
    skipped = cache.counts["skipped"] - skipped_before
    precision = right / hits if hits else None
    # The baseline: each question's nearest stored text by cosine, one threshold for all.
    assert cache.embedder is not None
    vectors = {}
    for start in range(0, len(stored) + len(queries), CHUNK):
        batch = (stored + queries)[start : start + CHUNK]
        for text, row in zip(batch, await _embed_patiently(cache.embedder, batch), strict=True):
            vectors[text] = row
    keys = np.stack([vectors[t] for t in stored])
    sims = np.stack([vectors[q] for q in queries]) @ keys.T
    nearest = sims.argmax(axis=1)
    similarity = sims[np.arange(len(queries)), nearest].tolist()
    joined = [groups[q] == groups[stored[j]] for q, j in zip(queries, nearest.tolist(), strict=True)]
    return {
        "pairs": len(pairs),
        "entries": len(stored),
        "questions": len(queries),
        "answerable": answerable,
        "hits": hits,
        "false_hits": wrong,
        "precision": round(precision, 4) if precision is not None else None,
        "recall": ratio(right, answerable),
        "false_hits_per_question": ratio(wrong, len(queries)),
        # Judged by the label-1 pairs alone (label_groups(strict=True)): a copy of the question with
        # other case or punctuation, which no label joins, counts as wrong there.
        "false_hits_strict_labels": wrong_strict,
        "precision_strict_labels": ratio(hits - wrong_strict, hits),
        "skipped": skipped,  # lookups the embedder was too busy for (misses); an injected one may skip
        "fixed_threshold_at_same_precision": best_fixed_threshold(
            similarity, joined, answerable, precision if precision is not None else 1.0
        ),
        "fixed_threshold_at_0.95": best_fixed_threshold(similarity, joined, answerable, 0.95),
        "lookup_ms_batched": {**_ms(latencies), "concurrency": CHUNK},
    }


async def _embed_patiently(embedder: Embedder, texts: list[str]) -> Any:
    """The vectors, waiting out an embedder that refuses work while it is behind."""
    while True:
        try:
            return await embedder.embed(texts)
        except EmbedderBusy:
            await asyncio.sleep(0.05)


async def cache_quality(
    domains: dict[str, list[Pair]],
    data_dir: Path,
    progress: ProgressFn | None = None,
    *,
    embedder: Embedder | None = None,
) -> dict[str, Any]:
    """Each domain's pairs through the cache as `iros serve` builds it by default, with no verification
    yet (the cold prior decides): per domain, precision, recall, false hits per question and the best
    fixed cosine threshold beside them."""
    report = progress or quiet
    if not domains or not all(domains.values()):
        raise ValueError("no pairs to measure")
    # Decisions are measured here, not speed: every lookup waits for its embedding, none is skipped.
    patient = {"embedder": {"skip_after_ms": None, "lookup_timeout_ms": 600_000}}
    cache = await _start_cache(data_dir, report, embedder, patient)
    # Verification re-asks an upstream this in-process cache has none of; the prior alone is measured.
    cache.settings.verification.enabled = False
    try:
        out: dict[str, Any] = {}
        for name, pairs in domains.items():
            await cache.store.clear()
            out[name] = await _domain_quality(cache, pairs, report, name)
        verifier = cache.verifier
        return {
            "protocol": "label graph: every distinct a cached, every distinct b that is not an a asked; "
            "right iff label-1 pairs join the two, directly or in a chain",
            "similarity_threshold": cache.threshold,
            "max_false_hit_rate": cache.calibration.delta,
            "neighbours": getattr(verifier, "neighbours", 1),
            "prior_cut": verifier.cut_for(cache.calibration.delta) if verifier is not None else None,
            "domains": out,
        }
    finally:
        await cache.close()


def run_cache_quality(domains: dict[str, list[Pair]], progress: ProgressFn | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="iros-bench-cache-") as tmp:
        return asyncio.run(cache_quality(domains, Path(tmp), progress))


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
