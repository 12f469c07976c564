"""`iros bench workload`: a realistic stream of questions through the whole gateway, cache on and off.

    pairs = read_pairs(DEFAULT_PAIRS)
    run_workload(pairs)   # hit rate, false hits and response time of `iros serve`, cache on vs off

Real `iros serve` children on simulated models, measured over HTTP: Zipf popularity over base questions
(groups of duplicate texts from the pairs), asked verbatim or paraphrased, plus one-off questions.

    run_workload(pairs, upstream="http://127.0.0.1:8000/v1", upstream_model="smollm2")  # a real server
    run_workload(pairs, local_model=True)    # llama.cpp serving SmolLM2, started for the run

Against a real server the questions are streamed (temperature 0, ended at their first sentence or
`max_tokens`), so the report adds
time to first token and tokens per second; a false hit is an answer no miss brought back for its question,
which holds as long as the server answers a prompt the same way each time (greedy decoding).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from iros.bench.pairs import (
    SEMANTIC_READY_TIMEOUT,
    Pair,
    ProgressFn,
    label_groups,
    quiet,
    ratio,
    request_body,
)

TARGET_HIT_RATE = 0.70
TARGET_FALSE_HIT_RATE = 0.01
TARGET_IMPROVEMENT = 0.60

# The workload: a support-desk style stream where a few questions are asked again and again.
SHARES = {"exact": 0.65, "paraphrase": 0.25, "one_off": 0.10}
ZIPF_S = 1.0  # popularity of the k-th base question ∝ 1 / k**s
REQUESTS_PER_BASE = 10  # base questions = requests // this
MAX_PHRASINGS = 8  # base questions are groups of at most this many duplicate texts


@dataclass(frozen=True, slots=True)
class Ask:
    text: str
    group: int  # the base question it asks; one-offs have a group of their own (negative)
    kind: str  # "exact", "paraphrase" or "one_off"


def _phrasings(pairs: list[Pair]) -> list[list[str]]:
    """Groups of texts that ask the same thing (joined by label-1 pairs), each led by an `a` text."""
    group = label_groups(pairs)
    seen: set[str] = set()
    leads: list[str] = []
    texts: list[str] = []  # in the order they first appear
    for p in pairs:
        if p.label == 1 and p.a != p.b:
            if p.a not in seen:
                leads.append(p.a)
            for text in (p.a, p.b):
                if text not in seen:
                    seen.add(text)
                    texts.append(text)
    groups: dict[int, list[str]] = {}
    for text in leads:
        groups.setdefault(group[text], []).append(text)
    for text in texts:
        members = groups[group[text]]
        if text not in members:
            members.append(text)
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
    return {"exact_only": ratio(exact, len(stream)), "ideal": ratio(semantic, len(stream))}


@dataclass(slots=True)
class _Reply:
    status: int
    cache: str
    content: str | None
    ms: float
    ttft_ms: float | None = None
    tokens: int = 0  # completion tokens of a streamed answer (its usage chunk)
    overhead_ms: float | None = None  # Iros's own time for it (x-iros-overhead-ms)


async def _read_stream(response: aiohttp.ClientResponse, started: float) -> tuple[str, float | None, int]:
    """A streamed answer's text, time to its first content and completion tokens."""
    pieces: list[str] = []
    ttft = None
    tokens = 0
    async for line in response.content:
        if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
            continue
        chunk = orjson.loads(line[5:].strip())
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text:
                ttft = ttft if ttft is not None else (time.perf_counter() - started) * 1000
                pieces.append(text)
        if isinstance(chunk.get("usage"), dict):
            tokens = int(chunk["usage"].get("completion_tokens") or 0)
    return "".join(pieces), ttft, tokens


async def _drive(
    url: str,
    stream: list[Ask],
    concurrency: int,
    progress: ProgressFn,
    label: str,
    max_tokens: int | None = None,
) -> list[_Reply]:
    """The stream through `url`, `concurrency` at a time; with `max_tokens`, streamed (a real model)."""
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
                payload = request_body(stream[i].text, "chat")
                if max_tokens is not None:
                    payload |= {
                        # An answer cut by max_tokens (finish_reason "length") is never cached: end each
                        # at its first sentence, so most finish with "stop" as a chat answer would.
                        "stop": ["."],
                        "max_tokens": max_tokens,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                started = time.perf_counter()
                content, ttft, tokens = None, None, 0
                async with session.post(
                    f"{url}/v1/chat/completions",
                    data=orjson.dumps(payload),
                    headers={"content-type": "application/json"},
                ) as response:
                    if response.status == 200 and max_tokens is not None:
                        content, ttft, tokens = await _read_stream(response, started)
                    else:
                        raw = await response.read()
                        if response.status == 200:
                            content = orjson.loads(raw)["choices"][0]["message"]["content"]
                ms = (time.perf_counter() - started) * 1000
                cache = response.headers.get("x-iros-cache", "")
                overhead = response.headers.get("x-iros-overhead-ms")
                replies[i] = _Reply(
                    response.status, cache, content, ms, ttft, tokens, float(overhead) if overhead else None
                )
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


def _serve(cache: dict[str, Any], model: dict[str, Any], data_dir: Path) -> Any:
    from iros.testing.iros import IrosProcess

    config = {
        "auth": {"open": True},
        # The load generator is one address by design: no per-address connection cap.
        "server": {"data_dir": str(data_dir), "log_level": "warning", "max_connections_per_address": 0},
        "models": [model],
        "cache": cache,
    }
    return IrosProcess.serve(config)


def _timing(replies: list[_Reply], wall_s: float) -> dict[str, Any]:
    ms = np.asarray([r.ms for r in replies])
    out: dict[str, Any] = {
        "mean_ms": round(float(ms.mean()), 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
    }
    ttft = np.asarray([r.ttft_ms for r in replies if r.ttft_ms is not None])
    if ttft.size:
        tokens = sum(r.tokens for r in replies)
        out |= {
            "ttft_mean_ms": round(float(ttft.mean()), 2),
            "ttft_p95_ms": round(float(np.percentile(ttft, 95)), 2),
            "completion_tokens": tokens,
            # Tokens delivered to clients per second of the run: a hit delivers its tokens at once.
            "tokens_per_second": round(tokens / wall_s, 2) if wall_s else None,
        }
    # Iros's own time on the answers that went upstream: what the gateway adds to a model's answer.
    overhead = np.asarray(
        [
            r.overhead_ms
            for r in replies
            if r.overhead_ms is not None and r.cache != "hit" and r.cache != "semantic_hit"
        ]
    )
    if overhead.size:
        out["iros_overhead_ms"] = {
            "upstream_answers": int(overhead.size),
            "p50": round(float(np.percentile(overhead, 50)), 3),
            "p95": round(float(np.percentile(overhead, 95)), 3),
        }
    return out


def _first_model(url: str) -> str:
    """The first model a server lists at /models, for a run that did not name one."""
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=10) as response:
            listed = orjson.loads(response.read()).get("data") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise RuntimeError(
            f"cannot list the models of {url}/models ({exc}); name one with --upstream-model"
        ) from None
    if not listed or not isinstance(listed[0], dict) or "id" not in listed[0]:
        raise RuntimeError(f"{url}/models lists no model; name one with --upstream-model")
    return str(listed[0]["id"])


@contextlib.contextmanager
def _model(
    profile: str, upstream: str | None, upstream_model: str | None, connections: int, local_model: bool
) -> Iterator[dict[str, Any]]:
    """Iros's `models:` entry for the run: the simulated model, a real server, or llama.cpp started here."""
    from iros.testing.llama import LlamaServer, model_settings

    if local_model:
        with LlamaServer() as llama:
            yield llama.model_settings("chat")
    elif upstream is not None:
        yield model_settings(
            upstream.rstrip("/"),
            name="chat",
            upstream_model=upstream_model or "chat",
            connections=connections,
        )
    else:
        yield {"name": "chat", "backend": "simulated", "profile": profile}


def run_workload(
    pairs: list[Pair],
    *,
    requests: int = 2000,
    concurrency: int = 16,
    profile: str = "lightweight",
    seed: int = 7,
    progress: ProgressFn | None = None,
    upstream: str | None = None,
    upstream_model: str | None = None,
    connections: int = 1,
    local_model: bool = False,
    max_tokens: int = 48,
) -> dict[str, Any]:
    """The same stream through `iros serve` with the cache on (exact + semantic) and off: in front of the
    simulated model, of a real server at `upstream` (`connections` at a time), or of llama.cpp."""
    report = progress or quiet
    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must each be 1 or more")
    real = local_model or upstream is not None
    stream, bases = build_stream(pairs, requests, seed)
    with (
        tempfile.TemporaryDirectory(prefix="iros-bench-workload-") as tmp,
        _model(profile, upstream, upstream_model, connections, local_model) as model,
    ):
        on_dir, off_dir = Path(tmp) / "cached", Path(tmp) / "uncached"
        tokens = max_tokens if real else None
        server = _serve({"enabled": True, "semantic": True}, model, on_dir).start(timeout=60)
        try:
            report("loading the embedding model", 0, 1)
            asyncio.run(_wait_semantic(server.url))
            started = time.perf_counter()
            optimized = asyncio.run(_drive(server.url, stream, concurrency, report, "cache on", tokens))
            on_wall = time.perf_counter() - started
            stats = asyncio.run(_cache_stats(server.url))
        finally:
            server.stop()
        server = _serve({"enabled": False}, model, off_dir).start(timeout=60)
        try:
            started = time.perf_counter()
            baseline = asyncio.run(_drive(server.url, stream, concurrency, report, "cache off", tokens))
            off_wall = time.perf_counter() - started
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
    on, off = _timing(optimized, on_wall), _timing(baseline, off_wall)
    hit_rate = ratio(hits, len(stream)) or 0.0
    false_rate = ratio(sum(false_hits.values()), len(stream)) or 0.0
    improvement = round(1 - on["mean_ms"] / off["mean_ms"], 4) if off["mean_ms"] else 0.0
    return {
        "requests": len(stream),
        "concurrency": concurrency,
        "model": (
            "llama.cpp SmolLM2-135M-Instruct" if local_model else upstream if real else f"simulated {profile}"
        ),
        "max_tokens": tokens,
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
        "false_share_of_hits": ratio(sum(false_hits.values()), hits),
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
