"""The HTTP API, one module per URL prefix: system, metrics, live, monitoring, alerts, optimization,
analysis, and the OpenAPI document (openapi)."""
