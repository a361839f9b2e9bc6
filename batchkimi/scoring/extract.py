"""Reading a value out of an answer the way a grader would: a JSON field, a regular
expression's group, the label it names, the number it gives. Pure: what :mod:`.score` and
:mod:`.grader` read answers with.

Numbers and labels are read in two stages, as evaluation harnesses do: a *strict* stage that
takes an explicit final-answer marker (``#### 42``, ``\\boxed{42}``, ``The answer is 42``,
``Answer: positive``), then a *flexible* stage (the last number outside trailing remarks; the one
label the answer asserts). Each read says which stage matched. What cannot be decided (a label
negated, two labels offered, ``2,5`` without a locale) is an error saying why, never a guess.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..config.specs import ExtractSpec

_EDGE_PUNCT = " \t\n\r.,;:!?\"'`*()[]{}<>"
_MINUS = "\u2212\u2012\u2013\uff0d"  # minus sign, figure dash, en dash, fullwidth hyphen-minus


def normalize(text: str) -> str:
    """Case, width and whitespace folded; punctuation at the ends dropped."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.casefold().split()).strip(_EDGE_PUNCT)


# ---- numbers -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Read:
    """What was read out of an answer: the value (None when nothing could be), the stage that
    matched (``strict``, ``exact``, ``flexible``), or why nothing was read."""

    value: Any = None
    stage: str | None = None
    error: str | None = None


_FRAC = r"\\d?frac\s*\{\s*(?P<fn>-?[\d.,\s]+)\s*\}\s*\{\s*(?P<fd>-?[\d.,\s]+)\s*\}"
_PLAIN = r"(?P<num>\d[\d,.]*\d|\d)(?P<exp>[eE][-+]?\d+)?(?:\s*/\s*(?P<den>\d[\d,.]*\d|\d)(?![\d/]))?|(?P<lead>\.\d+)"
_NUMBER = re.compile(rf"(?<![\w.])(?P<sign>-\s?)?\$?\s?(?:{_FRAC}|{_PLAIN})")
# a final-answer marker; the number is the first one after the last marker
_MARKERS = re.compile(
    r"####|\\boxed\s*\{|(?:final\s+answer|the\s+answer|answer)\s*(?:is|:|=|was)?\s*(?:[:=]\s*)?|(?:^|\n)\s*(?:result|total)\s*[:=]",
    re.I)
# remarks after the answer that hold numbers of their own: "(see steps 1-3)", "[2]"
_TRAILING_REMARK = re.compile(r"\s*(?:\([^()]*\)|\[[^\[\]]*\])\s*[.!]?\s*$")


def _fold_minus(text: str) -> str:
    if text.isascii():
        return text
    return text.translate({ord(c): "-" for c in _MINUS})


def _to_number(digits: str, decimal: str) -> Fraction | str:
    """A run of digits with separators as a number, or why it is ambiguous. ``decimal``: "."
    (1,234.5) or "," (1.234,5)."""
    digits = re.sub(r"\s+", "", digits)
    thousands = "," if decimal == "." else "."
    if thousands in digits:
        if decimal in digits and digits.rindex(thousands) > digits.index(decimal):
            return f"{digits!r} is not a number (a '{thousands}' after the decimal mark '{decimal}')"
        head, *groups = digits.split(decimal)[0].split(thousands)
        if not (1 <= len(head) <= 3 and all(len(g) == 3 for g in groups)):
            return (f"{digits!r} is ambiguous: '{thousands}' is not a thousands separator here "
                    f"(set score.decimal = '{thousands}' if it is the decimal mark)")
        digits = digits.replace(thousands, "")
    if digits.count(decimal) > 1:
        return f"{digits!r} is not a number"
    try:
        return Fraction(digits.replace(decimal, ".")).limit_denominator(10**12)
    except (ValueError, ZeroDivisionError):
        return f"{digits!r} is not a number"


def _number_at(m: re.Match[str], decimal: str) -> Fraction | str:
    sign = -1 if m.group("sign") else 1
    if m.group("fn") is not None:
        a, b = _to_number(m.group("fn").lstrip("-"), decimal), _to_number(m.group("fd"), decimal)
        neg = m.group("fn").strip().startswith("-")
        if isinstance(a, str) or isinstance(b, str):
            return a if isinstance(a, str) else b  # type: ignore[return-value]
        return "a fraction over zero" if b == 0 else sign * (-1 if neg else 1) * a / b
    if m.group("lead") is not None:
        return sign * Fraction(m.group("lead"))
    a = _to_number(m.group("num"), decimal)
    if isinstance(a, str):
        return a
    if m.group("exp"):
        a *= Fraction(10) ** int(m.group("exp")[1:])
    if m.group("den") is not None:
        b = _to_number(m.group("den"), decimal)
        if isinstance(b, str):
            return b
        return "a fraction over zero" if b == 0 else sign * a / b
    return sign * a


def _numbers(text: str, decimal: str) -> list[Fraction | str]:
    return [_number_at(m, decimal) for m in _NUMBER.finditer(text)]


def read_number(text: str, decimal: str = ".") -> Read:
    """The number an answer gives (a :class:`fractions.Fraction` in ``value``): the first number
    after the last final-answer marker (strict), else the last number outside trailing remarks
    (flexible). ``3/4``, ``\\frac{3}{4}`` and ``0.75`` are the same number; ``$1,234`` is 1234;
    the Unicode minus is a minus; units after the number are not part of it."""
    text = _fold_minus(text)
    for marker in reversed(list(_MARKERS.finditer(text))):
        tail = text[marker.end():]
        first = _NUMBER.search(tail)
        if first is not None and not tail[:first.start()].strip(" \t*$:=`'\"\\({").strip():
            value = _number_at(first, decimal)
            if isinstance(value, str):
                return Read(error=value, stage="strict")
            return Read(value, "strict")
    body = text
    while True:  # trailing remarks hold numbers that are not the answer
        stripped = _TRAILING_REMARK.sub("", body)
        if stripped == body or not _NUMBER.search(stripped):
            break
        body = stripped
    found = _numbers(body, decimal)
    if not found:
        return Read(error="the answer holds no number")
    if isinstance(found[-1], str):
        return Read(error=found[-1], stage="flexible")
    return Read(found[-1], "flexible")


# ---- labels --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _labeler(labels: tuple[str, ...]) -> tuple[dict[str, str], re.Pattern[str] | None]:
    """The labels by their normal form, and one pattern finding any of them as whole words."""
    by_norm = {normalize(label): label for label in labels}
    alternatives = "|".join(re.escape(n) for n in sorted(by_norm, key=len, reverse=True) if n)
    return by_norm, re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)") if alternatives else None


_NEGATED = re.compile(r"(?:(?:\b(?:not|no|never|neither|nor|without)|n't)\s+(?:\w+\s+)?|\bnon-?\s*)$")
_LABEL_MARKER = re.compile(r"(?:final\s+answer|answer|label|sentiment|category|class|classification)\s*(?:is|:|=)\s*", re.I)


def read_label(text: str, labels: Sequence[str]) -> Read:
    """The label an answer names: the whole answer when it is exactly one (case, punctuation and
    whitespace folded); else the label after a final-answer marker (``Answer: positive``); else
    the one label the answer asserts. A label negated (``not positive``, ``non-negative``) is not
    asserted; two asserted (``positive/negative``) or none asserted is ambiguous, an error."""
    by_norm, pattern = _labeler(tuple(labels))
    norm = normalize(text)
    if norm in by_norm:
        return Read(by_norm[norm], "exact")
    if pattern is None:
        return Read(error="no labels to look for")
    for marker in reversed(list(_LABEL_MARKER.finditer(norm))):
        m = pattern.match(norm, marker.end())
        if m is not None and not _NEGATED.search(norm[:m.start()]):
            after = norm[m.end():]
            if not re.match(r"\s*(?:/|or\b|and\b)", after):
                return Read(by_norm[m.group(0)], "strict")
    asserted: list[str] = []
    negated: list[str] = []
    for m in pattern.finditer(norm):
        (negated if _NEGATED.search(norm[max(0, m.start() - 24):m.start()]) else asserted).append(by_norm[m.group(0)])
    distinct = list(dict.fromkeys(asserted))
    if len(distinct) == 1:
        return Read(distinct[0], "flexible")
    if not distinct and not negated:
        return Read(error=f"the answer names none of: {', '.join(labels)}")
    if not distinct:
        return Read(error=f"ambiguous: the answer only negates {', '.join(dict.fromkeys(negated))}")
    return Read(error=f"ambiguous: the answer names {', '.join(distinct)}")


def find_label(text: str, labels: Sequence[str]) -> str | None:
    """The label an answer names (see :func:`read_label`), or None."""
    return read_label(text, labels).value  # type: ignore[no-any-return]


# ---- JSON ----------------------------------------------------------------------------------------
def _objects(text: str) -> list[Any]:
    """Every JSON value in ``text`` that starts at a '{' and parses, in order (nested ones
    skipped: an object found covers them)."""
    decoder = json.JSONDecoder()
    found, i = [], text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        found.append(obj)
        i = text.find("{", end)
    return found


def answer_json(content: str, fields: Sequence[str] = ()) -> Any:
    """The JSON an answer gives: the whole answer; else, of the objects in it (fenced or not),
    the last that has every field of ``fields`` (an echo of the schema before the answer, a
    stray brace, a draft object before the final one are passed over)."""
    text = content.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    fences = [m.group(1) for m in re.finditer(r"```(?:json)?\s*(.*?)```", text, re.S)]
    candidates = [o for block in fences for o in _objects(block)] + _objects(text)
    if not candidates:
        raise ValueError("the answer is not JSON")
    dicts = [o for o in candidates if isinstance(o, dict)]
    with_fields = [o for o in dicts if all(f in o for f in fields)]
    if with_fields:
        return with_fields[-1]
    return (dicts or candidates)[-1]


def as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def extract(content: str, spec: ExtractSpec) -> tuple[dict[str, str | None], str | None]:
    """(column -> value, error)."""
    values, error, _ = extract_read(content, spec)
    return values, error


def extract_read(content: str, spec: ExtractSpec) -> tuple[dict[str, str | None], str | None, str | None]:
    """(column -> value, error, the stage that matched)."""
    if spec.json:
        try:
            obj = answer_json(content, spec.json)
        except ValueError as exc:
            return dict.fromkeys(spec.columns), str(exc), None
        if not isinstance(obj, dict):
            return dict.fromkeys(spec.columns), f"the answer's JSON is {type(obj).__name__}, not an object", None
        missing = [f for f in spec.json if f not in obj]
        values = {f"extracted_{f}": as_text(obj.get(f)) for f in spec.json}
        return values, (f"the answer's JSON has no {', '.join(missing)}" if missing else None), "json"
    if spec.regex is not None:
        m = re.search(spec.regex, content)
        if m is None:
            return {"extracted": None}, "the regex does not match the answer", None
        value = m.groupdict().get("value") or (m.group(1) if m.re.groups else m.group(0))
        return {"extracted": value}, None, "regex"
    r = read_label(content, spec.labels)
    return {"extracted": r.value}, r.error, r.stage
