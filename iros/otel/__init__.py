"""OpenTelemetry export: traces and GenAI metrics over OTLP, switched on by the standard OTEL_* variables.

env (which signals, which protocol; no SDK import), export (Telemetry: the SDK, spans built from each
RequestRecord off the request path, the GenAI instruments). Nothing here is imported unless OTEL_* asks.
"""
