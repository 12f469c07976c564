"""What leaves Iros in text: URLs lose their userinfo (a password, a token in the user name), and a
client's strings lose what would forge a log line.

redact_url("http://user:pass@host:8000/v1")     # "http://***@host:8000/v1"
redact_text("cannot reach http://u:p@h/v1")     # every URL with userinfo inside a message
redact_urls({"models": [{"base_url": ...}]})    # the same for every string in a JSON tree
log_value("gpt-4o")                             # as is; 'm\\nINFO forged' comes back JSON-quoted
"""

from __future__ import annotations

import re
from typing import Any

import orjson

__all__ = ["log_value", "redact_text", "redact_url", "redact_urls"]

# scheme://userinfo@ : the userinfo runs to the last "@" before the path, query or fragment.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")
# A log value that cannot break a line or fake a field: printed as is; anything else is quoted.
_TOKEN = re.compile(r"[\w.:/@+=,-]{1,200}")
LOG_VALUE_CHARS = 200


def redact_url(url: str) -> str:
    """The URL with its userinfo (user name and password) replaced by ***."""
    return _USERINFO.sub(r"\1***@", url)


def redact_text(text: str) -> str:
    """A message with every URL's userinfo replaced by ***; text without one comes back unchanged."""
    return _USERINFO.sub(r"\1***@", text) if "@" in text else text


def redact_urls(tree: Any) -> Any:
    """A copy of a JSON-like tree in which every string holding a URL with userinfo is redacted."""
    if isinstance(tree, str):
        return redact_text(tree) if "://" in tree else tree
    if isinstance(tree, dict):
        return {k: redact_urls(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact_urls(v) for v in tree]
    return tree


def log_value(value: object) -> str:
    """A client's string as one field of a log line: plain tokens as they are, anything else (spaces,
    newlines, NUL, quotes) as a JSON string, cut at LOG_VALUE_CHARS."""
    text = str(value)
    if _TOKEN.fullmatch(text):
        return text
    cut = text[:LOG_VALUE_CHARS]
    try:
        quoted = orjson.dumps(cut).decode()
    except TypeError:  # a lone surrogate
        quoted = ascii(cut)
    return quoted + ("..." if len(text) > LOG_VALUE_CHARS else "")
