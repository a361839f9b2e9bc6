"""What the simulated Kimi says: deterministic for a given request and seed, and dependent
on the prompt, so a labelling or evaluation rehearsal scores something real.

- A prompt that offers labels ("one of: positive, negative, neutral", "positive/negative")
  gets one of them, chosen from the text's words (a small sentiment lexicon, else the label
  the text mentions, else a stable pick).
- A prompt with arithmetic ("What is 17 + 25?") gets the result, right with probability
  ``accuracy`` (a deterministic draw), else off by one.
- ``response_format = json_object`` gets a JSON object (``{"label": ...}`` / ``{"answer": ...}``).
- Offered tools get a call whose arguments follow the tool's JSON schema (or, at
  ``bad_tool_args_rate``, break it), unless the last turn is a tool result.
- Anything else gets a short, prompt-derived paragraph.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

POSITIVE = set("good great excellent love loved amazing wonderful best fantastic happy perfect recommend delightful superb enjoyed brilliant nice fast works".split())
NEGATIVE = set("bad terrible awful hate hated worst poor broken disappointing disappointed slow refund useless waste horrible never rude failed stopped".split())
_FILLER = (
    "consider the question carefully then check each part against what was asked before settling "
    "on an answer that is short and correct while noting any ambiguity in the wording"
).split()
_ARITH = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/x×])\s*(-?\d+(?:\.\d+)?)")
_ONE_OF = re.compile(r"one of[:\s]+([^\n.?]+)", re.IGNORECASE)
# "positive/negative/neutral" offers labels; a path ("images/blink.gif", "a/b/c") does not
_SLASHED = re.compile(r"(?<![\w./])([A-Za-z_]+(?:/[A-Za-z_]+)+)(?![\w/]|\.\w)")


@dataclass(frozen=True)
class Reply:
    reasoning: str
    content: str
    tool_calls: list[dict[str, Any]] | None


def request_rng(seed: int, *parts: Any) -> random.Random:
    h = hashlib.blake2b(orjson.dumps([seed, *parts], option=orjson.OPT_SORT_KEYS), digest_size=8)
    return random.Random(int.from_bytes(h.digest(), "little"))


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _labels(prompt: str) -> list[str]:
    m = _ONE_OF.search(prompt)
    if m:
        raw = re.split(r",|/|\bor\b", m.group(1))
        labels = [w.strip().strip("'\"` ").lower() for w in raw]
        labels = [w for w in labels if w and len(w.split()) <= 2]
        if len(labels) >= 2:
            return labels
    m2 = _SLASHED.search(prompt)
    if m2:
        return [w.lower() for w in m2.group(1).split("/")]
    return []


def _pick_label(labels: list[str], text: str, rng: random.Random) -> str:
    words = set(re.findall(r"[a-z']+", text.lower()))
    pos, neg = len(words & POSITIVE), len(words & NEGATIVE)
    if "positive" in labels and "negative" in labels:
        if pos > neg:
            return "positive"
        if neg > pos:
            return "negative"
        if "neutral" in labels:
            return "neutral"
    mentioned = [label for label in labels if label in words]
    if mentioned:
        return mentioned[0]
    return labels[rng.randrange(len(labels))]


def _arith(prompt: str, accuracy: float, rng: random.Random) -> str | None:
    m = _ARITH.search(prompt)
    if not m:
        return None
    a, op, b = float(m.group(1)), m.group(2), float(m.group(3))
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op in "*x×":
        value = a * b
    else:
        if b == 0:
            return "undefined"
        value = a / b
    if rng.random() >= accuracy:
        value += 1
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def _describe(m: Any) -> str:
    """What the simulated model "sees": the kind, format and size (it never looks at pixels)."""
    fmt = (m.mime or "").split("/")[-1] or "linked"
    if m.kind == "image" and m.width:
        return f"A {m.width}x{m.height} {fmt} image ({m.tokens} image tokens)"
    if m.size_bytes:
        return f"A {fmt} video of {m.size_bytes:,} bytes"
    return f"A linked {m.kind}"


_SECTION = re.compile(r"^###\s*(\w+)\s*$", re.M)


def _grade(prompt: str) -> str | None:
    """A grader's verdict, for a prompt with "### Reference" and "### Answer" sections: correct
    when the answer holds the reference's words (case and punctuation aside)."""
    marks = list(_SECTION.finditer(prompt))
    sections = {m.group(1).lower(): prompt[m.end(): marks[i + 1].start() if i + 1 < len(marks) else len(prompt)].strip()
                for i, m in enumerate(marks)}
    if "reference" not in sections or "answer" not in sections:
        return None
    ref = " ".join(re.findall(r"\w+", sections["reference"].lower()))
    ans = " ".join(re.findall(r"\w+", sections["answer"].split("\n\n")[0].lower()))
    correct = bool(ref) and ref in ans
    why = "the answer states the reference" if correct else "the answer does not state the reference"
    return orjson.dumps({"correct": correct, "explanation": why}).decode()


def lognormal_tokens(rng: random.Random, median: float, sigma: float) -> int:
    """A token count from a lognormal of this median and spread (sigma of the log)."""
    if median <= 0:
        return 0
    return max(1, int(round(median * math.exp(sigma * rng.gauss(0.0, 1.0)))))


def text_of_tokens(rng: random.Random, tokens: int) -> str:
    """Filler text of ``tokens`` tokens as batchkimi estimates them (4 characters a token)."""
    if tokens <= 0:
        return ""
    words = rng.choices(_FILLER, k=tokens * 4 // 5 + 2)
    text = " ".join(words)
    while len(text) < tokens * 4:
        text += " " + " ".join(rng.choices(_FILLER, k=tokens // 5 + 2))
    return text[:tokens * 4]


def _filler(rng: random.Random, n_words: int) -> str:
    return " ".join(_FILLER[(i + rng.randrange(len(_FILLER))) % len(_FILLER)] for i in range(n_words))


def _value_for(schema: dict[str, Any], name: str, prompt: str, rng: random.Random) -> Any:
    kind = schema.get("type")
    if "enum" in schema and schema["enum"]:
        return schema["enum"][rng.randrange(len(schema["enum"]))]
    if kind == "integer":
        return rng.randrange(1, 100)
    if kind == "number":
        return round(rng.uniform(0, 100), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "array":
        return [_value_for(schema.get("items") or {"type": "string"}, name, prompt, rng)]
    if kind == "object":
        return _args_for(schema, prompt, rng)
    capitalised = re.findall(r"\b[A-Z][a-z]{2,}\b", prompt)
    return capitalised[-1] if capitalised else name


def _args_for(schema: dict[str, Any], prompt: str, rng: random.Random) -> dict[str, Any]:
    props = schema.get("properties") or {}
    required = schema.get("required") or list(props)
    return {name: _value_for(props.get(name, {}), name, prompt, rng) for name in props if name in required or rng.random() < 0.5}


def answer(
    messages: list[dict[str, Any]],
    *,
    seed: int,
    thinking: bool,
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    json_mode: bool,
    accuracy: float,
    reasoning_words: int,
    answer_words: int,
    bad_tool_args: bool,
    call_index_base: int = 0,
    every_tool: bool = False,
    media: Sequence[Any] = (),
    sample: int = 0,
    shape: dict[str, float] | None = None,
    budget: int | None = None,
) -> Reply:
    """The answer to a request. ``shape``: draw reasoning and free-text answer lengths in
    tokens from lognormals (``reasoning_median``, ``reasoning_sigma``, ``answer_median``,
    ``answer_sigma``), else the short answers of ``reasoning_words`` and ``answer_words``;
    ``budget``: the request's max_tokens (no text is made past it: the server cuts there)."""
    last = messages[-1] if messages else {}
    prompt = text_of(last.get("content"))
    user_turns = [text_of(m.get("content")) for m in messages if m.get("role") == "user"]
    # the same request always gets the same answer; another sample of it, its own draw
    rng = request_rng(seed, messages, thinking, bool(tools), json_mode, *([sample] if sample else []))
    question = (user_turns[-1] if user_turns else prompt).strip()
    reasoning = ""
    answer_tokens = 0
    if shape is not None:  # lengths from their own draw: what the answer says does not change with them
        lrng = request_rng(seed, "lengths", messages, thinking, *([sample] if sample else []))
        cap = (budget or 1 << 20) + 1
        if thinking:
            r_tokens = min(cap, lognormal_tokens(lrng, shape["reasoning_median"], shape["reasoning_sigma"]))
            head = f"The user asks: {question[:80]!r}. "
            reasoning = head + text_of_tokens(lrng, max(1, r_tokens - len(head) // 4))
        answer_tokens = min(cap, lognormal_tokens(lrng, shape["answer_median"], shape["answer_sigma"]))
    elif thinking:
        words = max(1, int(reasoning_words * rng.uniform(0.5, 1.5)))
        reasoning = f"The user asks: {question[:80]!r}. " + _filler(rng, words)

    functions = [t.get("function") or {} for t in tools or [] if isinstance(t, dict)]
    if functions and tool_choice != "none" and last.get("role") != "tool":
        lowered = question.lower().replace("_", " ")
        mentioned = [f for f in functions if str(f.get("name", "")).lower().replace("_", " ") in lowered]
        chosen = functions if every_tool else (mentioned[:1] or functions[:1])
        calls = []
        for i, fn in enumerate(chosen):
            name = str(fn.get("name", "tool"))
            args = _args_for(fn.get("parameters") or {}, question, rng)
            raw_args = orjson.dumps(args).decode()
            if bad_tool_args:
                raw_args = raw_args[:-1]  # not JSON any more: a broken object
            calls.append({"id": f"functions.{name}:{call_index_base + i}", "type": "function",
                          "function": {"name": name, "arguments": raw_args}})
        return Reply(reasoning, "", calls)

    labels = _labels(question)
    result = _arith(question, accuracy, rng)
    graded = _grade(question)
    if graded is not None:
        content = graded
    elif labels:
        label = _pick_label(labels, question, rng)
        content = orjson.dumps({"label": label}).decode() if json_mode else label
    elif result is not None:
        content = orjson.dumps({"answer": result}).decode() if json_mode else f"The answer is {result}."
    elif last.get("role") == "tool":
        content = f"Based on the tool result, {text_of(last.get('content'))[:120]}"
    elif media:
        seen = "; ".join(_describe(m) for m in media)
        if shape is not None:
            body = f"{seen}. " + text_of_tokens(lrng, max(3, answer_tokens - len(seen) // 4)).capitalize() + "."
        else:
            words = max(3, int(answer_words * rng.uniform(0.3, 0.8)))
            body = f"{seen}. " + _filler(rng, words).capitalize() + "."
        content = orjson.dumps({"answer": body}).decode() if json_mode else body
    else:
        topic = " ".join(question.split()[:8])
        if shape is not None:
            body = f"About {topic!r}: " + text_of_tokens(lrng, max(3, answer_tokens - len(topic) // 4 - 3)) + "."
        else:
            words = max(3, int(answer_words * rng.uniform(0.5, 1.5)))
            body = f"About {topic!r}: " + _filler(rng, words) + "."
        content = orjson.dumps({"answer": body}).decode() if json_mode else body
    return Reply(reasoning, content, None)
