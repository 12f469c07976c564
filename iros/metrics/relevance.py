"""Question-answer relevance: how much of a question's content words an answer takes up.

relevance(record)   # 0.75 when the answer uses three of the question's four content words; None when
                    # there is no question text or no answer
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from iros.core.record import RequestRecord

_WORD = re.compile(r"[a-z0-9]+")
_STOP_WORDS = (
    "a an and are as at be by can could do does for from had has have how i in is it its me my of on or "
    "should so than that the their them then there these they this to was we were what when where which "
    "who why will with would you your"
)
_STOP = frozenset(_STOP_WORDS.split())


def relevance(record: RequestRecord) -> float | None:
    """Question-answer relevance: the share of the question's content words the answer takes up.

    A lexical measure, cheap enough to run on a sample of responses off the request path.
    """
    question = _last_user_text(record.payload)
    answer = _answer_text(record)
    if not question or answer is None:
        return None
    asked = {w for w in _WORD.findall(question.lower()) if w not in _STOP}
    if not asked:
        return None
    said = set(_WORD.findall(answer.lower()))
    return len(asked & said) / len(asked)


def _last_user_text(payload: dict[str, Any] | None) -> str | None:
    for message in reversed((payload or {}).get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return None


def _answer_text(record: RequestRecord) -> str | None:
    try:
        if record.answer is not None:
            return str(record.answer["choices"][0]["message"].get("content") or "")
        if record.chunk_log is not None:
            parts = []
            for raw in record.chunk_log:
                choices = orjson.loads(raw).get("choices") or []
                if choices:
                    parts.append((choices[0].get("delta") or {}).get("content") or "")
            return "".join(parts)
    except (KeyError, IndexError, TypeError, AttributeError, orjson.JSONDecodeError):
        return None
    return None
