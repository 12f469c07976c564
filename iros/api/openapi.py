"""Iros's own OpenAPI 3.1 document, built from the routes the app really has.

    GET /openapi.json                   # public, like every API's description

Every route appears with its methods, path parameters and who may call it (public, any key, admin key).
Every 4xx is declared in the OpenAI error shape, so a tool such as Schemathesis can check that whatever
bad input arrives, the answer is a documented error and never a 5xx. The model API's request schemas (chat
completions, completions, embeddings) are the pydantic models the gateway validates with; other bodies
are declared as JSON objects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from starlette.routing import BaseRoute, Route

from iros import __version__
from iros.core.schema import OPERATIONS, SCHEMAS, Operation

# Who may call what, by path; the app's handlers enforce it, tests/test_security.py checks both agree.
_PUBLIC = re.compile(r"^/(health|ready|openapi\.json)$|^/dashboard/(login|logout|static|assets)")
_CLIENT = re.compile(r"^/v1/|^/api/feedback$|^/api/system/status$")
_PARAM = re.compile(r"\{([^}:]+)(?::[^}]+)?\}")

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
COMPLETION = {
    "type": "object",
    "required": ["id", "object", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object"}},
        "usage": {"type": ["object", "null"]},
    },
}
TEXT_COMPLETION = {
    **COMPLETION,
    "properties": {**COMPLETION["properties"], "object": {"const": "text_completion"}},  # type: ignore[dict-item]
}
EMBEDDINGS = {
    "type": "object",
    "required": ["object", "data", "model"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {"type": "object"}},
        "model": {"type": "string"},
        "usage": {"type": ["object", "null"]},
    },
}
ANSWERS: dict[Operation, dict[str, Any]] = {
    "chat": COMPLETION,
    "text_completion": TEXT_COMPLETION,
    "embeddings": EMBEDDINGS,
}
MODELS = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object"}}},
}


def role(path: str) -> str:
    """ "public", "client" or "admin": what a caller of `path` needs."""
    if _PUBLIC.search(path):
        return "public"
    return "client" if _CLIENT.search(path) else "admin"


def _content(path: str) -> dict[str, Any]:
    if path == "/metrics":
        return {"text/plain": {"schema": {"type": "string"}}}
    if path.endswith("/stream"):
        return {"text/event-stream": {"schema": {"type": "string"}}}
    if path.startswith("/dashboard"):  # pages and their assets (html, scripts, styles)
        return {"*/*": {"schema": {}}}
    if path == "/v1/models":
        return {"application/json": {"schema": MODELS}}
    return {"application/json": {"schema": {}}}


def _operation(path: str, method: str, name: str) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": f"{method}_{name}_{re.sub(r'[^a-z0-9]+', '_', path.lower()).strip('_')}",
        "tags": [role(path)],
        "responses": {
            "2XX": {"description": "success", "content": _content(path)},
            "4XX": {
                "description": "the request cannot be served as sent",
                "content": {"application/json": {"schema": ERROR}},
            },
            "503": {
                "description": "a part Iros needs is unavailable",
                "content": {"application/json": {"schema": ERROR}},
            },
        },
    }
    if path.startswith("/dashboard"):
        op["responses"]["303"] = {"description": "to the login form"}
        # The login form answers a wrong key with the form again, as a page.
        op["responses"]["4XX"]["content"]["text/html"] = {"schema": {"type": "string"}}
    if role(path) == "public":
        op["security"] = []
    params = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for p in _PARAM.findall(path)
    ]
    if params:
        op["parameters"] = params
    if method in ("post", "put", "patch"):
        op["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    return op


def document(routes: Iterable[BaseRoute]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue  # the WebSocket stream is described in the README, not in OpenAPI
        spec = paths.setdefault(_PARAM.sub(r"{\1}", route.path), {})
        for method in sorted((route.methods or set()) - {"HEAD"}):
            spec[method.lower()] = _operation(route.path, method.lower(), route.name)
    schemas: dict[str, Any] = {}
    # The model API: served by the gateway pipeline, not by a route; one schema per operation.
    for path, operation in OPERATIONS.items():
        model = SCHEMAS[operation]
        op = _operation(path, "post", operation)
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
        op["responses"]["2XX"]["content"] = {
            "application/json": {"schema": ANSWERS[operation]},
            **({} if operation == "embeddings" else {"text/event-stream": {"schema": {"type": "string"}}}),
        }
        paths[path] = {"post": op}
        request_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update({model.__name__: request_schema, **request_schema.pop("$defs", {})})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Iros",
            "version": __version__,
            "description": "OpenAI-compatible gateway with caching, routing and monitoring.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
