"""What every settings block shares: unknown keys refused, durations checked where they are written."""

from __future__ import annotations

from typing import Annotated, Any

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
