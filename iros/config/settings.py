"""The settings tree: server, auth, models, retries, targets, metrics, optimization, reports, and the
root Settings that holds them (alerting's blocks are in alerting.py, the cache's in cache.py).

Settings(**data)                               # validates; config/loading.py reads the YAML and env first
"""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from iros.config.alerting import AlertingSettings, LiveAlertingSettings
from iros.config.base import Strict, one_credential, redis_url
from iros.config.cache import CacheSettings

MIN_KEY_CHARS = 16  # the shortest API or admin key accepted on a non-loopback bind


class ServerSettings(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="all request headers together; beyond: 431")
    max_headers: int = Field(100, ge=8, description="request header fields; beyond: 431")
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="time for a request body to arrive after its headers; beyond: 408"
    )
    # Connection limits (iros/server/protocol.py): what a socket may hold without sending a request.
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="time for a request line and headers to arrive; beyond: 408, closed"
    )
    body_start_timeout_seconds: float = Field(
        10.0, gt=0, description="time from the headers to the body's first byte; beyond: 408, closed"
    )
    keep_alive_seconds: int = Field(5, ge=1, description="an idle kept-alive connection is closed after this")
    max_connections_per_address: int = Field(
        128, ge=0, description="open connections from one client address; beyond: 429, closed; 0: no cap"
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="proxy addresses (IPs or networks) whose X-Forwarded-For/-Proto are believed",
    )
    secure_cookie: bool = Field(False, description="always mark the session cookie Secure (TLS in front)")
    max_concurrency: int = Field(512, ge=1, description="requests served at once; the rest wait in the queue")
    max_queue: int = Field(2048, ge=0, description="requests waiting for a slot; beyond it a 429")
    queue_timeout_seconds: float = Field(30.0, gt=0)
    shutdown_timeout_seconds: float = Field(30.0, ge=0)
    access_log: bool = False
    data_dir: str = Field("iros-data", description="SQLite databases and other state; created if missing")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return value


class Budget(Strict):
    """Spend allowed to one key per calendar period (UTC); once spent, its model requests get 429."""

    usd: float = Field(gt=0, description="US dollars a period")
    period: Literal["day", "week", "month"] = "month"


class KeyEntry(Strict):
    """A key given inline (`key`), read from the environment (`key_env`), or stored as a hash."""

    name: str | None = None
    key: str | None = Field(None, repr=False)
    key_env: str | None = None
    key_sha256: str | None = None
    requests_per_minute: float | None = Field(
        None, gt=0, description="this key's rate limit; overrides auth.requests_per_minute"
    )
    budget: Budget | None = None

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
    requests_per_minute: float | None = Field(
        None, gt=0, description="model API requests per minute for each key; none: unlimited"
    )
    burst: int | None = Field(
        None, ge=1, description="requests a key may send at once; default: one second of its rate, at least 1"
    )

    @model_validator(mode="after")
    def _some_way_in(self) -> AuthSettings:
        if not self.open and not self.api_keys and not self.admin_keys:
            raise ValueError("no api_keys or admin_keys are configured: add keys, or set open: true")
        return self


class TimeoutSettings(Strict):
    connect_seconds: float = Field(5.0, gt=0)
    read_seconds: float = Field(120.0, gt=0, description="longest silence between two bytes from upstream")


class Pricing(Strict):
    """What a deployment's tokens cost, in US dollars per million."""

    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)
    cached_input_per_million: float | None = Field(
        None, ge=0, description="prompt tokens the upstream served from its own cache (default: input price)"
    )


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
    max_queue: int = Field(
        256, ge=0, description="requests waiting for one of max_connections; beyond it the next candidate"
    )
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    pricing: Pricing | None = Field(None, description="per-million-token prices; none: answers cost 0")

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
        one_credential(self.base_url, self.api_key_env)
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


class OptimizationCriteria(Strict):
    """How much each measurement counts when models are scored (the seed's weights; need not sum to 1)."""

    response_time_weight: float = Field(0.4, ge=0)
    resource_usage_weight: float = Field(0.3, ge=0)
    accuracy_weight: float = Field(0.3, ge=0)


class ModelOptimization(Strict):
    """The seed's model_optimization block, plus how measurements are averaged and explored."""

    dynamic_selection: bool = Field(True, description="groups and auto pick a model per request by score")
    performance_based_routing: bool = Field(True, description="live measurements feed the score")
    load_balancing: bool = Field(True, description="spread a model's deployments by load and latency")
    optimization_criteria: OptimizationCriteria = Field(default_factory=OptimizationCriteria)
    balancing: Literal["power_of_two", "least_in_flight"] = "power_of_two"
    exploration_rate: float = Field(0.05, ge=0, le=1, description="share of requests that try another model")
    explore_after_seconds: float = Field(
        30.0, gt=0, description="a model unmeasured this long is tried again (recovered or new)"
    )
    moving_average_alpha: float = Field(0.2, gt=0, le=1, description="weight of the newest measurement")
    prefer_speed: bool = False
    quality_threshold: float | None = Field(None, ge=0, le=1, description="least accuracy a pick needs")


class CircuitBreakerSettings(Strict):
    failure_threshold: int = Field(5, ge=1, description="failures within the window that open it")
    window_seconds: float = Field(30.0, gt=0)
    open_seconds: float = Field(10.0, gt=0, description="how long it stays open before a half-open probe")


OptimizationAction = Literal[
    "enable_aggressive_caching",
    "switch_to_lightweight_models",
    "increase_batch_size",
    "adjust_cache_similarity_threshold",
    "enable_cache_warming",
    "increase_cache_size",
]


class OptimizationRule(Strict):
    name: str = Field(min_length=1, max_length=128)
    trigger: str = Field(min_length=1, max_length=512, description='e.g. "cpu_usage > 7.0 for 5m"')
    actions: list[OptimizationAction] = Field(min_length=1, max_length=16)
    enabled: bool = True


def _seed_rules() -> list[OptimizationRule]:
    # The seed's two rules, verbatim.
    return [
        OptimizationRule(
            name="high_load_optimization",
            trigger="cpu_usage > 7.0 for 5m",
            actions=["enable_aggressive_caching", "switch_to_lightweight_models", "increase_batch_size"],
        ),
        OptimizationRule(
            name="low_cache_hit_optimization",
            trigger="cache_hit_rate < 0.6 for 10m",
            actions=["adjust_cache_similarity_threshold", "enable_cache_warming", "increase_cache_size"],
        ),
    ]


class AutoOptimization(Strict):
    enabled: bool = True
    dry_run: bool = Field(False, description="evaluate and audit, change nothing")
    evaluation_interval_seconds: float = Field(15.0, gt=0, le=3600)
    cooldown_seconds: float = Field(300.0, ge=0, description="a trigger clear this long reverts its actions")
    optimization_rules: list[OptimizationRule] = Field(default_factory=_seed_rules, max_length=100)


class OptimizationSettings(Strict):
    """The seed's optimization blocks: model selection and routing, and the auto-optimization engine."""

    model_optimization: ModelOptimization = Field(default_factory=ModelOptimization)
    auto_optimization: AutoOptimization = Field(default_factory=AutoOptimization)
    circuit_breaker: CircuitBreakerSettings = Field(default_factory=CircuitBreakerSettings)
    single_flight: bool = Field(True, description="identical requests in flight share one upstream call")


class Open(BaseModel):
    # Blocks whose schema later capabilities own; kept as given until then.
    model_config = ConfigDict(extra="allow")


class ReportsSettings(Strict):
    """Scheduled daily and weekly performance reports (analysis/reports.py), kept under server.data_dir."""

    enabled: bool = Field(True, description="generate each whole day's and week's report in the background")
    check_interval_seconds: float = Field(300.0, gt=0, le=86400, description="how often to look for due ones")
    keep: int = Field(400, ge=1, le=100_000, description="reports kept per kind, oldest dropped first")


class StateSettings(Strict):
    """Live state every worker shares (iros/state/): settings, rules, alert state, rate limits, the one
    evaluator, the live numbers. local: one host's workers, through server.data_dir; redis: a cluster."""

    backend: Literal["local", "redis"] = "local"
    url: str | None = Field(None, description="redis://host:6379/0 for the redis backend")
    prefix: str = Field("iros:state", description="Redis key prefix shared by the replicas")
    timeout_seconds: float = Field(0.5, gt=0, le=10, description="one Redis call; then it counts as down")

    @model_validator(mode="after")
    def _url_for_redis(self) -> StateSettings:
        redis_url(self.backend, self.url, "state")
        return self


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
    alerting: AlertingSettings = Field(default_factory=AlertingSettings)
    live_alerting: LiveAlertingSettings | None = Field(None, description="the seed's Live Alerting block")
    optimization: OptimizationSettings = Field(default_factory=OptimizationSettings)
    reports: ReportsSettings = Field(default_factory=ReportsSettings)
    state: StateSettings = Field(default_factory=StateSettings)

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

    @model_validator(mode="after")
    def _long_keys_off_loopback(self) -> Settings:
        # On a public bind a key is all that stands between the internet and the models: a short one
        # is guessed (wrong keys are only slowed, never locked out: iros.gateway.keyguard).
        if _is_loopback(self.server.host):
            return self
        for kind in ("api_keys", "admin_keys"):
            for i, entry in enumerate(getattr(self.auth, kind)):
                key = entry.key or (os.environ.get(entry.key_env) if entry.key_env else None)
                if key is not None and len(key.strip()) < MIN_KEY_CHARS:
                    where = f"auth.{kind}[{i}]" + (f" ({entry.name})" if entry.name else "")
                    raise ValueError(
                        f"{where}: a key on a public bind ({self.server.host}) needs at least "
                        f"{MIN_KEY_CHARS} characters; this one has {len(key.strip())} "
                        "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                    )
        return self

    @model_validator(mode="after")
    def _judge_configured(self) -> Settings:
        judge = self.cache.verification.judge_model
        if self.cache.verification.judge == "model" and judge not in self.model_names():
            raise ValueError(f"cache.verification.judge_model {judge!r} is not a configured model name")
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
