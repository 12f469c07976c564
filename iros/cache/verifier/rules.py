"""The hand-written rules the trees never override: the same words are one question, served at any cut;
prompts that share an instruction and differ in their input are never served each other's answers.

rule("What is AI?", "what is  AI")                                       # 1.0: serve
rule("Is this review friendly? The food was great.",
     "Is this review friendly? The service was slow.")                  # 0.0: refuse
rule("How do I learn Python?", "What is the best way to learn Python?")  # None: the trees decide
"""

from __future__ import annotations

import re
from functools import lru_cache

from iros.cache.verifier.text import APOSTROPHES, STOP, WORD, negative, parse, stem

__all__ = ["rule", "same_words", "shared_instruction", "wording"]

SHARED_WORDS = 3  # an instruction both prompts share: at least this many words, and half the shorter
# What ends an instruction: a question, a colon, a sentence, a line, a quote or a bracket. Not a comma or
# a dash, which join the parts of one sentence ("El Watan, an Algerian newspaper, reported that ..."),
# nor the period of an abbreviation or a time ("U.S. crackdown", "Oct. 24", "2:05 p.m. on Sunday").
_SEGMENT_END = re.compile(
    r"[?!;\n\"'()\[\]{}\u201c\u201d\u00ab\u00bb]|:(?!\d)|(?<=[A-Za-z0-9]{2})\.(?=\s+[^a-z0-9\s])"
)
_CASED_WORD = re.compile(WORD.pattern.replace("a-z", "a-zA-Z"))


@lru_cache(maxsize=4096)
def _segment_starts(text: str) -> tuple[bool, ...]:
    """For each of parse(text).words, whether a segment ends just before it (the first word: False)."""
    parsed = parse(text)  # the same call shared_instruction made: its words, from the cache
    text = text.translate(APOSTROPHES)
    words = list(_CASED_WORD.finditer(text))
    if tuple(m.group().lower() for m in words) != parsed.words:
        # Lowercasing changed where the words are (rare letters outside ASCII): no cue from case, then.
        text = text.lower()
        words = list(WORD.finditer(text))
    starts, end = [], None
    for match in words:
        starts.append(end is not None and _SEGMENT_END.search(text, end, match.start() + 1) is not None)
        end = match.end()
    return tuple(starts)


def _whole_segment(q: str, c: str, prefix: int, suffix: int) -> bool:
    """Whether the words both texts share at their start (`prefix` of them) or end (`suffix`) hold a
    whole segment: the shared part is an instruction of its own, not the first words of one sentence."""
    sq, sc = _segment_starts(q), _segment_starts(c)
    if any(sq[i] and sc[i] for i in range(1, prefix + 1) if i < len(sq) and i < len(sc)):
        return True
    return any(sq[len(sq) - i] and sc[len(sc) - i] for i in range(1, suffix + 1))


def shared_instruction(query: str, candidate: str) -> bool:
    """Two prompts that share an instruction and differ in their input ("Is this review friendly? The
    food was great." / "... The service was slow."): the shared words lift their cosine and their
    features alike, yet they ask about different things. True when the words around the shared prefix
    and suffix negate one side only, or substitute a content word on each side where the shared words
    hold a whole segment (a question, a clause before a colon, a sentence): a sentence reworded inside
    ("The poll had a margin of error of 2 points." / "The survey had ...") is the trees' to judge."""
    q, c = parse(query).words, parse(candidate).words
    shortest = min(len(q), len(c))
    prefix = 0
    while prefix < shortest and q[prefix] == c[prefix]:
        prefix += 1
    suffix = 0
    while suffix < shortest - prefix and q[-1 - suffix] == c[-1 - suffix]:
        suffix += 1
    shared = prefix + suffix
    if shared < SHARED_WORDS or 2 * shared < shortest or shared == len(q) == len(c):
        return False
    rest_q, rest_c = q[prefix : len(q) - suffix], c[prefix : len(c) - suffix]
    negated = [any(negative(w) for w in r) for r in (rest_q, rest_c)]
    if negated[0] != negated[1]:
        return True
    content_q = {stem(w) for w in rest_q if w not in STOP}
    content_c = {stem(w) for w in rest_c if w not in STOP}
    substituted = bool(content_q - content_c) and bool(content_c - content_q)
    return substituted and _whole_segment(query, candidate, prefix, suffix)


# Words and the symbols that carry meaning ("2+2" is not "2-2", "-5" not "5"); sentence punctuation,
# case and spacing ("e- commerce", "e-commerce") are not part of what is asked.
_TOKEN = re.compile(r"\w+(?:'\w+)?|-(?=\d)|[^\w\s.,;:!?'\"()\[\]{}-]")


@lru_cache(maxsize=4096)
def wording(text: str) -> tuple[str, ...]:
    """What a text asks, word by word: its words and meaningful symbols, lowercase, in order."""
    return tuple(_TOKEN.findall(text.translate(APOSTROPHES).lower()))


def same_words(query: str, candidate: str) -> bool:
    """The same words and symbols in the same order: one question, however cased, spaced or punctuated.
    Texts of punctuation alone have no words to be the same."""
    words = wording(query)
    return bool(words) and words == wording(candidate)


def rule(query: str, candidate: str) -> float | None:
    """What the hand-written rules decide before the trees: 1 (serve) for the same words, 0 (refuse) for
    a shared instruction with different inputs, None (the trees decide) otherwise."""
    if same_words(query, candidate):
        return 1.0
    return 0.0 if shared_instruction(query, candidate) else None
