"""Settings: one YAML file, overridden by IROS_* environment variables, validated in one place.

settings = load_settings("iros.yaml")          # YAML, then IROS_SERVER__PORT=9000 etc. on top
settings = load_settings(None)                 # the embedded default (simulated models)
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from iros.errors import error_path

DEFAULT_CONFIG = "default.yaml"


class Strict(BaseModel):
    # Unknown keys are typos far more often than intent: reject them so they are seen.
    model_config = ConfigDict(extra="forbid")


class ServerSettings(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_concurrency: int = Field(512, ge=1, description="requests served at once; the rest wait in the queue")
    max_queue: int = Field(2048, ge=0, description="requests waiting for a slot; beyond it a 429")
    queue_timeout_seconds: float = Field(30.0, gt=0)
    shutdown_timeout_seconds: float = Field(30.0, ge=0)
    access_log: bool = False
    data_dir: str = Field("iros-data", description="SQLite databases and other state; created if missing")
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class KeyEntry(Strict):
    """A key given inline (`key`), read from the environment (`key_env`), or stored as a hash."""

    name: str | None = None
    key: str | None = Field(None, repr=False)
    key_env: str | None = None
    key_sha256: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> KeyEntry:
        given = [x for x in (self.key, self.key_env, self.key_sha256) if x]
        if len(given) != 1:
            raise ValueError("give exactly one of key, key_env or key_sha256")
        return self


def _inline_key(value: Any) -> Any:
    return {"key": value} if isinstance(value, str) else value


# A bare string in a key list is the key itself.
Key = Annotated[KeyEntry, BeforeValidator(_inline_key)]


class AuthSettings(Strict):
    open: bool = False
    api_keys: list[Key] = Field(default_factory=list)
    admin_keys: list[Key] = Field(default_factory=list)

    @model_validator(mode="after")
    def _some_way_in(self) -> AuthSettings:
        if not self.open and not self.api_keys and not self.admin_keys:
            raise ValueError("no api_keys or admin_keys are configured: add keys, or set open: true")
        return self


class TimeoutSettings(Strict):
    connect_seconds: float = Field(5.0, gt=0)
    read_seconds: float = Field(120.0, gt=0, description="longest silence between two bytes from upstream")


class ModelSettings(Strict):
    name: str = Field(min_length=1, max_length=128)
    backend: Literal["openai", "simulated"] = "openai"
    base_url: str | None = None
    api_key_env: str | None = None
    upstream_model: str | None = None
    profile: str = "lightweight"
    group: str | None = None
    accuracy: float | None = Field(None, ge=0, le=1)
    tags: list[str] = Field(default_factory=list)
    weight: float = Field(1.0, gt=0)
    max_connections: int = Field(256, ge=1)
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _backend_needs(self) -> ModelSettings:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.backend == "simulated":
            from iros.simulation import PROFILES

            if self.profile not in PROFILES:
                raise ValueError(f"unknown simulated profile {self.profile!r}; known: {', '.join(PROFILES)}")
        return self

    @property
    def target_model(self) -> str:
        return self.upstream_model or self.name


class RetrySettings(Strict):
    attempts: int = Field(3, ge=1, le=10, description="upstream calls per request, across deployments")
    backoff_ms: float = Field(50.0, ge=0)
    max_backoff_ms: float = Field(2000.0, ge=0)


class Target(Strict):
    target: float
    warning_threshold: float
    critical_threshold: float


def _default_targets() -> dict[str, Target]:
    # The seed's KPI block, verbatim.
    return {
        "response_time_ms": Target(target=2000, warning_threshold=3000, critical_threshold=5000),
        "cpu_usage_percent": Target(target=5.0, warning_threshold=7.0, critical_threshold=10.0),
        "cache_hit_rate": Target(target=0.70, warning_threshold=0.50, critical_threshold=0.30),
        "error_rate": Target(target=0.01, warning_threshold=0.05, critical_threshold=0.10),
    }


class StorageSettings(Strict):
    """Where metric history lives: the embedded SQLite store, or a Prometheus that scrapes /metrics."""

    backend: Literal["sqlite", "prometheus"] = "sqlite"
    path: str | None = Field(None, description="SQLite file; default <server.data_dir>/metrics.db")
    endpoint: str | None = Field(None, description="Prometheus base URL, e.g. http://127.0.0.1:9090")
    timeout_seconds: float = Field(5.0, gt=0)
    flush_interval_seconds: float = Field(
        5.0, gt=0, le=60, description="history is written this often; at most this much is lost on a crash"
    )
    raw_retention_hours: float = Field(
        48.0, gt=0, description="raw samples are kept this long; rollups for retention_days"
    )

    @model_validator(mode="after")
    def _endpoint_for_prometheus(self) -> StorageSettings:
        if self.backend == "prometheus":
            if not self.endpoint:
                raise ValueError("storage.backend prometheus needs storage.endpoint (http://host:9090)")
            if not self.endpoint.startswith(("http://", "https://")):
                raise ValueError(f"storage.endpoint must be an http(s) URL, not {self.endpoint!r}")
        return self


class CustomMetrics(Strict):
    business_metrics: bool = True
    user_journey_metrics: bool = True
    model_performance_metrics: bool = True


Interval = Literal["1m", "5m", "1h", "1d"]
ROLLUPS: tuple[Interval, ...] = ("1m", "5m", "1h", "1d")


class MetricsSettings(Strict):
    """The seed's metrics_collection block."""

    enabled: bool = True
    collection_interval_seconds: float = Field(10.0, gt=0, le=3600)
    retention_days: float = Field(30.0, gt=0)
    aggregation_intervals: list[Interval] = Field(default_factory=lambda: list(ROLLUPS))
    storage: StorageSettings = Field(default_factory=StorageSettings)
    custom_metrics: CustomMetrics = Field(default_factory=CustomMetrics)
    live_interval_seconds: float = Field(1.0, gt=0, le=60, description="how often /ws/metrics and SSE send")
    stall_threshold_ms: float = Field(1000.0, gt=0, description="a pause between chunks this long is a stall")
    relevance_sample_rate: float = Field(
        0.1, ge=0, le=1, description="share of responses scored for question-answer relevance"
    )


class CacheStoreSettings(Strict):
    backend: Literal["sqlite", "redis"] = "sqlite"
    path: str | None = Field(None, description="SQLite file; default <server.data_dir>/cache.db")
    url: str | None = Field(None, description="redis://host:6379/0 for the redis backend")
    prefix: str = Field("iros:cache", description="Redis key prefix shared by the replicas")

    @model_validator(mode="after")
    def _url_for_redis(self) -> CacheStoreSettings:
        if self.backend == "redis" and not (self.url or "").startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("store.backend redis needs store.url, e.g. redis://127.0.0.1:6379/0")
        return self


class EmbedderSettings(Strict):
    backend: Literal["local", "openai"] = "local"
    model: str = Field("all-MiniLM-L6-v2", description="local: the packaged MiniLM; openai: the model name")
    base_url: str | None = Field(None, description="openai backend: the server's /v1 URL")
    api_key_env: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch: int = Field(64, ge=1, le=1024, description="texts embedded together")
    max_wait_ms: float = Field(
        2.0, ge=0, le=100, description="how long a lookup waits for others to batch with"
    )
    timeout_seconds: float = Field(10.0, gt=0)


class CacheSettings(Strict):
    """The response cache: exact answers by key, semantic ones by the last user turn's meaning."""

    enabled: bool = True
    exact: bool = True
    semantic: bool = True
    verifier: bool = Field(True, description="check a semantic candidate before serving it")
    similarity_threshold: float = Field(0.80, ge=0, le=1, description="cosine similarity a candidate needs")
    precision_floor: float = Field(
        0.90, ge=0, le=1, description="tuning for hit rate never moves the threshold below this precision"
    )
    max_temperature: float = Field(
        0.7,
        ge=0,
        le=2,
        description="requests sampled hotter than this are not cached (unset counts as cacheable)",
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


class Open(BaseModel):
    # Blocks whose schema later capabilities own; kept as given until then.
    model_config = ConfigDict(extra="allow")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IROS_",
        env_nested_delimiter="__",
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=lambda: AuthSettings(open=True))
    models: list[ModelSettings] = Field(min_length=1)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    performance_targets: dict[str, Target] = Field(default_factory=_default_targets)
    metrics_collection: MetricsSettings = Field(default_factory=MetricsSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    alerting: Open = Field(default_factory=Open)
    optimization: Open = Field(default_factory=Open)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init values; the environment wins over it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> Settings:
        if self.auth.open and not _is_loopback(self.server.host):
            raise ValueError(
                f"auth.open serves anyone who can reach {self.server.host}; "
                "bind server.host to 127.0.0.1 or configure auth.api_keys"
            )
        return self

    def model_names(self) -> list[str]:
        return list(dict.fromkeys(m.name for m in self.models))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConfigError(Exception):
    """A configuration that cannot be used; the message names each bad field."""


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        text = resources.files("iros").joinpath(DEFAULT_CONFIG).read_text()
        source = "the embedded default config"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file")
        text = p.read_text()
        source = str(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (server, models, ...)")
    return data


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    data = _merge(read_yaml(path), overrides or {})
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, data)) from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def format_errors(exc: ValidationError, data: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        loc = error_path(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            field = str(err["loc"][-1])
            known = _known_fields(err["loc"][:-1])
            close = difflib.get_close_matches(field, known, n=1)
            msg = f"unknown field{f' (did you mean {close[0]!r}?)' if close else ''}"
        lines.append(f"{loc or '(top level)'}: {msg}")
    env = sorted(k for k in os.environ if k.startswith("IROS_"))
    note = f"\n(environment overrides in effect: {', '.join(env)})" if env else ""
    return "invalid configuration:\n  " + "\n  ".join(lines) + note


def _known_fields(loc: tuple[int | str, ...]) -> list[str]:
    model: Any = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", None)
        model = next((a for a in args or () if hasattr(a, "model_fields")), ann)
    return list(getattr(model, "model_fields", {}))
