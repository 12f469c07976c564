"""Which OpenTelemetry signals the standard OTEL_* variables ask for; read without importing the SDK.

otel = OtelEnv.read(os.environ)    # None: nothing asked for (no OTLP endpoint, no exporter named)
otel.traces, otel.metrics           # ("otlp",), () ...

A signal is on when its exporter variable names one (`OTEL_TRACES_EXPORTER=otlp`), or when it is unset
and an OTLP endpoint is (`OTEL_EXPORTER_OTLP_ENDPOINT`, or the signal's own). The SDK's own default
(`otlp` to localhost:4318 with nothing set) is not followed: an Iros with no OTEL_* exports nothing.
Everything else (endpoint, headers, timeout, compression, service name and resource attributes, the
sampler, batch and export intervals) the SDK reads from the same variables itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from iros.config import ConfigError

EXPORTERS = frozenset({"otlp", "console"})
PROTOCOLS = ("http/protobuf",)


@dataclass(frozen=True, slots=True)
class OtelEnv:
    traces: tuple[str, ...]
    metrics: tuple[str, ...]

    @classmethod
    def read(cls, env: Mapping[str, str]) -> OtelEnv | None:
        """The signals asked for; None when none is. Raises ConfigError naming a value Iros cannot honour."""
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        traces = _exporters(env, "TRACES")
        metrics = _exporters(env, "METRICS")
        if not traces and not metrics:
            return None
        for signal, on in (("TRACES", traces), ("METRICS", metrics)):
            if "otlp" not in on:
                continue
            name = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
            if name not in env:
                name = "OTEL_EXPORTER_OTLP_PROTOCOL"
            protocol = env.get(name, "http/protobuf").strip()
            if protocol not in PROTOCOLS:
                raise ConfigError(
                    f"invalid configuration:\n  {name}={protocol!r}: Iros exports OTLP over "
                    f"{', '.join(PROTOCOLS)} (point it at the collector's HTTP port, 4318)"
                )
        return cls(traces, metrics)


def _exporters(env: Mapping[str, str], signal: str) -> tuple[str, ...]:
    name = f"OTEL_{signal}_EXPORTER"
    raw = env.get(name)
    if raw is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
        return ("otlp",) if endpoint else ()
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    if names in ((), ("none",)):
        return ()
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ConfigError(
            f"invalid configuration:\n  {name}={raw!r}: unknown exporter {', '.join(unknown)}; "
            f"known: {', '.join(sorted(EXPORTERS))}, none"
        )
    return names
