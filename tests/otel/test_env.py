"""Which signals the OTEL_* variables switch on, read without the SDK."""

from __future__ import annotations

import pytest

from iros.config import ConfigError
from iros.otel.env import OtelEnv

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


def test_nothing_set_exports_nothing() -> None:
    """No OTEL_* variable: no signal, whatever the SDK's own default would be."""
    assert OtelEnv.read({}) is None
    assert OtelEnv.read({"OTEL_SERVICE_NAME": "iros"}) is None


def test_an_endpoint_switches_on_traces_and_metrics_over_otlp() -> None:
    """An OTLP endpoint alone exports both signals."""
    assert OtelEnv.read(ENDPOINT) == OtelEnv(("otlp",), ("otlp",))


def test_a_signal_endpoint_switches_on_only_that_signal() -> None:
    """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT alone exports traces only."""
    assert OtelEnv.read({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x/v1/traces"}) == OtelEnv(
        ("otlp",), ()
    )


def test_exporter_variables_choose_per_signal() -> None:
    """`none` switches a signal off; a named exporter switches it on without an endpoint."""
    assert OtelEnv.read({**ENDPOINT, "OTEL_METRICS_EXPORTER": "none"}) == OtelEnv(("otlp",), ())
    assert OtelEnv.read({"OTEL_TRACES_EXPORTER": "console"}) == OtelEnv(("console",), ())


def test_the_sdk_disabled_flag_wins() -> None:
    """OTEL_SDK_DISABLED=true exports nothing even with an endpoint."""
    assert OtelEnv.read({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}) is None


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL='grpc'"),
        (
            {**ENDPOINT, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        ),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "unknown exporter zipkin"),
    ],
)
def test_values_iros_cannot_honour_are_refused_by_name(env: dict[str, str], names: str) -> None:
    """An unsupported protocol or exporter stops the start with a message naming the variable."""
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        OtelEnv.read(env)
    assert names in str(info.value)
