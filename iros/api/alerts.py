"""The alerting API (admin key): active alerts, acknowledge, silence, history, rules, channels.

GET  /api/alerts/active                       pending and firing alerts
POST /api/alerts/{alert_id}/acknowledge       {"who": "kim", "comment": "looking"}: no more repeats
POST /api/alerts/{alert_id}/silence           {"duration_minutes": 60}: no notifications until it ends
GET|POST /api/alerts/silences, DELETE /api/alerts/silences/{id}    silences by label matchers
GET  /api/alerts/history?rule=&severity=&state=&start=&end=&limit=&offset=
GET|PUT|DELETE /api/alerts/rules              rules in force; PUT replaces them (validated), DELETE restores
GET  /api/alerts/channels, POST /api/alerts/channels/{name}/test
GET  /api/alerts/{alert_id}                   one alert with its transitions
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iros.alerting.channels import describe
from iros.alerting.channels.base import ChannelError
from iros.alerting.engine import AlertEngine
from iros.alerting.rules import RuleErrors, parse_rules
from iros.alerting.store import STATES, Silence
from iros.api.base import AdminAPI
from iros.api.params import time_param
from iros.core.errors import IrosError, bad
from iros.core.redact import redact_urls
from iros.core.timefmt import iso
from iros.gateway.auth import KeyRing, Principal

MAX_BODY = 256 * 1024
MAX_SILENCE_MINUTES = 60 * 24 * 90
MAX_MATCHERS = 20
MAX_SILENCES = 1000


class AlertAPI(AdminAPI):
    def __init__(self, engine: AlertEngine, keyring: KeyRing) -> None:
        super().__init__(keyring)
        self.engine = engine

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/alerts/active", self.active, methods=["GET"]),
            Route("/api/alerts/history", self.history, methods=["GET"]),
            Route("/api/alerts/rules", self.get_rules, methods=["GET"]),
            Route("/api/alerts/rules", self.put_rules, methods=["PUT"]),
            Route("/api/alerts/rules", self.reset_rules, methods=["DELETE"]),
            Route("/api/alerts/silences", self.list_silences, methods=["GET"]),
            Route("/api/alerts/silences", self.add_silence, methods=["POST"]),
            Route("/api/alerts/silences/{silence_id}", self.expire_silence, methods=["DELETE"]),
            Route("/api/alerts/channels", self.list_channels, methods=["GET"]),
            Route("/api/alerts/channels/{name}/test", self.test_channel, methods=["POST"]),
            Route("/api/alerts/status", self.status, methods=["GET"]),
            Route("/api/alerts/{alert_id}/acknowledge", self.acknowledge, methods=["POST"]),
            Route("/api/alerts/{alert_id}/silence", self.silence_alert, methods=["POST"]),
            Route("/api/alerts/{alert_id}", self.one, methods=["GET"]),
        ]

    async def _json(self, request: Request, empty_ok: bool = False) -> Any:
        body = await request.body()
        if len(body) > MAX_BODY:
            raise IrosError(413, f"the body is over {MAX_BODY} bytes", code="body_too_large")
        if not body.strip() and empty_ok:
            return {}
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise bad(f"the body is not valid JSON: {exc}", code="invalid_json") from None

    # --- alerts ---------------------------------------------------------------------------------
    async def active(self, request: Request) -> Response:
        self._admin(request)
        alerts = self.engine.active()
        severity = request.query_params.get("severity")
        if severity:
            alerts = [a for a in alerts if a["severity"] == severity]
        at = self.engine.last_evaluation
        return JSONResponse({"alerts": alerts, "count": len(alerts), "evaluated_at": iso(at) if at else None})

    async def one(self, request: Request) -> Response:
        self._admin(request)
        alert_id = request.path_params["alert_id"]
        alert = await self.engine.store.alert(alert_id)
        if alert is None:
            raise self._no_alert(alert_id)
        out = self.engine.view(alert)
        out["transitions"] = await self.engine.store.transitions(alert_id)
        return JSONResponse(out)

    def _no_alert(self, alert_id: str) -> IrosError:
        return IrosError(
            404,
            f"no alert {alert_id!r}: see GET /api/alerts/active for ids",
            param="alert_id",
            code="alert_not_found",
        )

    async def acknowledge(self, request: Request) -> Response:
        principal = self._admin(request)
        alert_id = request.path_params["alert_id"]
        body = await self._json(request, empty_ok=True)
        if not isinstance(body, dict):
            raise bad('the body must be a JSON object: {"who": "...", "comment": "..."}')
        who = body.get("who", principal.name)
        comment = body.get("comment", "")
        if not isinstance(who, str) or not who.strip() or len(who) > 200:
            raise bad("who must be a name of 1 to 200 characters", "who")
        if not isinstance(comment, str) or len(comment) > 2000:
            raise bad("comment must be text of at most 2000 characters", "comment")
        now = self.engine.clock()
        if not await self.engine.store.acknowledge(alert_id, who.strip(), comment, now):
            raise self._no_alert(alert_id)
        current = next((a for a in self.engine.current.values() if a.id == alert_id), None)
        if current is not None:
            current.acked_by, current.ack_comment, current.acked_at = who.strip(), comment, now
        alert = await self.engine.store.alert(alert_id)
        assert alert is not None
        return JSONResponse(self.engine.view(alert))

    async def silence_alert(self, request: Request) -> Response:
        principal = self._admin(request)
        alert_id = request.path_params["alert_id"]
        alert = await self.engine.store.alert(alert_id)
        if alert is None:
            raise self._no_alert(alert_id)
        body = await self._json(request, empty_ok=True)
        if not isinstance(body, dict):
            raise bad('the body must be a JSON object: {"duration_minutes": 60}')
        matchers = [{"name": "alertname", "value": alert.rule, "isEqual": True}]
        silence = await self._create_silence(body, matchers, principal)
        return JSONResponse({"alert_id": alert_id, "silence": silence.to_json(self.engine.clock())})

    async def history(self, request: Request) -> Response:
        self._admin(request)
        q = request.query_params
        limit = _int(q.get("limit"), 50, 1, 500, "limit")
        offset = _int(q.get("offset"), 0, 0, 10**9, "offset")
        state = q.get("state")
        if state is not None and state not in STATES:
            raise bad(f"state must be one of {', '.join(STATES)}", "state")
        severity = q.get("severity")
        if severity is not None and severity not in ("info", "warning", "critical"):
            raise bad("severity must be info, warning or critical", "severity")
        start = time_param(q["start"], "start") if q.get("start") else None
        end = time_param(q["end"], "end") if q.get("end") else None
        total, alerts = await self.engine.store.history(
            q.get("rule"), severity, state, start, end, limit, offset
        )
        following = offset + len(alerts)
        return JSONResponse(
            {
                "total": total,
                "limit": limit,
                "offset": offset,
                "next_offset": following if following < total else None,
                "alerts": [self.engine.view(a) for a in alerts],
            }
        )

    # --- silences -------------------------------------------------------------------------------
    async def _create_silence(
        self, body: dict[str, Any], matchers: list[dict[str, Any]], who: Principal
    ) -> Silence:
        minutes = body.get("duration_minutes", 60)
        if (
            isinstance(minutes, bool)
            or not isinstance(minutes, int | float)
            or not 0 < minutes <= MAX_SILENCE_MINUTES
        ):
            raise bad(
                f"duration_minutes must be a number above 0 and at most {MAX_SILENCE_MINUTES}",
                "duration_minutes",
            )
        comment = body.get("comment", "")
        if not isinstance(comment, str) or len(comment) > 2000:
            raise bad("comment must be text of at most 2000 characters", "comment")
        now = self.engine.clock()
        if len(await self.engine.store.silences(now)) >= MAX_SILENCES:
            raise IrosError(
                409, f"{MAX_SILENCES} silences are active: expire some first", code="too_many_silences"
            )
        author = str(body.get("created_by") or who.name)[:200]
        silence = Silence(uuid.uuid4().hex[:16], matchers, now, now + minutes * 60, author, comment, now)
        await self.engine.store.add_silence(silence)
        self.engine.silences.append(silence)
        return silence

    async def add_silence(self, request: Request) -> Response:
        principal = self._admin(request)
        body = await self._json(request)
        if not isinstance(body, dict):
            raise bad('the body must be {"matchers": {"alertname": "..."}, "duration_minutes": 60}')
        raw = body.get("matchers")
        if isinstance(raw, dict):
            raw = [{"name": k, "value": v} for k, v in raw.items()]
        if not isinstance(raw, list) or not raw or len(raw) > MAX_MATCHERS:
            raise bad(f'matchers must be 1 to {MAX_MATCHERS} label matchers: {{"alertname": "x"}} or '
                      '[{"name": "alertname", "value": "x", "isEqual": true}]', "matchers")  # fmt: skip
        matchers = []
        for i, m in enumerate(raw):
            if not (
                isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("value"), str)
            ):
                raise bad(f"matchers[{i}] needs a string name and value", "matchers")
            if m.get("isRegex"):
                raise bad(
                    f"matchers[{i}]: regular-expression matchers are not supported; use equality", "matchers"
                )
            matchers.append({"name": m["name"], "value": m["value"], "isEqual": bool(m.get("isEqual", True))})
        silence = await self._create_silence(body, matchers, principal)
        return JSONResponse(silence.to_json(self.engine.clock()), status_code=201)

    async def list_silences(self, request: Request) -> Response:
        self._admin(request)
        expired = request.query_params.get("expired") in ("1", "true")
        now = self.engine.clock()
        silences = await self.engine.store.silences(now, include_expired=expired)
        return JSONResponse({"silences": [s.to_json(now) for s in silences]})

    async def expire_silence(self, request: Request) -> Response:
        self._admin(request)
        silence_id = request.path_params["silence_id"]
        now = self.engine.clock()
        if not await self.engine.store.expire_silence(silence_id, now):
            raise IrosError(
                404, f"no active silence {silence_id!r}", param="silence_id", code="silence_not_found"
            )
        self.engine.silences = [s for s in self.engine.silences if s.id != silence_id]
        return JSONResponse({"id": silence_id, "expired": True})

    # --- rules ----------------------------------------------------------------------------------
    async def get_rules(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse(
            {
                "source": self.engine.rules_source,
                "evaluation_interval_seconds": self.engine.settings.evaluation_interval_seconds,
                "alert_rules": self.engine.rules_data(),
            }
        )

    async def put_rules(self, request: Request) -> Response:
        principal = self._admin(request)
        body = await self._json(request)
        try:
            rules = parse_rules(body, self.engine.settings)
        except RuleErrors as exc:
            raise IrosError(
                422,
                "invalid alert rules: " + "; ".join(exc.errors),
                param="alert_rules",
                code="invalid_rules",
            ) from None
        await self.engine.set_rules(rules, principal.name)
        return await self.get_rules(request)

    async def reset_rules(self, request: Request) -> Response:
        principal = self._admin(request)
        await self.engine.set_rules(None, principal.name)
        return await self.get_rules(request)

    # --- channels -------------------------------------------------------------------------------
    async def list_channels(self, request: Request) -> Response:
        self._admin(request)
        notifier = self.engine.notifier
        stats = notifier.stats()
        outbox = await self.engine.store.outbox_stats()
        channels = [
            {**describe(c), **stats[name], "outbox": outbox.get(name, {})}
            for name, c in notifier.channels.items()
        ]
        # Each channel hides its own secrets; a URL's userinfo in an error or a target is hidden here too.
        return JSONResponse({"channels": redact_urls(channels)})

    async def test_channel(self, request: Request) -> Response:
        self._admin(request)
        name = request.path_params["name"]
        if name not in self.engine.notifier.channels:
            known = ", ".join(self.engine.notifier.channels) or "none"
            raise IrosError(
                404, f"no channel {name!r}; configured: {known}", param="name", code="channel_not_found"
            )
        try:
            await self.engine.notifier.test(name)
        except ChannelError as exc:
            raise IrosError(502, f"channel {name!r} failed: {exc}", code="channel_failed") from None
        return JSONResponse({"channel": name, "sent": True})

    async def status(self, request: Request) -> Response:
        self._admin(request)
        e = self.engine
        return JSONResponse(
            {
                "leader": e.leader,
                "evaluations": e.evaluations,
                "last_evaluation": iso(e.last_evaluation) if e.last_evaluation else None,
                "last_error": e.last_error,
                "rules": len(e.rules),
                "rules_source": e.rules_source,
                "active": len(e.current),
            }
        )


def _int(raw: str | None, default: int, low: int, high: int, param: str) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad(f"{param} must be a whole number", param) from None
    if not low <= value <= high:
        raise bad(f"{param} must be between {low} and {high}", param)
    return value
