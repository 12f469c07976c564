"""Hypothesis strategies the property tests share: JSON values, chat messages, valid requests."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Derandomized: CI sees the same examples every run; sweep wider by hand with --hypothesis-seed.
PROPERTY = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

text = st.text(min_size=1, max_size=40)
# What JSON can carry and orjson reads: no NaN or infinity, integers within 64 bits.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]), "content": text}),
        st.fixed_dictionaries({"role": st.just("assistant"), "content": text}),
    ),
    min_size=1,
    max_size=5,
)
# Fields Iros does not know (vLLM's guided_json, Ollama's options) must reach the upstream untouched.
extras = st.dictionaries(
    st.text(min_size=1, max_size=12).filter(lambda k: k not in _KNOWN), json_values, max_size=3
)
_KNOWN = {
    "model",
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "n",
    "user",
    "tools",
    "tool_choice",
    "response_format",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "iros",
}
valid_requests = st.builds(
    lambda model, msgs, temperature, top_p, max_tokens, stream, extra: {
        **extra,
        "model": model,
        "messages": msgs,
        **({"temperature": temperature} if temperature is not None else {}),
        **({"top_p": top_p} if top_p is not None else {}),
        **({"max_tokens": max_tokens} if max_tokens is not None else {}),
        "stream": stream,
    },
    text,
    messages,
    st.none() | st.floats(0, 2),
    st.none() | st.floats(0, 1),
    st.none() | st.integers(1, 100_000),
    st.booleans(),
    extras,
)
