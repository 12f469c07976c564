"""The cache's calibration as one for every worker of every replica: each judged outcome goes out on the
shared "calibration" log, and every worker adds every other worker's, so all hold the same outcomes and
compute the same cut and the same false-hit interval, whichever worker answers.

sharing = SharedCalibration(cache.calibration, shared)   # follows the log; app.py builds it
cache.verification.share_outcome = sharing.publish       # each outcome judged here, once recorded here

An outcome judged here is in this worker's calibration already (Calibration.record): the log gives it
back to the others only (SharedState skips a worker's own entries), and each entry is read once, so every
outcome counts once on every worker. A worker that starts (restarted, or a new replica) replays the log
from the start of what is kept: the latest KEPT outcomes, however old, so it calibrates from where the
cluster is. While the state cannot be reached the outcomes judged here still count here; they go out,
and the others' come in, when it answers again (SharedState keeps up to UNSENT_KEPT unsent entries).
"""

from __future__ import annotations

from typing import Any

from iros.cache.calibration import Calibration, Outcome
from iros.state.sync import SharedState

__all__ = ["CHANNEL", "KEPT", "SharedCalibration"]

CHANNEL = "calibration"
# The outcomes a starting worker replays: a dozen scopes' worth of MAX_OUTCOMES, a few MB of log.
KEPT = 50_000


class SharedCalibration:
    def __init__(self, calibration: Calibration, shared: SharedState, kept: int = KEPT) -> None:
        self.calibration = calibration
        self.shared = shared
        self.kept = kept
        self.received = 0  # outcomes added from other workers
        shared.follow(CHANNEL, self._receive, from_start=True)

    async def publish(self, outcome: Outcome) -> None:
        await self.shared.append(CHANNEL, outcome.to_data(), maxlen=self.kept)

    def _receive(self, entries: list[dict[str, Any]]) -> None:
        outcomes = [o for o in map(Outcome.of_data, entries) if o is not None]
        self.calibration.add(outcomes)
        self.received += len(outcomes)
