"""Property tests of request normalisation: any bytes or JSON are parsed or refused with a 400, and a
valid request is kept as sent, for any input, not only the examples the other tests pick."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iros.core.errors import IrosError
from iros.core.schema import parse_request
from tests.strategies import PROPERTY, json_values, valid_requests


class TestRequestNormalisation:
    @PROPERTY
    @given(st.binary(max_size=300))
    def test_any_bytes_are_parsed_or_refused_with_a_400(self, body: bytes) -> None:
        """Whatever bytes arrive, parsing either succeeds or raises a 400 IrosError with a message."""
        try:
            parse_request(body)
        except IrosError as exc:
            assert exc.status == 400
            assert exc.message

    @PROPERTY
    @given(json_values)
    def test_any_json_value_is_parsed_or_refused_with_a_400(self, value: Any) -> None:
        """Any JSON document, object or not, is accepted or refused with a 400 in the OpenAI shape."""
        try:
            parse_request(json.dumps(value).encode())
        except IrosError as exc:
            assert exc.status == 400
            assert set(exc.payload()["error"]) == {"message", "type", "param", "code"}

    @PROPERTY
    @given(valid_requests)
    def test_a_valid_request_is_kept_as_sent(self, request: dict[str, Any]) -> None:
        """A valid request parses, and the data forwarded upstream is exactly what the client sent."""
        parsed = parse_request(orjson.dumps(request))
        assert parsed.data == request
        assert parsed.model == request["model"]
        assert parsed.stream is request["stream"]

    @PROPERTY
    @given(valid_requests, st.floats(2.0001, 1e6) | st.floats(-1e6, -0.0001))
    def test_an_out_of_range_temperature_names_the_field(
        self, request: dict[str, Any], temperature: float
    ) -> None:
        """A temperature outside 0..2 is refused with param "temperature"."""
        with pytest.raises(IrosError) as info:
            parse_request(orjson.dumps({**request, "temperature": temperature}))
        assert info.value.status == 400
        assert info.value.param == "temperature"


# --- the cache key --------------------------------------------------------------------------------
