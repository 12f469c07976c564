"""Schemathesis against Iros's own OpenAPI document: whatever it sends, no 5xx, and every answer is one
the document declares (errors in the OpenAI shape)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import ignored_auth, positive_data_acceptance

from iros.testing.iros import IrosProcess
from tests.conftest import ADMIN_KEY, CLIENT_KEY

pytestmark = pytest.mark.e2e

AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def server(upstream: IrosProcess) -> Iterator[IrosProcess]:
    config = {
        "server": {"data_dir": tempfile.mkdtemp(prefix="iros-openapi-")},
        "auth": {"api_keys": [CLIENT_KEY], "admin_keys": [ADMIN_KEY]},
        "cache": {"enabled": True, "semantic": False},
        "models": [
            {"name": "fast", "base_url": f"{upstream.url}/v1", "upstream_model": "instant", "group": "chat"},
            {"name": "local", "backend": "simulated", "profile": "instant"},
        ],
    }
    with IrosProcess.serve(config) as proc:
        yield proc


@pytest.fixture(scope="module")
def api_schema(server: IrosProcess) -> Any:
    loaded = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    # Live streams never end: they are checked by the metrics tests, not by a fuzzer waiting for the end.
    return loaded.exclude(path_regex=r"/stream$")


def test_the_document_lists_every_route(server: IrosProcess) -> None:
    """/openapi.json is public and describes the model API, the admin API and the errors."""
    doc = httpx.get(f"{server.url}/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert "/v1/chat/completions" in doc["paths"]
    assert "/api/metrics/current" in doc["paths"]
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert "ChatCompletionRequest" in doc["components"]["schemas"]


def test_no_input_gets_a_server_error_or_an_undeclared_answer(api_schema: Any) -> None:
    """Any generated request to any operation, valid or not, gets a declared answer and never a 5xx."""
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) > 20
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=6, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def exercise(case: Any) -> None:
            # Who may call what is tests/test_security.py's matrix: here every call carries the admin key.
            # Bodies other than chat's are declared as plain objects, so "schema-valid" says little about
            # them; each endpoint's own tests check what it accepts.
            case.call_and_validate(
                headers=AUTH, timeout=30, excluded_checks=[ignored_auth, positive_data_acceptance]
            )

        try:
            exercise()
        except (Exception, BaseExceptionGroup) as exc:  # every operation's failure, not only the first
            failures.append(f"{operation.label}: {str(exc)[:600]}")
    assert failures == [], "\n\n".join(failures)
