"""What every /api/* route class shares: the keyring and its checks, the JSON body, the Monitor.

class AlertAPI(AdminAPI): ...        # routes() lists the routes; handlers start with self._admin(request)
class MetricsAPI(MonitorAPI): ...    # the same, reading self.monitor
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from iros.core.errors import bad
from iros.gateway.auth import KeyRing, Principal, Role
from iros.metrics.monitor import Monitor


class AdminAPI:
    """Base of the /api/* route classes: they hold the keyring, and most routes start with `_admin`.

    class FeedbackAPI(AdminAPI):
        def __init__(self, monitor, keyring): super().__init__(keyring); self.monitor = monitor
    """

    def __init__(self, keyring: KeyRing) -> None:
        self.keyring = keyring

    def _auth(self, request: Request, need: Role = Role.CLIENT) -> Principal:
        """The caller, if its key has the role `need`; a 401/403 IrosError otherwise."""
        return self.keyring.authenticate(request.headers.get("authorization"), need)

    def _admin(self, request: Request) -> Principal:
        """The caller, if it holds the admin key; a 401/403 IrosError otherwise."""
        return self.keyring.authenticate(request.headers.get("authorization"), Role.ADMIN)

    async def _json_object(self, request: Request) -> dict[str, Any]:
        """The request body as a JSON object; anything else is a 400."""
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise bad("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object")
        return body


class MonitorAPI(AdminAPI):
    """Routes that read the Monitor; subclasses add routes()."""

    def __init__(self, monitor: Monitor, keyring: KeyRing) -> None:
        super().__init__(keyring)
        self.monitor = monitor
