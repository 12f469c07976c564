"""The response cache's settings: the store, the embedder, live verification, and the cache itself.

CacheSettings(semantic=True, max_false_hit_rate=0.02)   # Settings.cache; the seed's cache block
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from iros.config.base import Strict, one_credential, redis_url


class CacheStoreSettings(Strict):
    backend: Literal["sqlite", "redis"] = "sqlite"
    path: str | None = Field(None, description="SQLite file; default <server.data_dir>/cache.db")
    url: str | None = Field(None, description="redis://host:6379/0 for the redis backend")
    prefix: str = Field("iros:cache", description="Redis key prefix shared by the replicas")

    @model_validator(mode="after")
    def _url_for_redis(self) -> CacheStoreSettings:
        redis_url(self.backend, self.url, "store")
        return self


class EmbedderSettings(Strict):
    backend: Literal["local", "openai"] = "local"
    model: str = Field("all-MiniLM-L6-v2", description="local: the packaged MiniLM; openai: the model name")
    base_url: str | None = Field(None, description="openai backend: the server's /v1 URL")
    api_key_env: str | None = None
    runtime: Literal["onnx", "torch"] = Field(
        "onnx", description="local: ONNX Runtime on the CPU (no torch), or torch (CUDA when present)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(
        None, ge=1, le=64, description="local: model threads (default: half the cores)"
    )
    max_batch: int = Field(64, ge=1, le=1024, description="texts embedded together")
    max_wait_ms: float = Field(
        2.0, ge=0, le=100, description="how long a lookup waits for others to batch with"
    )
    skip_after_ms: float | None = Field(
        10.0,
        ge=0,
        description="a lookup that would wait longer than this behind other embeddings is skipped "
        "(served as a miss), never queued; null: always wait",
    )
    lookup_timeout_ms: float | None = Field(
        None,
        gt=0,
        description="a lookup whose embedding takes longer than this is skipped (a miss); "
        "default: 100 for the local model, timeout_seconds for a server",
    )
    timeout_seconds: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _credentials(self) -> EmbedderSettings:
        one_credential(self.base_url, self.api_key_env)
        return self


class CacheVerificationSettings(Strict):
    """Semantic hits checked on live traffic: a sampled share is also asked upstream and judged."""

    enabled: bool = True
    judge: Literal["exact", "embedding", "model"] = Field(
        "embedding",
        description="how a fresh answer is compared with the cached one: normalised text, the answers' "
        "embeddings, or judge_model asked whether the two say the same",
    )
    judge_model: str | None = Field(None, description="judge: model: a configured model name")
    max_share: float = Field(0.2, ge=0, le=1, description="at most this share of would-be hits is re-asked")

    @model_validator(mode="after")
    def _model_named(self) -> CacheVerificationSettings:
        if self.judge == "model" and not self.judge_model:
            raise ValueError("judge: model needs judge_model, a configured model name")
        return self


class CacheSettings(Strict):
    """The response cache: exact answers by key, semantic ones by the last user turn's meaning."""

    enabled: bool = True
    exact: bool = True
    semantic: bool = True
    verifier: bool = Field(True, description="check a semantic candidate before serving it")
    similarity_threshold: float = Field(
        0.55, ge=0, le=1, description="cosine similarity a candidate needs before the verifier scores it"
    )
    max_false_hit_rate: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="δ: the largest share of served semantic hits that may be wrong; the verifier's cut "
        "follows from it and from what verification measured",
    )
    verification: CacheVerificationSettings = Field(default_factory=CacheVerificationSettings)
    precision_floor: float = Field(
        0.90, ge=0, le=1, description="tuning for hit rate never moves the threshold below this precision"
    )
    max_temperature: float = Field(
        0.7,
        ge=0,
        le=2,
        description="requests sampled hotter than this are not cached (unset counts as cacheable)",
    )
    semantic_max_chars: int = Field(
        1000,
        ge=1,
        # The verifier reads the first 4,096 characters (cache.base.MAX_TEXT_CHARS): past that, two texts
        # that differ only at their ends would have the same words to it.
        le=4096,
        description="longer last user turns are matched exactly only: the embedding model reads its first "
        "256 word pieces (about 1,000 characters), so two long texts alike there would look the same",
    )
    overlap: Literal["auto", "speculate", "queue", "off"] = Field(
        "auto",
        description="how the semantic lookup meets the upstream call on a request the exact cache misses. "
        "speculate: the call starts beside the lookup and a hit cuts it short (a miss never waits for the "
        "embedding; a semantic hit costs a call cancelled within milliseconds); queue: the lookup runs while "
        "the request waits for the deployment's connection and the call is sent only after a miss (no call "
        "wasted; a miss waits for what is left of the lookup); auto: speculate on deployments without a "
        "price, queue on priced ones; off: the lookup, then the call",
    )
    ttl_seconds: float | None = Field(86400.0, gt=0)
    max_entries: int = Field(100_000, ge=1)
    max_memory_mb: float = Field(512.0, gt=0)
    eviction: Literal["lru", "lfu"] = "lru"
    namespace: Literal["key", "global"] = Field(
        "key", description="key: each API key (tenant) has its own answers; global: shared by all"
    )
    finish_reasons: list[str] = Field(default_factory=lambda: ["stop"], description="answers cached only if")
    token_cost_per_1k: float | None = Field(
        None,
        ge=0,
        description="price per 1,000 tokens, for the cost a hit saves in /api/analysis/cache/efficiency",
    )
    store: CacheStoreSettings = Field(default_factory=CacheStoreSettings)
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
