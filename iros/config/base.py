"""What every settings block shares: unknown keys refused, durations checked where they are written, one
credential per upstream (models and the embedder), a usable URL for a Redis backend (cache store, state)."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict

from iros.core.timefmt import DurationError, parse_duration


class Strict(BaseModel):
    # Unknown keys are typos far more often than intent: reject them so they are seen.
    model_config = ConfigDict(extra="forbid")


def _check_duration(value: Any) -> Any:
    try:
        parse_duration(value)
    except DurationError as exc:
        raise ValueError(str(exc)) from None
    return value


# "2m", "30s", "1h" or a number of seconds.
Duration = Annotated[str | float, BeforeValidator(_check_duration)]


def one_credential(base_url: str | None, api_key_env: str | None) -> None:
    # The HTTP client cannot send both (every request and /ready would fail): say so at load.
    if base_url and api_key_env and "@" in urlsplit(base_url).netloc:
        raise ValueError(
            "base_url holds credentials (user:password@) and api_key_env names a key: give one of "
            "them (a bearer key in api_key_env, or basic auth in the URL)"
        )


def redis_url(backend: str, url: str | None, block: str) -> None:
    """A `block` whose backend is redis names a redis://, rediss:// or unix:// URL: say so at load."""
    if backend == "redis" and not (url or "").startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"{block}.backend redis needs {block}.url, e.g. redis://127.0.0.1:6379/0")
