"""The alert store: what one worker saves never undoes what another recorded."""

from __future__ import annotations

import copy
from pathlib import Path

from iros.alerting.store import Alert, AlertStore


async def test_an_acknowledgement_survives_a_save_of_an_older_copy(tmp_path: Path) -> None:
    """A worker (or a replica applying the shared log) saves its copy of a firing alert, taken before the
    acknowledgement reached it: the alert's new value is kept, and so is the acknowledgement."""
    store = AlertStore(tmp_path / "alerts.db")
    await store.start()
    try:
        alert = Alert.new("slow", "warning", {"kpi": "latency"}, 100.0)
        alert.state, alert.value = "firing", 4000.0
        await store.save_alert(alert)
        stale = copy.deepcopy(alert)  # taken before the acknowledgement
        assert await store.acknowledge(alert.id, "kim", "on it", 110.0)
        stale.value, stale.updated_at = 4500.0, 120.0
        await store.save_alert(stale)
        saved = await store.alert(alert.id)
        assert saved is not None and saved.value == 4500.0 and saved.updated_at == 120.0
        assert (saved.acked_by, saved.ack_comment, saved.acked_at) == ("kim", "on it", 110.0)
        # A copy that carries the acknowledgement itself writes it as it is.
        saved.value = 5000.0
        await store.save_alert(saved)
        again = await store.alert(alert.id)
        assert again is not None and again.value == 5000.0 and again.acked_by == "kim"
    finally:
        await store.close()
