"""Feedback on an answer (client key): POST /api/feedback {"request_id": "...", "score": 0.0-1.0}.

The score moves the answering model's accuracy estimate, which model selection weighs. A client key
may score only the answers it was given (request ids are random, and another key's id is answered as
unknown); an admin key may score any.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iros.api.base import MonitorAPI
from iros.core.errors import IrosError, bad
from iros.gateway.auth import Role


class FeedbackAPI(MonitorAPI):
    def routes(self) -> list[BaseRoute]:
        return [Route("/api/feedback", self.feedback, methods=["POST"])]

    # --- feedback -----------------------------------------------------------------------------
    async def feedback(self, request: Request) -> Response:
        principal = self.keyring.authenticate(request.headers.get("authorization"))
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise bad('the body must be JSON: {"request_id": "...", "score": 0.0-1.0}') from None
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object with request_id and score")
        request_id, score = body.get("request_id"), body.get("score")
        if not isinstance(request_id, str) or not request_id:
            raise bad("request_id is required: the x-iros-request-id header of the response", "request_id")
        if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
            raise bad("score must be a number from 0 (useless) to 1 (perfect)", "score")
        try:
            # A client key scores only its own answers; an admin any.
            owner = None if principal.role >= Role.ADMIN else principal.name
            model = self.monitor.collector.feedback(request_id, float(score), owner)
        except KeyError:
            raise IrosError(
                404,
                f"no recent response to this key has request_id {request_id!r} (feedback is kept for "
                "the last 100,000 responses of this process)",
                param="request_id",
                code="request_not_found",
            ) from None
        except ValueError as exc:
            raise IrosError(409, str(exc), param="request_id", code="feedback_exists") from None
        except PermissionError as exc:
            raise IrosError(404, str(exc), code="feedback_disabled") from None
        return JSONResponse({"request_id": request_id, "score": score, "model": model, "accepted": True})
