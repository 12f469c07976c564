"""The simulated language model: deterministic text, honest token counts, realistic latency. No I/O.

    p = plan({"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 1}, PROFILES["instant"])
    p.content, p.finish_reason, p.completion_tokens     # same text for the same prompt and seed
    completion_body(p, "m", "chatcmpl-1")              # an OpenAI chat.completion object
    list(chunk_bodies(p, "m", "chatcmpl-1", include_usage=True))   # its chat.completion.chunk stream

The text depends only on the model name, the messages and `seed`, so caches and tests can rely on it;
the latency (`ttft_s`, `token_interval_s`) and whether a flaky model fails come from a separate,
non-deterministic generator. Sleeping is left to the callers (simulated.py, mock_server.py).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from iros.core.tokens import count_prompt_tokens, count_tokens, tokenize

Fault = Literal["error-500", "hang", "cut-stream"]

# Chunks a cut-stream fault delivers (the role chunk included) before the connection drops.
CUT_AFTER_CHUNKS = 3


@dataclass(frozen=True, slots=True)
class Profile:
    """How one simulated model behaves: latency, answer length, reliability and quality."""

    name: str
    ttft_ms: float  # median time to first token
    ttft_sigma: float  # lognormal sigma of the time to first token
    tokens_per_second: float  # math.inf: no delay between tokens
    output_tokens: float  # mean answer length
    output_sigma: float  # lognormal sigma of the answer length
    error_rate: float = 0.0  # probability of an HTTP 500
    accuracy: float = 0.8  # a quality score 0..1 that routing can weigh against speed
    fault: Fault | None = None


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("large", 350, 0.25, 35, 120, 0.35, accuracy=0.92),
        Profile("lightweight", 60, 0.25, 150, 60, 0.35, accuracy=0.80),
        Profile("instant", 0, 0, math.inf, 16, 0.2, accuracy=0.75),
        Profile("error-500", 5, 0, math.inf, 16, 0.2, accuracy=0.0, fault="error-500"),
        Profile("hang", 0, 0, math.inf, 16, 0.2, accuracy=0.0, fault="hang"),
        Profile("cut-stream", 10, 0, 500, 40, 0.2, accuracy=0.0, fault="cut-stream"),
        Profile("flaky", 60, 0.25, 150, 60, 0.35, error_rate=0.5, accuracy=0.80),
    )
}


class InvalidRequest(ValueError):
    """The payload cannot be answered; an HTTP server reports it as a 400 naming `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------------------------------------- words


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_DETERMINERS = _words("the the the a a this that each every one our your its another")
_ADJECTIVES = _words("""
    quick small large simple clear early late good new old great high low long short strong light dark
    bright quiet careful certain common different easy hard important local main major modern natural
    open private public ready real recent right similar single special useful whole wide young fresh
    full empty busy calm steady rapid gentle sharp smooth solid stable warm cold final basic central
    """)
_NOUNS = _words("""
    system answer question model request user server network cache river garden window teacher student
    city village market road bridge story book letter report plan idea method result problem reason
    process program language signal record table chart picture color sound voice music family friend
    child parent company team office project meeting budget price value level number amount moment
    morning evening season summer winter field forest mountain island ocean harbor engine machine tool
    device screen button message pattern structure feature detail choice change chance effect source
    response service client route path gateway token stream library kitchen doctor""")
_VERBS = _words("""
    finds builds keeps makes takes gives shows brings holds moves reads writes follows explains
    describes improves changes checks compares connects creates delivers expects handles includes
    measures needs offers opens prepares produces protects reaches receives reduces repeats returns
    saves sends serves shapes shares supports teaches tracks turns uses carries covers answers
    solves starts stops joins leaves meets notices orders passes places raises reflects""")
_ADVERBS = _words("""
    quickly often rarely always usually clearly quietly carefully simply slowly gently easily
    directly nearly finally probably certainly really still soon""")
_PREPOSITIONS = _words("""
    with for from near under over behind across along through into during after before without
    beyond beside around toward""")
_CONJUNCTIONS = _words("and but so while because although when since and")
_OPENERS = _words("However Today Meanwhile Usually Often Later Still Indeed Clearly Finally")
_VOWELS = frozenset("aeiou")


def _sentence(rng: random.Random, first: bool) -> list[str]:
    """One sentence as tokens, each word carrying its leading space (none before the text's first)."""
    words: list[str] = []
    if rng.random() < 0.2:
        words += [rng.choice(_OPENERS), ","]

    def noun_phrase() -> None:
        det = rng.choice(_DETERMINERS)
        adj = rng.choice(_ADJECTIVES) if rng.random() < 0.6 else None
        noun = rng.choice(_NOUNS)
        if det == "a" and (adj or noun)[0] in _VOWELS:
            det = "an"
        words.extend([det, adj, noun] if adj else [det, noun])

    def clause() -> None:
        noun_phrase()
        if rng.random() < 0.3:
            words.append(rng.choice(_ADVERBS))
        words.append(rng.choice(_VERBS))
        noun_phrase()
        if rng.random() < 0.5:
            words.append(rng.choice(_PREPOSITIONS))
            noun_phrase()

    clause()
    if rng.random() < 0.35:
        words += [",", rng.choice(_CONJUNCTIONS)]
        clause()
    words.append("." if rng.random() < 0.95 else "?")
    out: list[str] = []
    for i, word in enumerate(words):
        if i == 0:
            word = word[0].upper() + word[1:]
        if word in (",", ".", "?") or (first and i == 0):
            out.append(word)
        else:
            out.append(" " + word)
    return out


def _text(rng: random.Random, target: int) -> str:
    pieces = _sentence(rng, first=True)
    # Stop once close to the target: answers end on a whole sentence.
    while len(pieces) + 4 < target:
        pieces += _sentence(rng, first=False)
    return "".join(pieces)


def _phrase(rng: random.Random) -> str:
    return "".join(_sentence(rng, first=True)).rstrip(".?")


# ---------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class Plan:
    """One answer, decided up front: what is said, how it is counted, and how fast it comes."""

    pieces: list[str]  # the content, one piece per stream chunk
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int  # len(pieces), or the tokens of the tool calls' names and arguments
    ttft_s: float
    token_interval_s: float
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    fault: Fault | None = None  # the failure this request plays out (a flaky profile's dice included)

    @property
    def content(self) -> str | None:
        return None if self.tool_calls else "".join(self.pieces)

    @property
    def duration_s(self) -> float:
        """Time to the last token when streamed."""
        return self.ttft_s + max(len(self.pieces) - 1, 0) * self.token_interval_s

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


_LATENCY = random.Random()


def plan(payload: dict[str, Any], profile: Profile, rng_latency: random.Random | None = None) -> Plan:
    """Decide the answer to a chat-completion payload. Raises InvalidRequest for a payload no model takes.

    The text is a function of (model, messages, seed) only; `rng_latency` (default: one randomly
    seeded generator shared by all callers) decides the latency and a flaky profile's failures.
    """
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("'messages' must be a non-empty array of message objects", "messages")
    cap = _max_tokens(payload)
    stops = _stops(payload.get("stop"))
    rng = random.Random(_digest(payload, messages))
    lat = rng_latency or _LATENCY

    tool_calls = _tool_calls(payload, rng)
    if tool_calls:
        pieces: list[str] = []
        completion_tokens = sum(
            count_tokens(c["function"]["name"]) + count_tokens(c["function"]["arguments"]) for c in tool_calls
        )
        finish_reason = "tool_calls"
    else:
        mu = math.log(max(profile.output_tokens, 1)) - profile.output_sigma**2 / 2
        target = max(1, round(rng.lognormvariate(mu, profile.output_sigma)))
        text = _json_content(payload, rng, target) or _text(rng, target)
        finish_reason = "stop"
        for stop in stops:
            # The earliest stop string wins; the answer ends just before it.
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
        pieces = tokenize(text)
        if cap is not None and len(pieces) > cap:
            pieces, finish_reason = pieces[:cap], "length"
        completion_tokens = len(pieces)

    ttft, interval, fault = timing(profile, lat)
    return Plan(
        pieces=pieces,
        finish_reason=finish_reason,
        prompt_tokens=count_prompt_tokens(messages),
        completion_tokens=completion_tokens,
        ttft_s=ttft,
        token_interval_s=interval,
        tool_calls=tool_calls,
        fault=fault,
    )


def timing(profile: Profile, lat: random.Random | None = None) -> tuple[float, float, Fault | None]:
    """One answer's time to first token, interval between tokens, and the fault it plays out."""
    lat = lat or _LATENCY
    ttft = profile.ttft_ms / 1000 * lat.lognormvariate(0, profile.ttft_sigma) if profile.ttft_ms > 0 else 0.0
    interval = 0.0
    if math.isfinite(profile.tokens_per_second) and profile.tokens_per_second > 0:
        interval = lat.lognormvariate(0, 0.1) / profile.tokens_per_second
    fault = profile.fault
    if fault is None and profile.error_rate > 0 and lat.random() < profile.error_rate:
        fault = "error-500"
    return ttft, interval, fault


def _digest(payload: dict[str, Any], messages: list[dict[str, Any]]) -> int:
    try:
        canonical = orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)
        seed = orjson.dumps(payload.get("seed"))
    except orjson.JSONEncodeError as exc:
        raise InvalidRequest(f"the request is not plain JSON: {exc}") from None
    model = str(payload.get("model") or "").encode()
    return int.from_bytes(hashlib.sha256(model + b"\0" + canonical + b"\0" + seed).digest())


def _max_tokens(payload: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidRequest(f"'{name}' must be a positive integer", name)
        return value
    return None


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise InvalidRequest("'stop' must be a string or an array of strings", "stop")


def _tool_calls(payload: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
    given = payload.get("tools") or ()
    tools = [t for t in given if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    choice = payload.get("tool_choice")
    if not tools:
        return []
    if choice == "required":
        name = str(rng.choice(tools)["function"].get("name") or "tool")
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = str(choice["function"].get("name") or "tool")
    else:
        return []
    call_id = "call_" + "".join(rng.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(24))
    return [{"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}]


def _json_content(payload: dict[str, Any], rng: random.Random, target: int) -> str | None:
    """JSON mode: {"answer": "..."}, or an object shaped like a json_schema's properties."""
    fmt = payload.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
        return None
    schema = (fmt.get("json_schema") or {}).get("schema") if fmt.get("type") == "json_schema" else None
    if isinstance(schema, dict) and isinstance(schema.get("properties"), dict) and schema["properties"]:
        value = _fill(schema, schema, rng, 0)
    else:
        value = {"answer": _text(rng, target)}
    return orjson.dumps(value).decode()


def _fill(schema: Any, root: dict[str, Any], rng: random.Random, depth: int) -> Any:
    """A value that satisfies the common shapes of a JSON schema (local $refs, anyOf, enums, nesting)."""
    if not isinstance(schema, dict):
        return _phrase(rng)
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and depth < 8:
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _fill(target, root, rng, depth + 1)
    for key in ("anyOf", "oneOf"):
        options = [o for o in schema.get(key) or () if isinstance(o, dict) and o.get("type") != "null"]
        if options:
            return _fill(options[0], root, rng, depth + 1)
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return rng.choice(schema["enum"])
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {k: _fill(v, root, rng, depth + 1) for k, v in props.items()} if depth < 6 else {}
    if kind == "array":
        if depth >= 6:
            return []
        return [_fill(schema.get("items"), root, rng, depth + 1) for _ in range(rng.randint(1, 3))]
    if kind == "integer":
        return rng.randint(0, 100)
    if kind == "number":
        return round(rng.uniform(0, 100), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return _phrase(rng)


# ---------------------------------------------------------------------------------------------- bodies


def new_request_id() -> str:
    return "chatcmpl-" + random.getrandbits(96).to_bytes(12).hex()


def completion_body(plan: Plan, model: str, request_id: str) -> dict[str, Any]:
    """The plan as an OpenAI chat.completion object."""
    message: dict[str, Any] = {"role": "assistant", "content": plan.content, "refusal": None}
    if plan.tool_calls:
        message["tool_calls"] = plan.tool_calls
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "iros-simulated",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": plan.finish_reason}],
        "usage": plan.usage,
    }


def chunk_bodies(plan: Plan, model: str, request_id: str, include_usage: bool) -> Iterator[dict[str, Any]]:
    """The plan as OpenAI chat.completion.chunk objects: a role chunk, one chunk per piece (or tool call
    deltas), a finish chunk, and with `include_usage` a last chunk with no choices and the usage."""
    created = int(time.time())
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "iros-simulated",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            **extra,
        }

    yield chunk({"role": "assistant", "content": ""})
    for piece in plan.pieces:
        yield chunk({"content": piece})
    for i, call in enumerate(plan.tool_calls):
        # As OpenAI streams them: the call's identity first, then its arguments.
        head = {"name": call["function"]["name"], "arguments": ""}
        yield chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function", "function": head}]})
        yield chunk({"tool_calls": [{"index": i, "function": {"arguments": call["function"]["arguments"]}}]})
    yield chunk({}, plan.finish_reason)
    if include_usage:
        yield {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "iros-simulated",
            "choices": [],
            "usage": plan.usage,
        }
