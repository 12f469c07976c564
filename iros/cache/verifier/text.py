"""What the verifier reads in one text: its words, content stems, numbers, negations, names, the kind
of question and its clauses. parse() computes them once per text and keeps them cached.

parsed = parse("How do I get a visa for Canada?")
parsed.kind, parsed.entities          # ("how", frozenset({"canada"}))
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["APOSTROPHES", "STOP", "WORD", "Parsed", "negative", "parse", "stem", "trigrams"]

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_CASED = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:'[a-z]+)?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_CLAUSE = re.compile(r"[^?.!]+(?:[?!]+|\.(?=\s|$)|$)")
APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})


def _words(text: str) -> list[str]:
    return text.split()


_NEGATIONS = frozenset(
    _words(
        "not no never none nothing nobody nowhere neither nor without cannot cant dont doesnt didnt isnt "
        "arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt"
    )
)
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        _words(
            "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
            "sixteen seventeen eighteen nineteen twenty"
        )
    )
}
_NUMBER_WORDS |= {"first": "1", "second": "2", "third": "3", "hundred": "100", "thousand": "1000"}
_NUMBER_WORDS |= {"million": "1e6", "billion": "1e9", "half": "0.5", "single": "1", "double": "2"}
# The kind of answer a question asks for, by its first question word.
_KINDS = {
    "what": "what",
    "which": "what",
    "whats": "what",
    "what's": "what",
    "why": "why",
    "how": "how",
    "who": "who",
    "whom": "who",
    "whose": "who",
    "when": "when",
    "where": "where",
}
_YES_NO = frozenset(
    _words("can could should would will shall may might must is are am was were do does did has have had")
)
STOP = frozenset(
    _words(
        """a an the and or but if then so of to in on at by for with from into onto about as than that this
    these those there here it its it's i i'm me my mine we our ours you your yours he him his she her hers
    they them their what which who whom whose why how when where whats can could should would will shall
    may might must is are am was were be been being do does did doing has have had having get got getting
    any some all also just very really much many more most such own same other another each every one's
    own please best good way ways thing things someone something anyone anything people person quora"""
    )
)
# Words that point at something the text does not hold ("this picture", "the following code"): two such
# questions can read the same and still ask about different things.
_DEIXIS = frozenset(_words("this these following attached above below pictured shown given"))
_CONTRAST = frozenset(_words("outside except excluding besides instead apart rather unlike versus vs"))
_PERSONS = {
    **dict.fromkeys(_words("i me my mine myself i'm i've i'd"), "1"),
    **dict.fromkeys(_words("you your yours yourself you're you've"), "2"),
    **dict.fromkeys(_words("we us our ours ourselves"), "1p"),
}
_FEMALE = frozenset(
    _words("girl girls woman women female females lady ladies wife girlfriend mother daughter sister she her")
)
_MALE = frozenset(
    _words("boy boys man men male males guy guys husband boyfriend father son brother he him his")
)
# "How much" asks for something else than "how": the kind of question keeps the word after "how".
_HOW_QUANTITY = frozenset({"much", "many", "long", "far", "old", "big", "often", "tall", "fast"})


@dataclass(frozen=True, slots=True)
class Parsed:
    """What the features need from one question; computed once per text and cached."""

    words: tuple[str, ...]  # lowercase tokens in order
    content: frozenset[str]  # stemmed content words
    bigrams: frozenset[tuple[str, str]]
    numbers: frozenset[str]
    negations: int
    entities: frozenset[str]  # lowercase forms of capitalised words past the first
    kind: str
    chars: frozenset[str]  # character trigrams of the lowercase text
    deixis: bool
    contrast: bool
    gender: frozenset[str]  # "f", "m": whom the question is about, when it says
    clauses: int  # questions or sentences in the text
    persons: frozenset[str]  # grammatical persons the question speaks in: "1", "2", "1p"
    order: dict[str, int]  # content word -> where it first appears


def stem(word: str) -> str:
    # Just enough to match plurals and common inflections; the model learns the rest from cosine.
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 5 and word.endswith("ing"):
        return word[:-3]
    if len(word) > 4 and word.endswith("ed"):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _kind(words: Sequence[str]) -> str:
    for i, w in enumerate(words):
        kind = _KINDS.get(w)
        if kind == "how" and i + 1 < len(words) and words[i + 1] in _HOW_QUANTITY:
            return "how-" + words[i + 1]
        if kind:
            return kind
        if i == 0 and w in _YES_NO:
            return "yes-no"
    return "other"


# Cached questions are parsed once; bounded, as each Parsed holds a few kB of trigrams.
@lru_cache(maxsize=4096)
def parse(text: str) -> Parsed:
    text = text.translate(APOSTROPHES)
    lower = text.lower()
    words = tuple(WORD.findall(lower))
    negations = 0
    numbers = set(_NUMBER.findall(lower))
    content = set()
    for w in words:
        if negative(w):
            negations += 1
            continue
        if w in _NUMBER_WORDS:
            numbers.add(_NUMBER_WORDS[w])
            continue
        w = w.removesuffix("'s")
        if w in STOP or w.isdigit():
            continue
        content.add(stem(w))
    cased = _CASED.findall(text)
    entities = frozenset(
        w.lower().removesuffix("'s")
        for i, w in enumerate(cased)
        if i > 0 and (w[0].isupper() or any(c.isupper() for c in w[1:])) and w.lower() not in STOP
    )
    stems = [stem(w) for w in words]
    squeezed = " ".join(words)
    return Parsed(
        words=words,
        content=frozenset(content),
        bigrams=frozenset(itertools.pairwise(stems)),
        numbers=frozenset(numbers),
        negations=negations,
        entities=entities,
        kind=_kind(words),
        chars=trigrams(squeezed),
        deixis=not _DEIXIS.isdisjoint(words),
        contrast=not _CONTRAST.isdisjoint(words),
        gender=frozenset(g for g, group in (("f", _FEMALE), ("m", _MALE)) if not group.isdisjoint(words)),
        clauses=max(1, len(_CLAUSE.findall(text.strip()))),
        persons=frozenset(_PERSONS[w] for w in words if w in _PERSONS),
        order={w: i for i, w in reversed(list(enumerate(stems))) if w in content},
    )


def negative(word: str) -> bool:
    return word.replace("'", "") in _NEGATIONS or word.endswith("n't")


def trigrams(text: str) -> frozenset[str]:
    return frozenset(text[i : i + 3] for i in range(max(len(text) - 2, 0)))
