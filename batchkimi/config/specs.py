"""A job's ``[extract]`` and ``[score]`` tables, checked into :class:`Specs` (what
:mod:`batchkimi.scoring` does with them lives there). Pure."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

METHODS = ("exact", "normalized", "contains", "regex", "numeric", "json_field", "label", "model")


@dataclass(frozen=True)
class ExtractSpec:
    json: tuple[str, ...] = ()
    regex: str | None = None
    labels: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        return [f"extracted_{f}" for f in self.json] if self.json else ["extracted"]


@dataclass(frozen=True)
class ScoreSpec:
    expected: str
    method: str = "exact"
    tolerance: float = 1e-6
    field: str | None = None
    labels: tuple[str, ...] = ()
    group_by: tuple[str, ...] = ()
    question: str | None = None  # model: the input column with the question (kept automatically)
    grader_prompt: str | None = None  # model: {question}, {reference}, {answer}; see batchkimi.scoring.grader
    grader_model: str | None = None  # model: default, the job's model
    decimal: str = "."  # numeric: the decimal mark ("," reads 1.234,5 as 1234.5)


@dataclass(frozen=True)
class Specs:
    extract: ExtractSpec | None = None
    score: ScoreSpec | None = None
    tools: tuple[Any, ...] = ()  # the job's tools: their parameters are the schemas of the calls

    @property
    def empty(self) -> bool:
        return self.extract is None and self.score is None and not self.tools

    def needed_columns(self) -> list[str]:
        """Input columns a run must keep for scoring."""
        if self.score is None:
            return []
        return [self.score.expected, *self.score.group_by, *([self.score.question] if self.score.question else [])]


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{key} must be a string or a list of strings, got {value!r}")


def specs_of(extract: Mapping[str, Any] | None, score: Mapping[str, Any] | None, tools: Sequence[Any] | None = None) -> Specs:
    """The job's ``extract`` and ``score`` tables, checked; raises ConfigError naming the key."""
    ex = None
    if extract:
        unknown = set(extract) - {"json", "regex", "labels"}
        if unknown:
            raise ConfigError(f"extract has unknown keys: {', '.join(sorted(unknown))} (json, regex or labels)")
        if len([k for k in ("json", "regex", "labels") if extract.get(k)]) != 1:
            raise ConfigError("extract needs exactly one of: json (fields), regex (a pattern), labels (a list)")
        regex = extract.get("regex")
        if regex is not None:
            if not isinstance(regex, str):
                raise ConfigError("extract.regex must be a string")
            try:
                re.compile(regex)
            except re.error as exc:
                raise ConfigError(f"extract.regex is not a valid regular expression: {exc}") from None
        ex = ExtractSpec(_strings(extract["json"], "extract.json") if extract.get("json") else (), regex,
                         _strings(extract["labels"], "extract.labels") if extract.get("labels") else ())
    sc = None
    if score:
        unknown = set(score) - {"expected", "method", "tolerance", "field", "labels", "group_by", "question",
                                "grader_prompt", "grader_model", "decimal"}
        if unknown:
            raise ConfigError(f"score has unknown keys: {', '.join(sorted(unknown))}")
        expected = score.get("expected")
        if not isinstance(expected, str) or not expected:
            raise ConfigError("score.expected must name the input column holding the expected answer")
        method = score.get("method", "exact")
        if method not in METHODS:
            raise ConfigError(f"score.method must be one of {', '.join(METHODS)}, got {method!r}")
        tolerance = score.get("tolerance", 1e-6)
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or tolerance < 0:
            raise ConfigError(f"score.tolerance must be a number of 0 or more, got {tolerance!r}")
        fld = score.get("field")
        if method == "json_field" and not (isinstance(fld, str) and fld):
            raise ConfigError("score.method = 'json_field' needs score.field, the field to compare")
        labels = _strings(score["labels"], "score.labels") if score.get("labels") else ()
        if method == "label" and not labels and not (ex and ex.labels):
            raise ConfigError("score.method = 'label' needs the labels: score.labels or extract.labels")
        for key in ("question", "grader_prompt", "grader_model"):
            if score.get(key) is not None and not isinstance(score[key], str):
                raise ConfigError(f"score.{key} must be a string")
        if score.get("grader_prompt") and "{answer}" not in score["grader_prompt"]:
            raise ConfigError("score.grader_prompt must hold {answer} (and may hold {question} and {reference})")
        decimal = score.get("decimal", ".")
        if decimal not in (".", ","):
            raise ConfigError(f"score.decimal must be '.' (1,234.5) or ',' (1.234,5), got {decimal!r}")
        sc = ScoreSpec(expected, method, float(tolerance), fld, labels,
                       _strings(score["group_by"], "score.group_by") if score.get("group_by") else (),
                       score.get("question"), score.get("grader_prompt"), score.get("grader_model"), decimal)
    return Specs(ex, sc, tuple(tools or ()))
