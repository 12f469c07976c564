"""The shared state as this worker sees it (admin key).

GET /api/state      {"worker", "state": {backend, connected, version, outages, ...},
                     "lease": {leader, token, ttl_seconds}, "settings": every live setting,
                     "cluster_workers": workers heard from}

Which worker answers depends on the connection: asked over fresh connections, every worker of a replica
shows itself in turn, which is how the scale-out tests see that all of them agree.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iros.api.base import AdminAPI
from iros.gateway.auth import KeyRing
from iros.optimization.tuning import Tuning
from iros.state.lease import Leadership
from iros.state.sync import SharedState


class StateAPI(AdminAPI):
    def __init__(
        self,
        shared: SharedState,
        leadership: Leadership,
        tuning: Tuning,
        workers: Callable[[], int],
        keyring: KeyRing,
    ) -> None:
        super().__init__(keyring)
        self.shared = shared
        self.leadership = leadership
        self.tuning = tuning
        self.workers = workers

    def routes(self) -> list[BaseRoute]:
        return [Route("/api/state", self.state, methods=["GET"])]

    async def state(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse(
            {
                "worker": self.shared.worker,
                "state": self.shared.describe(),
                "lease": self.leadership.describe(),
                "settings": self.tuning.snapshot(),
                "cluster_workers": self.workers(),
            }
        )
