"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any, Literal

import orjson

from iros.core.redact import redact_text


class IrosError(Exception):
    """An error a client sees, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return orjson.dumps(self.payload())


def bad(message: str, param: str | None = None, code: str = "invalid_parameter") -> IrosError:
    """The 400 every API raises for a bad parameter or body: `raise bad("limit must be 1-1000", "limit")`."""
    return IrosError(400, message, param=param, code=code)


def error_path(loc: tuple[int | str, ...], tagged: tuple[str, ...] = ()) -> str:
    """A pydantic error location as a path: ("messages", 0, "user", "content") -> "messages[0].content".

    Union branches and validators appear in locations ("str", "KeyEntry", "function-after[...]") but are
    not fields; neither is the discriminator tag after an item of a `tagged` list (a message's role).
    """
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        branch = part == "str" or part[:1].isupper() or "[" in part or "(" in part
        tag = i >= 2 and isinstance(loc[i - 1], int) and loc[i - 2] in tagged
        if not (branch or tag):
            out += f".{part}" if out else part
    return out


UpstreamKind = Literal["connect", "timeout", "status", "protocol", "truncated"]
# What a client is told of each kind of failure: never the model server's address, which may hold
# credentials (and is the operator's business); the log has the details, userinfo redacted.
_TOLD = {
    "connect": "could not connect to the model server",
    "timeout": "the model server did not answer in time",
    "protocol": "the model server answered with something other than a completion",
    "truncated": "the model server cut the answer short",
}


class UpstreamError(Exception):
    """A backend failed. `retryable` says whether another attempt (or deployment) may succeed.

    The message is for the log: a URL's userinfo in it is redacted here, whoever raised it.
    """

    def __init__(
        self, message: str, *, kind: UpstreamKind, status: int | None = None, body: bytes | None = None
    ) -> None:
        super().__init__(redact_text(message))
        self.kind = kind
        self.status = status
        self.body = body

    @property
    def retryable(self) -> bool:
        if self.kind == "status":
            return self.status is not None and (self.status >= 500 or self.status in (408, 409, 429))
        return True

    def to_client(self, model: str) -> IrosError:
        """What the client is told once no attempt is left: the model and the kind of failure."""
        if self.kind == "timeout":
            return IrosError(
                504, f"model {model!r}: {_TOLD['timeout']}", type="upstream_error", code="upstream_timeout"
            )
        if self.kind == "status" and self.status is not None and 400 <= self.status < 500:
            if self.status in (401, 403):
                # The gateway's own upstream credentials are wrong; the client's key is not at fault.
                return IrosError(
                    502,
                    f"model {model!r}: the model server rejected Iros's credentials",
                    type="upstream_error",
                    code="upstream_auth",
                )
            if self.status == 429:
                return IrosError(
                    429,
                    "upstream is rate limiting; retry later",
                    type="rate_limit_error",
                    code="upstream_rate_limited",
                    headers={"retry-after": "1"},
                )
            return _passthrough(self, model)
        told = _TOLD.get(self.kind) or f"the model server answered HTTP {self.status}"
        return IrosError(502, f"model {model!r}: {told}", type="upstream_error", code=f"upstream_{self.kind}")


def _passthrough(exc: UpstreamError, model: str) -> IrosError:
    # A 4xx from the model server is about the request: relay its message.
    message, param, code = f"model {model!r}: the model server answered HTTP {exc.status}", None, None
    try:
        err = orjson.loads(exc.body or b"{}").get("error")
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            param, code = err.get("param"), err.get("code")
        elif isinstance(err, str):
            message = err
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return IrosError(exc.status or 400, redact_text(message), param=param, code=code)


class StoreUnavailable(Exception):
    """The store cannot answer now (Prometheus down, database unreadable); the message says why."""
