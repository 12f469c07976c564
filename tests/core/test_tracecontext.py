"""W3C traceparent: read from a client, written for the upstream call."""

from __future__ import annotations

import pytest

from iros.core.tracecontext import TraceContext, parse

VALID = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_is_continued() -> None:
    """The trace id and the client's span (as parent) are kept, and so is its sampled flag."""
    ctx = TraceContext.start(VALID)
    assert ctx.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
    assert ctx.parent_id == 0x00F067AA0BA902B7
    assert ctx.sampled and ctx.span_id and ctx.upstream_id != ctx.span_id
    assert not TraceContext.start(VALID[:-2] + b"00").sampled


def test_the_upstream_header_names_the_upstream_span() -> None:
    """The model server's parent is Iros's upstream-call span, in the same trace."""
    ctx = TraceContext.start(VALID)
    assert ctx.upstream_header() == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{ctx.upstream_id:016x}-01"


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"garbage",
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 has four fields
        b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",  # not hex
        "00-é".encode(),
    ],
)
def test_an_invalid_traceparent_starts_a_new_trace(header: bytes) -> None:
    """Anything but a valid traceparent is ignored: Iros starts a trace of its own."""
    assert parse(header) is None
    ctx = TraceContext.start(header)
    assert ctx.parent_id == 0 and ctx.trace_id != 0 and ctx.sampled


def test_a_later_version_with_more_fields_is_read() -> None:
    """Versions after 00 may append fields; the first four are read."""
    assert parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future") is not None
