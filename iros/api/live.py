"""Live metrics: /ws/metrics (WebSocket) and /api/metrics/stream (SSE), one LiveHub message per tick.

routes += MetricsLiveAPI(monitor, keyring).routes()
GET /api/metrics/stream?metrics=response_time_p95,models      (admin key; SSE events named "metrics")
/ws/metrics, then send {"subscribe": ["response_time_p95"]} to narrow, {"subscribe": null} for all
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import orjson
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from iros.api.base import MonitorAPI
from iros.core.errors import IrosError
from iros.gateway.auth import Role
from iros.metrics.live import HubFull


class MetricsLiveAPI(MonitorAPI):
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/metrics/stream", self.stream, methods=["GET"]),
            WebSocketRoute("/ws/metrics", self.websocket),
        ]

    # --- live ---------------------------------------------------------------------------------
    async def stream(self, request: Request) -> Response:
        self._admin(request)
        keys = _keys(request.query_params.get("metrics"))
        hub = self.monitor.hub
        if len(hub.subscribers) >= 200:
            raise IrosError(503, "too many live subscribers; try again later", code="too_many_subscribers")

        async def events() -> AsyncIterator[dict[str, str]]:
            async with hub.subscribe(keys) as sub:
                while True:
                    data = await sub.get()
                    yield {"event": "metrics", "data": data.decode()}

        return EventSourceResponse(events(), ping=15, send_timeout=10)

    async def websocket(self, websocket: WebSocket) -> None:
        try:
            self.keyring.authenticate(websocket.headers.get("authorization"), Role.ADMIN)
        except IrosError:
            await websocket.close(code=1008, reason="admin key required (Authorization: Bearer ...)")
            return
        await websocket.accept()
        try:
            async with self.monitor.hub.subscribe(_keys(websocket.query_params.get("metrics"))) as sub:
                reader = asyncio.create_task(self._read_filters(websocket, sub.set_filter))
                try:
                    while not reader.done():
                        getter = asyncio.ensure_future(sub.get())
                        await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                        if getter.done():
                            await websocket.send_text(getter.result().decode())
                        else:
                            getter.cancel()
                finally:
                    reader.cancel()
        except HubFull as exc:
            await websocket.close(code=1013, reason=str(exc))
        except WebSocketDisconnect:
            pass

    async def _read_filters(
        self, websocket: WebSocket, set_filter: Callable[[list[str] | None], None]
    ) -> None:
        """Clients narrow what they receive: {"subscribe": ["response_time_p95", "models"]}."""
        while True:
            try:
                text = await websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError):
                return
            try:
                message = orjson.loads(text)
                keys = message["subscribe"]
                if keys is not None and not (
                    isinstance(keys, list) and all(isinstance(k, str) for k in keys)
                ):
                    raise TypeError
            except (orjson.JSONDecodeError, KeyError, TypeError):
                await websocket.send_text(
                    orjson.dumps(
                        {
                            "type": "error",
                            "message": 'send {"subscribe": ["metric", ...]} or {"subscribe": null}',
                        }
                    ).decode()
                )
                continue
            set_filter(keys)
            await websocket.send_text(orjson.dumps({"type": "subscribed", "metrics": keys}).decode())


def _keys(raw: str | None) -> list[str] | None:
    return [k.strip() for k in raw.split(",") if k.strip()] if raw else None
