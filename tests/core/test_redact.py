"""Userinfo never leaves in text, and a client's string stays one field of one log line."""

from __future__ import annotations

import pytest

from iros.core.errors import UpstreamError
from iros.core.redact import log_value, redact_text, redact_url, redact_urls


class TestRedaction:
    @pytest.mark.parametrize(
        ("url", "shown"),
        [
            ("http://user:pass@host:8000/v1", "http://***@host:8000/v1"),
            ("redis://:hunter2@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
            ("https://token@api.example.com/v1", "https://***@api.example.com/v1"),
            ("http://u:p@ss@host/v1", "http://***@host/v1"),
            ("http://host:8000/v1?contact=a@b", "http://host:8000/v1?contact=a@b"),
            ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ],
    )
    def test_a_urls_userinfo_is_replaced_and_nothing_else(self, url: str, shown: str) -> None:
        """The user name and password go, the scheme, host, port, path and query stay."""
        assert redact_url(url) == shown

    def test_every_url_in_a_message_or_a_tree_is_redacted(self) -> None:
        """Messages and JSON trees (the settings as shown) lose every URL's userinfo."""
        text = "cannot reach http://a:b@h1/v1 nor https://c:d@h2/v1: refused"
        assert redact_text(text) == "cannot reach http://***@h1/v1 nor https://***@h2/v1: refused"
        tree = {"models": [{"base_url": "http://a:b@h/v1", "weight": 1}], "name": "x@y"}
        assert redact_urls(tree) == {"models": [{"base_url": "http://***@h/v1", "weight": 1}], "name": "x@y"}

    def test_an_upstream_error_carries_no_password_whoever_raised_it(self) -> None:
        """UpstreamError redacts its own message, and tells the client only the model and the kind."""
        exc = UpstreamError("cannot reach http://u:secret@h/v1/chat/completions: refused", kind="connect")
        assert "secret" not in str(exc) and "http://***@h/v1" in str(exc)
        told = exc.to_client("big")
        assert told.message == "model 'big': could not connect to the model server"
        assert told.status == 502 and told.code == "upstream_connect"


class TestLogValues:
    @pytest.mark.parametrize("name", ["gpt-4o", "llama3.1:8b", "org/model", "a_b.c"])
    def test_plain_names_are_logged_as_they_are(self, name: str) -> None:
        """A usual model name is printed bare."""
        assert log_value(name) == name

    @pytest.mark.parametrize("name", ["m\nINFO forged", "m\x00", "m status=200", 'm"', "m\r\n"])
    def test_anything_that_could_forge_a_line_or_field_is_quoted(self, name: str) -> None:
        """Newlines, NUL, spaces and quotes come back JSON-quoted: one value, printable, on one line."""
        logged = log_value(name)
        assert logged.startswith('"') and logged.isprintable() and "\n" not in logged

    def test_a_long_value_is_cut(self) -> None:
        """An 8 MB model name costs the log 200 characters."""
        assert len(log_value("x " * 4_000_000)) < 210
