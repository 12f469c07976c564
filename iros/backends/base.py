"""What every backend is: one kind of model server turned into completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from iros.core.schema import Operation
from iros.core.spans import Spans


@dataclass(slots=True)
class Completion:
    """A whole (non-streamed) completion: the bytes as the model server sent them, and their parse."""

    body: bytes
    data: dict[str, Any]


@dataclass(slots=True)
class Readiness:
    ready: bool
    detail: str


class Backend(Protocol):
    """Turns one payload into a completion (or, for `operation` "embeddings", the embeddings list). Raises
    UpstreamError on failure. `operation` says which OpenAI endpoint: chat, text_completion, embeddings.

    `stream` yields the data of each server-sent event (the JSON after "data: "), and ends without
    error only once the model server said [DONE]: a stream cut short raises UpstreamError("truncated").
    Nothing is sent upstream until the first item is awaited, so a caller can retry until then.
    """

    async def complete(
        self, payload: dict[str, Any], spans: Spans, operation: Operation = "chat"
    ) -> Completion: ...

    def stream(
        self, payload: dict[str, Any], spans: Spans, operation: Operation = "chat"
    ) -> AsyncIterator[bytes]: ...

    async def ready(self) -> Readiness: ...

    async def aclose(self) -> None: ...
