"""The live window of the whole cluster: this worker's frames and every other worker's.

cluster = ClusterFrames(collector, shared)      # shared: SharedState, or None for this worker alone
await cluster.start(); ...; await cluster.close()
cluster.frames()                                # every worker's frames of the last 5 minutes
cluster.workers()                               # this worker and those heard from lately

Each worker publishes each second's frame once that second is over (its sketches as plain data) on the
shared "frames" log and keeps the others' frames beside its own; sketches merge, so the cluster's P95 is
that of every response, not an average of the workers'. Prometheus still scrapes each replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from iros.core.periodic import cancel_all, every
from iros.metrics.collector import LIVE_WINDOW_SECONDS, Collector, Frame
from iros.metrics.sketch import Sketch
from iros.state.sync import SharedState

log = logging.getLogger("iros.metrics")

CHANNEL = "frames"
PUBLISH_SECONDS = 1.0
WORKER_SILENCE = 10.0  # a worker not heard from for this long no longer counts
MAX_PEERS = 256  # bounded: a cluster larger than this shows only the most recent ones


class ClusterFrames:
    def __init__(self, collector: Collector, shared: SharedState | None) -> None:
        self.collector = collector
        self.shared = shared
        self.peers: dict[str, deque[Frame]] = {}
        self.heard: dict[str, float] = {}  # worker -> when its last frame arrived (time.time)
        self._published = 0  # the last whole second published
        self._task: asyncio.Task[None] | None = None
        if shared is not None:
            # From now on: the log holds far more than the live window, not worth decoding at start.
            shared.follow(CHANNEL, self._receive, from_start=False)

    async def start(self) -> None:
        if self.shared is not None:
            self._published = int(time.time()) - 1
            self._task = asyncio.create_task(every(PUBLISH_SECONDS, self.publish, log, "cluster"))

    async def close(self) -> None:
        await cancel_all([self._task])

    def frames(self) -> list[Frame]:
        own = list(self.collector.frames)
        if not self.peers:
            return own
        since = time.time() - LIVE_WINDOW_SECONDS
        for worker, frames in list(self.peers.items()):
            while frames and frames[0].at < since:
                frames.popleft()
            if not frames:
                del self.peers[worker]
            own.extend(frames)
        return own

    def workers(self) -> int:
        """This worker and those heard from shortly before the last one was: while the shared state is
        down nobody is heard, and the count stays what it was (rate limits enforce limit / N)."""
        if not self.heard:
            return 1
        latest = max(self.heard.values())
        return 1 + sum(1 for at in self.heard.values() if latest - at < WORKER_SILENCE)

    async def publish(self) -> None:
        assert self.shared is not None
        now = int(time.time())
        done = [f for f in self.collector.frames if self._published < int(f.at) < now]
        # An idle second is published too (empty), so the others keep counting this worker.
        body: dict[str, Any] = {"frames": [_frame_data(f) for f in done]}
        if await self.shared.append(CHANNEL, body, keep=False):  # a missed second stays missed
            self._published = now - 1

    def _receive(self, entries: list[dict[str, Any]]) -> None:
        since = time.time() - LIVE_WINDOW_SECONDS
        for entry in entries:
            worker = entry.get("by")
            if not isinstance(worker, str):
                continue
            frames = [_frame_of(f) for f in entry.get("frames", ()) if f["at"] >= since]
            if worker not in self.peers and len(self.peers) >= MAX_PEERS:
                continue
            self.heard[worker] = time.time()
            self.peers.setdefault(worker, deque()).extend(frames)
        for worker in [w for w, at in self.heard.items() if time.time() - at > LIVE_WINDOW_SECONDS]:
            self.heard.pop(worker)


def _frame_data(frame: Frame) -> dict[str, Any]:
    return {
        "at": frame.at,
        "series": [[name, list(labels), sketch.to_data()] for (name, labels), sketch in frame.series.items()],
    }


def _frame_of(data: dict[str, Any]) -> Frame:
    series = {
        (name, tuple((k, v) for k, v in labels)): Sketch.from_data(sketch)
        for name, labels, sketch in data["series"]
    }
    return Frame(float(data["at"]), series)
