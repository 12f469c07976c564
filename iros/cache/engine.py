"""The response cache: exact answers by a hash of the canonical request, semantic ones by the meaning of
the last user turn, checked by a verifier before they are served.

plan = cache.plan(request, principal, cache_control)     # None: this request is not cacheable
hit = await cache.lookup(plan)                           # exact, then semantic; None on a miss
hit = await cache.exact(plan); task = cache.begin(plan)   # or: the semantic part beside the upstream call,
cache.settle(plan, hit_or_none)                          #   and what became of it counted once decided
body_or_chunks = cache.replay(hit, request_id, stream=..., include_usage=...)
cache.save(plan, completion, upstream_ms)                # after a good answer; written in the background

Scope of a semantic match: the namespace (tenant), the model and everything in the request but the
last user turn must be identical (the `context` hash), so a follow-up in another conversation never
matches. Answers warmed by an admin live in a shared namespace every tenant reads after its own.

The semantic rule (one rule): of the verifier's `neighbours` nearest cached questions in scope whose
cosine is at least `similarity_threshold` (a gate), the verifier (verifier/) scores each and the best
is served if it reaches the cut. The cut follows from δ (`max_false_hit_rate`): the prior's, measured
out of domain, until verification (calibration.py) has measured this namespace and model's own.
Candidates the shared-instruction rule flags have a cut of their own, infinite until their own
outcomes say otherwise (`_decide`). The query's token embeddings come from the same forward pass as
its vector; each entry's (projected, float16) are kept in memory from when it was stored
(token_memory.py), or computed once when an entry came from the store or a replica.

Verification (verification.py): a sampled share of would-be hits is served all the same and asked
upstream in the background (Hit.verify: the caller hands the call to verify_served), and a sampled
share of near-misses (upstream anyway) is judged too; once the answer is in, the judge (judge.py)
compares it with the cached one in the background and the outcome calibrates the cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from iros.cache import plan as cache_plan
from iros.cache.base import MAX_TEXT_CHARS, CacheEntry, CacheStore, Embedder, EmbedderBusy
from iros.cache.calibration import Calibration, Pending, Scope
from iros.cache.plan import SHARED, Plan
from iros.cache.token_memory import TokenMemory
from iros.cache.verification import Verification
from iros.config import CacheSettings
from iros.core.schema import ParsedRequest

if TYPE_CHECKING:  # both load lazily: usearch, and the verifier's parameters, only for the semantic part
    from iros.cache.index import VectorIndex
    from iros.cache.verifier.model import Verifier

log = logging.getLogger("iros.cache")

CANDIDATES = 8  # nearest neighbours looked at per semantic lookup (then filtered by context)
MAX_PENDING_SAVES = 1000  # answers waiting to be written; beyond it new ones are not cached
MAX_PENDING_REASKS = 1000  # verification calls of served hits in flight; beyond it one is lost
LOCAL_LOOKUP_TIMEOUT = 0.1  # seconds: embedder.lookup_timeout_ms's default for the local model


@dataclass(slots=True)
class Hit:
    entry: CacheEntry
    kind: str  # "hit" (exact) or "semantic_hit"
    similarity: float = 1.0
    # A semantic hit drawn for verification: the caller asks upstream after serving it (verify_served).
    verify: Pending | None = None


class ResponseCache:
    def __init__(
        self,
        settings: CacheSettings,
        store: CacheStore,
        embedder: Embedder | None = None,
        verifier: Verifier | None = None,
        index_factory: Callable[[int], VectorIndex] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self.verifier = verifier
        self.index_factory = index_factory
        self.index: Any = None  # VectorIndex over entry embeddings, keyed by entry key, once semantic is up
        self.threshold = settings.similarity_threshold
        self.semantic_ready = False
        self._contexts: dict[str, str] = {}  # entry key -> its context, to filter index candidates
        self._prompts: dict[str, str] = {}  # entry key -> its prompt, for the verifier
        self._tokens = TokenMemory()  # entry key -> its prompt's token embeddings, for the verifier
        self._saves: set[asyncio.Task[None]] = set()
        self._reasks: set[asyncio.Task[None]] = set()  # verification calls of served hits (verify_served)
        self._loader: asyncio.Task[None] | None = None
        self.misses: Counter[tuple[str, str]] = Counter()  # (model, prompt) of recent misses, for warming
        self._miss_order: OrderedDict[tuple[str, str], None] = OrderedDict()
        # Similarity of the best semantic candidate per lookup, in 0.05-wide bins, by what became of it.
        self.similarity_bins: dict[str, np.ndarray[Any, Any]] = {
            k: np.zeros(20, dtype=np.int64) for k in ("served", "verifier_rejected", "below_threshold")
        }
        self.verifier_rejections = 0
        self.on_skip: Callable[[], None] | None = None  # told of each skipped lookup (/metrics counts them)
        self.counts: Counter[str] = Counter()
        self.top: Counter[str] = Counter()  # hits per entry key (bounded below)
        self.saved_tokens = 0
        self.saved_ms = 0.0
        self.hits_by_hour: Counter[tuple[int, str]] = Counter()  # (unix hour, kind)
        self.verification = Verification(settings)

    @property
    def calibration(self) -> Calibration:
        return self.verification.calibration

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.store.start(self)
        except Exception as exc:
            # Redis down at startup: lookups fail fast and count as misses until it answers again.
            log.warning(
                "cache store %s not available at start (%s); serving without it meanwhile",
                self.store.name,
                exc,
            )
        if self.settings.semantic and self.embedder is not None and self.index_factory is not None:
            # Loading the embedding model takes seconds: serve (exact hits included) meanwhile.
            self._loader = asyncio.create_task(self._load_semantic())

    async def _load_semantic(self) -> None:
        assert self.embedder is not None and self.index_factory is not None
        try:
            await self.embedder.start()
            index = self.index_factory(self.embedder.dim)
            # The saved index if there is one; whatever the store holds that it lacks is added.
            loaded = await asyncio.to_thread(index.load)
            keys, vectors = [], []
            async for entry in self.store.entries():
                self._remember(entry)
                if entry.embedding is not None and not (loaded and entry.key in index):
                    keys.append(entry.key)
                    vectors.append(entry.embedding)
            if keys:
                await asyncio.to_thread(index.add_many, keys, np.stack(vectors))
            self.index = index
            self.semantic_ready = True
            log.info("semantic cache ready: %d entries indexed with %s", len(keys), self.embedder.name)
        except Exception:
            log.exception("semantic cache unavailable: the embedder did not start; exact caching goes on")

    async def semantic_started(self, within: float) -> bool:
        """Wait until the semantic part is ready: False if it failed to start (the log says why) or is
        not ready within `within` seconds."""
        deadline = time.monotonic() + within
        while not self.semantic_ready:
            if self._loader is None or self._loader.done() or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def close(self) -> None:
        for task in list(self._reasks):  # verification calls: nobody waits on their answers
            task.cancel()
        if self._loader is not None:
            self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loader
        if self._saves:
            await asyncio.gather(*self._saves, return_exceptions=True)
        with contextlib.suppress(Exception):
            if self.index is not None:
                await asyncio.to_thread(self.index.save)
        if self.embedder is not None:
            await self.embedder.aclose()
        await self.store.close()

    # --- CacheListener: keep the index in step with the store (this replica's and others') -----
    def _remember(self, entry: CacheEntry) -> None:
        self._contexts[entry.key] = entry.context
        self._prompts[entry.key] = entry.prompt

    def added(self, entry: CacheEntry) -> None:
        self._remember(entry)
        if self.index is not None and entry.embedding is not None:
            self.index.add(entry.key, entry.embedding)

    def removed(self, key: str) -> None:
        self._contexts.pop(key, None)
        self._prompts.pop(key, None)
        self._tokens.drop(key)
        if self.index is not None:
            self.index.remove(key)

    # --- planning -----------------------------------------------------------------------------
    def plan(self, request: ParsedRequest, principal: str, cache_control: str | None) -> Plan | None:
        """The cache's view of a request, or None when the policy leaves it alone."""
        return cache_plan.plan(self.settings, request, principal, cache_control)

    @staticmethod
    def shared(plan: Plan) -> Plan:
        """The same request in the shared namespace (admin-warmed answers)."""
        return dataclasses.replace(plan, namespace=SHARED)

    # --- lookup -------------------------------------------------------------------------------
    async def lookup(self, plan: Plan) -> Hit | None:
        """Exact, then semantic, counted: the whole lookup, waited for (the gateway overlaps the semantic
        part with the upstream call instead: exact(), then begin(), then settle())."""
        if not plan.read:
            return None
        hit = await self.exact(plan)
        if hit is None and plan.prompt and self.semantic_ready:
            hit = await self.find(plan)
        self.settle(plan, hit)
        return hit

    async def exact(self, plan: Plan) -> Hit | None:
        """The exact answer for this request (its own namespace, then the shared one); not counted."""
        if not (plan.read and self.settings.exact):
            return None
        now = time.time()
        for candidate in (plan, self.shared(plan)):
            entry = await self.store.get(candidate.key)
            if entry is not None and _fresh(entry, plan, now):
                return Hit(entry, "hit")
        return None

    def begin(self, plan: Plan) -> asyncio.Task[Hit | None] | None:
        """Start the semantic lookup in the background (None when there is none to make). The task never
        raises; its embedding is kept on the plan, so the answer's save reuses it (_save waits for it)."""
        if not (plan.read and plan.prompt and self.semantic_ready):
            return None
        task = plan.lookup = asyncio.get_running_loop().create_task(self._find_safely(plan))
        return task

    async def _find_safely(self, plan: Plan) -> Hit | None:
        try:
            return await self.find(plan)
        except Exception as exc:
            # A lookup that cannot answer (the embedder failing) is a miss, never the request's failure.
            log.warning("semantic cache lookup failed, going upstream: %s", exc)
            plan.write = False
            return None

    async def find(self, plan: Plan) -> Hit | None:
        """The semantic match for this request, or None; not counted (settle() counts what is served)."""
        try:
            return await self._semantic(plan, time.time())
        except EmbedderBusy:
            # The embedder is behind: a miss now is faster than a lookup that waits for it.
            self.counts["skipped"] += 1
            plan.skipped = True
            if self.on_skip is not None:
                self.on_skip()
            return None

    def settle(self, plan: Plan, hit: Hit | None, overtaken: bool = False) -> None:
        """Count what became of a lookup: the hit served, or a miss. `overtaken`: the upstream answer came
        before the semantic lookup had decided, and was served instead."""
        if hit is not None:
            self._hit(hit.entry, hit.kind)
            if hit.kind == "semantic_hit":
                self.similarity_bins["served"][_bin(hit.similarity)] += 1
            return
        if overtaken:
            self.counts["overtaken"] += 1
        self._missed(plan)

    async def _embed(self, texts: list[str]) -> tuple[np.ndarray[Any, Any], list[Any] | None]:
        """Vectors, and the verifier's projection of each text's tokens where the embedder gives them."""
        assert self.embedder is not None
        embed_tokens = getattr(self.embedder, "embed_tokens", None)
        verifier = self.verifier if self.settings.verifier else None
        if verifier is None or verifier.tokens is None or embed_tokens is None:
            return await self.embedder.embed(texts), None
        encoded = await embed_tokens(texts)
        if encoded.tokens is None:
            return encoded.vectors, None
        return encoded.vectors, [verifier.project(t) for t in encoded.tokens]

    async def _candidate_tokens(self, keys: list[str]) -> list[Any] | None:
        """The kept token projections of these entries; those missing (entries that came from the store
        or another replica) are embedded once, together, and kept."""
        found = [self._tokens.get(key) for key in keys]
        missing = [i for i, tokens in enumerate(found) if tokens is None]
        if missing:
            _, computed = await self._embed([self._prompts.get(keys[i], "") for i in missing])
            if computed is None:
                return None
            for i, tokens in zip(missing, computed, strict=True):
                found[i] = tokens
                self._tokens.keep(keys[i], tokens)
        self._tokens.touch(keys)
        return found

    async def _semantic(self, plan: Plan, now: float) -> Hit | None:
        assert self.embedder is not None and self.index is not None and plan.prompt is not None
        try:
            # A model starved of CPU must not hold the request: past the limit it is a miss.
            async with asyncio.timeout(_lookup_timeout(self.settings)):
                vectors, tokens = await self._embed([plan.prompt])
        except TimeoutError:
            raise EmbedderBusy("the embedding took longer than lookup_timeout_ms") from None
        vector = vectors[0]
        plan.embedding = vector
        plan.tokens = tokens[0] if tokens else None
        contexts = {plan.context, self.shared(plan).context}
        matches = [
            (key, similarity)
            for key, similarity in self.index.search(vector[None, :], CANDIDATES)[0]
            if self._contexts.get(key) in contexts
        ]
        if not matches:
            return None
        bin_ = _bin(matches[0][1])
        verifier = self.verifier if self.settings.verifier else None
        # The verifier chooses among its `neighbours` nearest above the threshold; plain cosine takes
        # the nearest.
        width = verifier.neighbours if verifier is not None else 1
        above = [(key, similarity) for key, similarity in matches[:width] if similarity >= self.threshold]
        if not above:
            self.similarity_bins["below_threshold"][bin_] += 1
            return None
        key, similarity = above[0]
        if verifier is not None:
            keys = [k for k, _ in above]
            candidate_tokens = await self._candidate_tokens(keys) if plan.tokens is not None else None
            # The texts as far as the embedder read them: the features of a huge prompt would hold the loop.
            query = plan.prompt[:MAX_TEXT_CHARS]
            texts = [self._prompts.get(k, "")[:MAX_TEXT_CHARS] for k in keys]
            scores, flagged, aligned = verifier.assess(
                query, texts, [s for _, s in above], plan.tokens, candidate_tokens
            )
            prior = verifier.cut_for(self.calibration.delta, aligned)
            chosen = self._decide(plan, keys, scores, flagged.tolist(), prior)
            if chosen is None:
                self.verifier_rejections += 1
                self.similarity_bins["verifier_rejected"][bin_] += 1
                return None
            key, similarity = above[chosen]
        entry = await self.store.get(key)
        if entry is None or not _fresh(entry, plan, now):
            return None
        # A would-be hit drawn for verification is served all the same: the client does not wait for a
        # verification it did not need; the caller asks upstream afterwards (Hit.verify). An answer
        # that overtook this lookup was fetched anyway: save() judges that one (plan.verify).
        return Hit(entry, "semantic_hit", similarity, plan.verify)

    def _decide(
        self, plan: Plan, keys: list[str], scores: Any, flagged: list[bool], prior: float
    ) -> int | None:
        """Which candidate is served (None: a miss, a near-miss perhaps drawn for judging; a served one
        may be drawn for verification too, plan.verify). The best candidate of each kind meets its
        own scope's cut: those the shared-instruction rule flags are judged apart, their cut infinite
        until their own outcomes lower it, never because the rest of the traffic earned a low one."""
        best: dict[bool, int] = {}
        for i, flag in enumerate(flagged):
            if flag not in best or scores[i] > scores[best[flag]]:
                best[flag] = i
        near: tuple[int, Scope] | None = None
        for flag, i in sorted(best.items(), key=lambda kv: -float(scores[kv[1]])):
            scope = self.calibration.scope(plan.namespace, plan.model, flag)
            score = float(scores[i])
            if score > 0.0 and score >= scope.cut(prior):
                self.verification.would_be_hit()
                self.verification.sample(plan, scope, keys[i], score, prior, served=True)
                return i
            if near is None and scope.near(score, prior):
                near = (i, scope)
        if near is not None:
            i, scope = near
            self.verification.sample(plan, scope, keys[i], float(scores[i]), prior, served=False)
        return None

    # --- verification (verification.py) ------------------------------------------------------
    def verify_served(self, pending: Pending, fresh: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """A served hit drawn for verification: `fresh` (the same request asked upstream) runs in the
        background and its answer is judged against the cached one."""
        if len(self._reasks) >= MAX_PENDING_REASKS:
            self.verification.counts["verification_lost"] += 1
            return
        task = asyncio.ensure_future(self._verify_fresh(pending, fresh))
        self._reasks.add(task)
        task.add_done_callback(self._reasks.discard)

    async def _verify_fresh(self, pending: Pending, fresh: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        try:
            completion = await fresh()
        except Exception as exc:  # an upstream failing, a queue full: no outcome, the client has its answer
            self.verification.counts["verification_lost"] += 1
            log.debug("verification call failed: %s", exc)
            return
        self.verification.spent(pending, completion)
        if self.acceptable(completion):
            await self._verify(pending, completion)

    async def _verify(self, pending: Pending, completion: dict[str, Any]) -> None:
        entry = await self.store.get(pending.key)
        cached = orjson.loads(entry.body) if entry is not None else None
        await self.verification.judge(pending, completion, cached, self.embedder)

    def verification_report(self) -> dict[str, Any]:
        verifier = self.verifier if self.settings.verifier else None
        return self.verification.report(verifier.cut_for(self.calibration.delta) if verifier else None)

    def set_max_false_hit_rate(self, delta: float) -> None:
        self.settings.max_false_hit_rate = delta
        self.calibration.set_delta(delta)

    def _hit(self, entry: CacheEntry, kind: str) -> None:
        self.counts[kind] += 1
        self.saved_tokens += entry.completion_tokens + entry.prompt_tokens
        self.saved_ms += entry.upstream_ms
        self.hits_by_hour[(int(time.time() // 3600), kind)] += 1
        self.top[entry.key] += 1
        if len(self.top) > 20_000:
            # Keep the heavy hitters: drop the entries hit once.
            for key in [k for k, n in self.top.items() if n <= 1]:
                del self.top[key]
        self._background(self.store.record_hit(entry.key, "exact" if kind == "hit" else "semantic"))

    def _missed(self, plan: Plan) -> None:
        self.counts["miss"] += 1
        if plan.prompt and len(plan.prompt) <= MAX_TEXT_CHARS:
            # Bounded: the most recent distinct misses, with how often each came back.
            key = (plan.model, plan.prompt)
            self.misses[key] += 1
            self._miss_order[key] = None
            self._miss_order.move_to_end(key)
            if len(self._miss_order) > 10_000:
                old, _ = self._miss_order.popitem(last=False)
                del self.misses[old]

    # --- saving -------------------------------------------------------------------------------
    def acceptable(self, completion: dict[str, Any]) -> bool:
        """Only whole answers whose every choice finished for an allowed reason (embeddings: a full list)."""
        if completion.get("object") == "list":
            return isinstance(completion.get("data"), list) and bool(completion["data"])
        choices = completion.get("choices")
        if not isinstance(choices, list) or not choices:
            return False
        allowed = self.settings.finish_reasons
        return all(isinstance(c, dict) and c.get("finish_reason") in allowed for c in choices)

    def save(self, plan: Plan, completion: dict[str, Any], upstream_ms: float, served_by: str) -> None:
        """Store a good answer in the background; the response never waits for it (nor for the judge
        when the answer was fetched to verify a cached one)."""
        lookup = plan.lookup
        if lookup is not None and not lookup.done():
            # Overtaken by this answer, the semantic lookup is still embedding the question; what it
            # finds decides too whether the answer is judged against a cached one (plan.verify).
            if len(self._saves) < MAX_PENDING_SAVES:
                self._background(self._save_after(lookup, plan, completion, upstream_ms, served_by))
            else:
                self.counts["save_dropped"] += 1
            return
        pending = plan.verify
        if pending is not None:
            plan.verify = None
            self.verification.spent(pending, completion)
            if self.acceptable(completion) and len(self._saves) < MAX_PENDING_SAVES:
                self._background(self._verify(pending, completion))
        if not plan.write or not self.acceptable(completion):
            return
        if len(self._saves) >= MAX_PENDING_SAVES:
            self.counts["save_dropped"] += 1
            return
        self._background(self._save(plan, completion, upstream_ms, served_by))

    async def _save_after(
        self,
        lookup: asyncio.Task[Hit | None],
        plan: Plan,
        completion: dict[str, Any],
        upstream_ms: float,
        served_by: str,
    ) -> None:
        await asyncio.wait((lookup,))
        plan.lookup = None
        self.save(plan, completion, upstream_ms, served_by)

    async def store_now(
        self, plan: Plan, completion: dict[str, Any], upstream_ms: float, served_by: str
    ) -> None:
        """Store an answer and wait for it (cache warming)."""
        await self._save(plan, completion, upstream_ms, served_by)

    async def _save(self, plan: Plan, completion: dict[str, Any], upstream_ms: float, served_by: str) -> None:
        embedding, tokens = plan.embedding, plan.tokens
        # Not embedded again for the store when its lookup was skipped: under load, that is model time
        # the lookups need.
        wanted = embedding is None and not plan.skipped and self.semantic_ready and self.embedder is not None
        if wanted and plan.prompt:
            try:
                vectors, projected = await self._embed([plan.prompt])
                embedding, tokens = vectors[0], projected[0] if projected else None
            except EmbedderBusy:
                pass  # kept for exact hits only: the embedder is behind
        found = completion.get("usage")
        usage: dict[str, Any] = found if isinstance(found, dict) else {}
        now = time.time()
        entry = CacheEntry(
            key=plan.key,
            namespace=plan.namespace,
            context=plan.context,
            model=served_by,
            prompt=plan.prompt or "",
            body=orjson.dumps(completion),
            created_at=now,
            expires_at=now + plan.ttl if plan.ttl else None,
            completion_tokens=int(usage.get("completion_tokens") or 0),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            upstream_ms=upstream_ms,
            embedding=embedding,
        )
        # Kept before the store tells the index, so a lookup that finds the entry finds its tokens.
        self._tokens.keep(entry.key, tokens)
        await self.store.put(entry)
        self.counts["saved"] += 1

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._saves.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._saves.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.counts["store_errors"] += 1
            log.warning("cache write failed: %s", task.exception())

    # --- control ------------------------------------------------------------------------------
    async def stats(self) -> dict[str, Any]:
        store = await self.store.stats()
        lookups = self.counts["hit"] + self.counts["semantic_hit"] + self.counts["miss"]
        return {
            "enabled": self.settings.enabled,
            "semantic_ready": self.semantic_ready,
            "similarity_threshold": self.threshold,
            "verifier": bool(self.verifier is not None and self.settings.verifier),
            "lookups": lookups,
            "exact_hits": self.counts["hit"],
            "semantic_hits": self.counts["semantic_hit"],
            "misses": self.counts["miss"],
            "hit_rate": round((lookups - self.counts["miss"]) / lookups, 4) if lookups else None,
            "verifier_rejections": self.verifier_rejections,
            "max_false_hit_rate": self.calibration.delta,
            "verification": self.verification_report(),
            # Semantic lookups skipped (served as misses) because the embedder was behind.
            "skipped": self.counts["skipped"],
            # Misses whose upstream answer came before the semantic lookup decided (cache.overlap).
            "overtaken": self.counts["overtaken"],
            # Upstream calls started beside a semantic lookup and cut short by its hit (overlap: speculate).
            "speculative_cancelled": self.counts["speculative_cancelled"],
            "saved": self.counts["saved"],
            "store_errors": self.counts["store_errors"],
            "indexed": len(self.index) if self.index is not None else 0,
            "store": store,
        }


def _lookup_timeout(settings: CacheSettings) -> float:
    """Seconds a lookup waits for its embedding: a local model answers in milliseconds or is starved."""
    embedder = settings.embedder
    if embedder.lookup_timeout_ms is not None:
        return embedder.lookup_timeout_ms / 1000
    return LOCAL_LOOKUP_TIMEOUT if embedder.backend == "local" else embedder.timeout_seconds


def _bin(similarity: float) -> int:
    """similarity_bins' bin: 0.05 wide."""
    return min(int(max(similarity, 0.0) * 20), 19)


def _fresh(entry: CacheEntry, plan: Plan, now: float) -> bool:
    if entry.expires_at is not None and entry.expires_at <= now:
        return False
    return plan.max_age is None or now - entry.created_at <= plan.max_age
