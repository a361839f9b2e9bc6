"""How answers are read, case by case: a table of answers as models write them, each with the
value a person grading by hand reads in it (None where a person could not decide, which must be
an error saying why, never a guess). The README reports how many of these the reader agrees with."""

from __future__ import annotations

from fractions import Fraction

import pytest

from batchkimi.config.specs import ExtractSpec
from batchkimi.scoring.extract import extract, read_label, read_number

F = Fraction

# (answer, the number a grader reads in it; None: no number can be decided)
NUMERIC: list[tuple[str, Fraction | None]] = [
    ("42", F(42)),
    ("The answer is 42.", F(42)),
    ("#### 42", F(42)),
    ("Natalia sold 48/2 = 24 clips in May.\nAltogether 48 + 24 = 72 clips.\n#### 72", F(72)),
    ("#### 42\nNote: I checked steps 1 to 3 twice.", F(42)),
    ("The answer is 18. (Step 4 used 6 + 12.)", F(18)),
    ("So the final answer is $\\boxed{42}$, from 6 x 7.", F(42)),
    ("\\boxed{\\frac{3}{4}}", F(3, 4)),
    ("3/4", F(3, 4)),
    ("\\frac{3}{4}", F(3, 4)),
    ("\\dfrac{1}{8}", F(1, 8)),
    ("1/4", F(1, 4)),
    ("0.75", F(3, 4)),
    ("Answer: 15 (see steps 1-3)", F(15)),
    ("Answer: 15", F(15)),
    ("Final answer: 1,234", F(1234)),
    ("The total is $1,234.50.", F(246900, 200)),
    ("She has 12 apples.", F(12)),
    ("It takes 5 hours (from 9am to 2pm).", F(5)),
    ("The temperature is \u22125 degrees.", F(-5)),
    ("x = -3", F(-3)),
    ("2,5", None),  # a decimal comma or a list? a locale setting decides
    ("1,000,000", F(1000000)),
    ("The answer is: 7 cats and 2 dogs were left out", F(7)),
    ("He ran 3.5 km", F(7, 2)),
    ("1.5e3", F(1500)),
    ("I cannot solve this.", None),
    ("25%", F(25)),
    ("After steps 1-3 we get 9", F(9)),
    ("First 10, then 20, so 30", F(30)),
    ("The answer is 3/4 of the cake", F(3, 4)),
    ("**Answer:** 64", F(64)),
    ("Total: 120 [1]", F(120)),
]

LABELS = ("positive", "negative", "neutral")
# (answer, the label a grader reads in it; None: it cannot be decided)
LABEL: list[tuple[str, str | None]] = [
    ("positive", "positive"),
    ("Positive.", "positive"),
    ("  NEGATIVE  ", "negative"),
    ("**neutral**", "neutral"),
    ("I think it's Negative.", "negative"),
    ("The sentiment is positive because the reviewer loved it.", "positive"),
    ("not positive", None),
    ("positive/negative", None),
    ("non-negative", None),
    ("positive (not neutral)", "positive"),
    ("Answer: negative", "negative"),
    ("Sentiment: neutral", "neutral"),
    ("It could be positive or negative.", None),
    ("It is neither positive nor negative, so neutral.", "neutral"),
    ("The review doesn't seem positive.", None),
    ("I cannot tell.", None),
    ("Positive, not negative.", "positive"),
    ("Negative overall, though it isn't entirely negative.", "negative"),
    ("Label: positive", "positive"),
    ("POSITIVE!!!", "positive"),
    ("Definitely positive", "positive"),
    ("positive and negative", None),
]

SCHEMA = '{"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}'
# (answer, the "label" field a grader reads in it; None: there is none)
JSON: list[tuple[str, str | None]] = [
    ('{"label": "positive"}', "positive"),
    ('```json\n{"label": "negative"}\n```', "negative"),
    (f"Schema: {SCHEMA}\nAnswer: {{\"label\": \"neutral\"}}", "neutral"),
    ('{"label": "positive"}}', "positive"),  # a stray brace
    ('Draft: {"label": "negative"} Final: {"label": "positive"}', "positive"),
    ('Here you go: {"label": "positive", "confidence": 0.9}. Hope it helps!', "positive"),
    ('{"sentiment": "positive"}', None),
    ("no json here", None),
    ('{"label": "not positive"}', "not positive"),  # a field is a value: compared, never searched
    ('{"label": "positive"} and {"note": "x"}', "positive"),
    ('Thinking {about it}... {"label": "neutral"}', "neutral"),
]


@pytest.mark.parametrize("answer, want", NUMERIC)
def test_numbers_are_read_as_a_grader_reads_them(answer: str, want: Fraction | None) -> None:
    r = read_number(answer)
    assert r.value == want, r
    if want is None:
        assert r.error  # says why: no number, or ambiguous


@pytest.mark.parametrize("answer, want", LABEL)
def test_labels_are_read_as_a_grader_reads_them(answer: str, want: str | None) -> None:
    r = read_label(answer, LABELS)
    assert r.value == want, r
    if want is None:
        assert r.error and ("ambiguous" in r.error or "none of" in r.error)


@pytest.mark.parametrize("answer, want", JSON)
def test_json_fields_are_read_from_the_last_object_that_has_them(answer: str, want: str | None) -> None:
    values, error = extract(answer, ExtractSpec(json=("label",)))
    assert values["extracted_label"] == want, (values, error)
    assert (error is None) == (want is not None)


def test_the_table_is_large_enough_to_report() -> None:
    assert len(NUMERIC) + len(LABEL) + len(JSON) >= 60


def test_a_strict_marker_wins_over_numbers_after_it_and_says_so() -> None:
    assert read_number("#### 42 then 7").stage == "strict"
    assert read_number("we get 12 apples").stage == "flexible"
    assert read_label("positive", LABELS).stage == "exact"


def test_a_decimal_comma_is_a_setting() -> None:
    assert read_number("2,5", ",").value == Fraction(5, 2)
    assert read_number("1.234,5", ",").value == Fraction(2469, 2)
    assert "ambiguous" in (read_number("2,5").error or "")
