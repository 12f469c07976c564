"""The OpenAI chat-completions request, validated; fields Iros does not know pass through untouched.

request = parse_request(body_bytes)     # raises IrosError(400) naming the bad field
request.data                            # the JSON as the client sent it, to forward
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from iros.core.errors import IrosError, error_path
from iros.core.limits import MAX_NESTING, json_depth


class _Loose(BaseModel):
    # Servers add fields (vLLM's guided_json, Ollama's options, ...): keep them.
    model_config = ConfigDict(extra="allow")


class TextPart(_Loose):
    type: str
    text: str | None = None


Content = str | list[TextPart] | None


class FunctionCall(_Loose):
    name: str
    arguments: str


class ToolCall(_Loose):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Loose):
    role: Literal["system", "developer"]
    content: str | list[TextPart]


class UserMessage(_Loose):
    role: Literal["user"]
    content: str | list[TextPart]


class AssistantMessage(_Loose):
    role: Literal["assistant"]
    content: Content = None
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Loose):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


class FunctionMessage(_Loose):
    role: Literal["function"]
    content: str | None
    name: str


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]


class FunctionDef(_Loose):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Loose):
    type: Literal["function"]
    function: FunctionDef


class ResponseFormat(_Loose):
    type: Literal["text", "json_object", "json_schema"]


class StreamOptions(_Loose):
    include_usage: bool = False


class ChatCompletionRequest(_Loose):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1, description="one choice per request")
    user: str | None = Field(None, max_length=256)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop takes at most 4 sequences")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


_validator = TypeAdapter(ChatCompletionRequest)


@dataclass(slots=True)
class ParsedRequest:
    data: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool


def parse_request(body: bytes) -> ParsedRequest:
    if not body:
        raise IrosError(
            400, "the request body is empty; send a JSON chat-completions request", code="invalid_json"
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise IrosError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise IrosError(400, "the request body must be a JSON object", code="invalid_json")
    # Fewer brackets than the bound cannot nest past it: a small request skips the walk (counting is a
    # third of walking); a large one walks its few containers rather than scan megabytes of text.
    small = len(body) <= 65536
    if (not small or body.count(b"[") + body.count(b"{") > MAX_NESTING) and json_depth(data) > MAX_NESTING:
        raise IrosError(
            400,
            f"the request nests JSON objects and arrays more than {MAX_NESTING} levels deep",
            code="nesting_too_deep",
        )
    try:
        req = _validator.validate_python(data)
    except ValidationError as exc:
        raise _invalid(exc) from None
    return ParsedRequest(
        data=data,
        model=req.model,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


def _invalid(exc: ValidationError) -> IrosError:
    err = exc.errors()[0]
    param = _param(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return IrosError(400, f"{param or 'body'}: {msg}{more}", param=param, code="invalid_value")


def _param(loc: tuple[int | str, ...]) -> str | None:
    return error_path(loc, tagged=("messages",)) or None
