"""W3C trace context: a client's `traceparent` read, the one an upstream call carries written.

Only used while traces are exported (OTEL_* set): the gateway then makes a TraceContext per request, and
the OpenAI backend adds UPSTREAM_TRACEPARENT's value to its call. The spans themselves are built later,
off the request path, from the RequestRecord (iros/otel/export.py).

ctx = TraceContext.start(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
ctx.trace_id, ctx.parent_id            # the client's trace, its span as the parent of ours
UPSTREAM_TRACEPARENT.set(ctx.upstream_header())
"""

from __future__ import annotations

import random
from contextvars import ContextVar
from dataclasses import dataclass

# The traceparent the upstream call of the current request carries; None when traces are off.
UPSTREAM_TRACEPARENT: ContextVar[str | None] = ContextVar("iros_upstream_traceparent", default=None)

_HEX = frozenset("0123456789abcdef")


@dataclass(slots=True, frozen=True)
class TraceContext:
    trace_id: int
    parent_id: int  # the client's span (0: Iros starts the trace)
    span_id: int  # the request's span
    upstream_id: int  # the span of the call to the model server: the upstream's parent
    sampled: bool

    @classmethod
    def start(cls, traceparent: bytes | None, sampled: bool = True) -> TraceContext:
        """Continue the client's trace when its traceparent is valid, else start one (`sampled` then)."""
        parent = parse(traceparent) if traceparent else None
        bits = random.getrandbits
        span_id, upstream_id = bits(64) or 1, bits(64) or 1
        if parent is None:
            return cls(bits(128) or 1, 0, span_id, upstream_id, sampled)
        trace_id, parent_id, parent_sampled = parent
        return cls(trace_id, parent_id, span_id, upstream_id, parent_sampled)

    def upstream_header(self) -> str:
        return f"00-{self.trace_id:032x}-{self.upstream_id:016x}-{'01' if self.sampled else '00'}"


def parse(header: bytes) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a valid traceparent; None for anything else (the spec
    says to start a new trace then)."""
    try:
        text = header.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    parts = text.split("-")
    if (
        len(parts) < 4
        or [len(p) for p in parts[:4]] != [2, 32, 16, 2]
        or not _HEX.issuperset("".join(parts[:4]))
    ):
        return None
    version, trace, span, flags = parts[:4]
    # Version ff is invalid; version 00 has exactly four fields (later versions may add more).
    if version == "ff" or (version == "00" and len(parts) != 4):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)
