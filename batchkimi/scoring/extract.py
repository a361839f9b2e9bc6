"""Reading a value out of an answer: a JSON field, a regular expression's group, the label it
names, the last number. Pure: what :mod:`.score` and :mod:`.grader` read answers with."""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from ..config.specs import ExtractSpec

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")
_EDGE_PUNCT = " \t\n\r.,;:!?\"'`*()[]{}<>"


def normalize(text: str) -> str:
    """Case, width and whitespace folded; punctuation at the ends dropped."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.casefold().split()).strip(_EDGE_PUNCT)


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


@functools.lru_cache(maxsize=64)
def _labeler(labels: tuple[str, ...]) -> tuple[dict[str, str], re.Pattern[str] | None]:
    """The labels by their normal form, and one pattern finding any of them as whole words."""
    by_norm = {normalize(label): label for label in labels}
    alternatives = "|".join(re.escape(n) for n in sorted(by_norm, key=len, reverse=True) if n)
    return by_norm, re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)") if alternatives else None


def find_label(text: str, labels: Sequence[str]) -> str | None:
    """The label an answer names: the whole answer, else the last label it mentions (a longer
    label before a shorter one inside it); None when it names none."""
    by_norm, pattern = _labeler(tuple(labels))
    norm = normalize(text)
    if norm in by_norm:
        return by_norm[norm]
    if pattern is None:
        return None
    hits = pattern.findall(norm)
    return by_norm[hits[-1]] if hits else None


def answer_json(content: str) -> Any:
    """The JSON in an answer: the whole answer, or a fenced ```json block, or the outermost {...}."""
    text = content.strip()
    candidates = [text]
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fence:
        candidates.append(fence.group(1))
    if "{" in text and "}" in text:
        candidates.append(text[text.index("{"): text.rindex("}") + 1])
    for c in candidates:
        try:
            return json.loads(c)
        except ValueError:
            continue
    raise ValueError("the answer is not JSON")


def as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def extract(content: str, spec: ExtractSpec) -> tuple[dict[str, str | None], str | None]:
    """(column -> value, error)."""
    if spec.json:
        try:
            obj = answer_json(content)
        except ValueError as exc:
            return dict.fromkeys(spec.columns), str(exc)
        if not isinstance(obj, dict):
            return dict.fromkeys(spec.columns), f"the answer's JSON is {type(obj).__name__}, not an object"
        missing = [f for f in spec.json if f not in obj]
        values = {f"extracted_{f}": as_text(obj.get(f)) for f in spec.json}
        return values, (f"the answer's JSON has no {', '.join(missing)}" if missing else None)
    if spec.regex is not None:
        m = re.search(spec.regex, content)
        if m is None:
            return {"extracted": None}, "the regex does not match the answer"
        value = m.groupdict().get("value") or (m.group(1) if m.re.groups else m.group(0))
        return {"extracted": value}, None
    label = find_label(content, spec.labels)
    return {"extracted": label}, (None if label is not None else f"the answer names none of: {', '.join(spec.labels)}")


