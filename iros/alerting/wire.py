"""The Alertmanager wire format: an alert as Alertmanager shows it, in its webhook payload (version 4)
and its API v2. The webhook, Slack and Alertmanager channels all read this shape.

am_alert(alert, generator_url="https://iros.example/api/alerts/x")    # {"status", "labels", "startsAt", ...}
"""

from __future__ import annotations

from typing import Any

from iros.alerting.store import Alert
from iros.core.timefmt import iso, iso_or_none

NOT_ENDED = "0001-01-01T00:00:00Z"  # Go's zero time: Alertmanager's endsAt of an alert with no end yet


def am_alert(alert: Alert, ends_at: float | None = None, generator_url: str = "") -> dict[str, Any]:
    resolved = alert.state == "resolved"
    return {
        "status": "resolved" if resolved else "firing",
        "labels": alert.labels,
        "annotations": alert.annotations,
        "startsAt": iso(alert.fired_at or alert.active_at),
        "endsAt": iso_or_none(alert.resolved_at if resolved else ends_at) or NOT_ENDED,
        "generatorURL": generator_url,
        "fingerprint": alert.fingerprint,
    }
